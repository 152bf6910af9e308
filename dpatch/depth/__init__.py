"""Depth on demand: measure what each residual branch is worth (:mod:`._sensitivity`),
remove branches for inference (:mod:`._prune`, :mod:`._measure`), and fold Huang's eval
scaling into the weights (:mod:`._fold`), on evaluation data (:mod:`._data`).

Other packages import from here only; the modules inside are this package's own.
"""

from __future__ import annotations

from dpatch.depth._data import Data, load_data
from dpatch.depth._fold import FoldedSite, FoldReport, fold
from dpatch.depth._measure import PruneStats, measure_pruning
from dpatch.depth._prune import prune, prune_order, unused_state_keys
from dpatch.depth._sensitivity import (
    SensitivityReport,
    SiteSensitivity,
    read_rates,
    read_scores,
    sensitivity,
    suggest_rates,
    suggestion,
)

__all__ = [
    "Data",
    "FoldReport",
    "FoldedSite",
    "PruneStats",
    "SensitivityReport",
    "SiteSensitivity",
    "fold",
    "load_data",
    "measure_pruning",
    "prune",
    "prune_order",
    "read_rates",
    "read_scores",
    "sensitivity",
    "suggest_rates",
    "suggestion",
    "unused_state_keys",
]
