"""Patching: ``inject``, ``retune``, ``strip`` and ``inspect``.

What a patch asks for (a :class:`~dpatch.settings.Settings`, resolved in :mod:`._resolve`:
defaults < recipe < arguments),
applied block by block (:mod:`._apply`) or from a manifest's list (:mod:`._listed`), what
``retune`` keeps (:mod:`._keep`), and the :class:`PatchReport` that comes back
(:mod:`._results`).

Other packages import from here only; the modules inside are this package's own.
"""

from __future__ import annotations

from dpatch.patching._apply import configure_slot, second_probe
from dpatch.patching._layerdrop import apply_layerdrop_entries
from dpatch.patching._listed import configure_sites, disagreement, module_or_none
from dpatch.patching._patch import STRIP_PRUNED, apply_sites, inject, inspect, retune, strip
from dpatch.patching._results import Change, LayerDropChange, PatchReport, Skipped, block_rates

__all__ = [
    "STRIP_PRUNED",
    "Change",
    "LayerDropChange",
    "PatchReport",
    "Skipped",
    "apply_layerdrop_entries",
    "apply_sites",
    "block_rates",
    "configure_sites",
    "configure_slot",
    "disagreement",
    "inject",
    "inspect",
    "module_or_none",
    "retune",
    "second_probe",
    "strip",
]
