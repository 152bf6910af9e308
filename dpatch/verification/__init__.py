"""Verification: run a model with hooks (:mod:`._observe`) and judge the stochastic depth
that ran against the one declared (:mod:`._verdict`); :func:`verify` (:mod:`._verify`).

Other packages import from here only; the modules inside are this package's own.
"""

from __future__ import annotations

from dpatch.verification._layerdrop import LayerDropCheck
from dpatch.verification._verdict import Finding, SiteCheck, VerifyReport
from dpatch.verification._verify import verify

__all__ = ["Finding", "LayerDropCheck", "SiteCheck", "VerifyReport", "verify"]
