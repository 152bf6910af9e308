"""Rates over training time: :class:`DropPathScheduler` (:mod:`._scheduler`) multiplies
every target rate by a factor of the step (the kinds in :mod:`._factors`).

Other packages import from here only; the modules inside are this package's own.
"""

from __future__ import annotations

from dpatch.scheduler._factors import (
    EARLY_SHAPES,
    KINDS,
    FactorFn,
    check_config,
    needs_total_steps,
)
from dpatch.scheduler._scheduler import DropPathScheduler

__all__ = [
    "EARLY_SHAPES",
    "KINDS",
    "DropPathScheduler",
    "FactorFn",
    "check_config",
    "needs_total_steps",
]
