"""Depth on demand: measure what each residual branch or layer is worth
(:mod:`._sensitivity`, :mod:`._layers`),
remove branches for inference (:mod:`._prune`, :mod:`._measure`), and fold Huang's eval
scaling into the weights (:mod:`._fold`), on evaluation data (:mod:`._data`).

Other packages import from here only; the modules inside are this package's own.
"""

from __future__ import annotations

from dpatch.depth._data import Data, load_data, random_example
from dpatch.depth._fold import FoldedSite, FoldReport, fold
from dpatch.depth._layers import Layer, find_layers, layers_of, pruned_layers
from dpatch.depth._measure import PruneStats, measure_pruning
from dpatch.depth._prune import prune, prune_order, unused_state_keys
from dpatch.depth._remove import LayerRemoval, PlainModel, remove_layers, without_pruned_layers
from dpatch.depth._sensitivity import (
    LayerSensitivity,
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
    "Layer",
    "LayerRemoval",
    "LayerSensitivity",
    "PlainModel",
    "PruneStats",
    "SensitivityReport",
    "SiteSensitivity",
    "find_layers",
    "fold",
    "layers_of",
    "load_data",
    "measure_pruning",
    "prune",
    "prune_order",
    "pruned_layers",
    "random_example",
    "read_rates",
    "read_scores",
    "remove_layers",
    "sensitivity",
    "suggest_rates",
    "suggestion",
    "unused_state_keys",
    "without_pruned_layers",
]
