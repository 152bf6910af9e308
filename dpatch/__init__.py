"""dpatch: add or retune stochastic depth (DropPath) in existing PyTorch models."""

from __future__ import annotations

from typing import Any

from dpatch._version import __version__
from dpatch.analysis import Site, find_sites
from dpatch.depth import (
    Data,
    FoldedSite,
    FoldReport,
    PruneStats,
    SensitivityReport,
    SiteSensitivity,
    fold,
    load_data,
    measure_pruning,
    prune,
    prune_order,
    sensitivity,
    suggest_rates,
)
from dpatch.droppath import DropPath, drop_add, drop_path
from dpatch.errors import (
    DataError,
    DownloadError,
    DPatchError,
    InvalidValueError,
    ManifestError,
    ModelNotFoundError,
    ModelRunError,
    NoResidualSitesError,
    NoSlotsError,
    OutputError,
    ProbeError,
    RankMismatchError,
    ReplayError,
    UnsupportedSiteError,
    WeightsError,
)
from dpatch.files import Target, load, load_target, load_weights, save
from dpatch.patching import Change, PatchReport, Skipped, inject, inspect, retune, strip
from dpatch.schedule import PER, SCHEDULES, expected_depth, schedule_rates
from dpatch.scheduler import DropPathScheduler
from dpatch.verification import Finding, SiteCheck, VerifyReport, verify

__all__ = [
    "PER",
    "SCHEDULES",
    "Change",
    "DPatchError",
    "Data",
    "DataError",
    "DownloadError",
    "DropPath",
    "DropPathScheduler",
    "Finding",
    "FoldReport",
    "FoldedSite",
    "InvalidValueError",
    "ManifestError",
    "ModelNotFoundError",
    "ModelRunError",
    "NoResidualSitesError",
    "NoSlotsError",
    "OutputError",
    "PatchReport",
    "ProbeError",
    "PruneStats",
    "RankMismatchError",
    "ReplayError",
    "SensitivityReport",
    "Site",
    "SiteCheck",
    "SiteSensitivity",
    "Skipped",
    "Target",
    "UnsupportedSiteError",
    "VerifyReport",
    "WeightsError",
    "__version__",
    "drop_add",
    "drop_path",
    "expected_depth",
    "find_sites",
    "fold",
    "inject",
    "inspect",
    "load",
    "load_data",
    "load_target",
    "load_weights",
    "measure_pruning",
    "prune",
    "prune_order",
    "retune",
    "save",
    "schedule_rates",
    "sensitivity",
    "strip",
    "suggest_rates",
    "verify",
]


def __getattr__(name: str) -> Any:
    # ``dpatch.io`` was renamed ``dpatch.files`` in 0.2 (it shadowed the standard module);
    # the old name keeps working for one release.
    if name == "io":
        import warnings

        from dpatch import files

        warnings.warn(
            "dpatch.io is now dpatch.files; the old name goes in dpatch 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return files
    raise AttributeError(f"module 'dpatch' has no attribute {name!r}")
