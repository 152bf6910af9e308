"""dpatch: add or retune stochastic depth (DropPath) in existing PyTorch models."""

from __future__ import annotations

from typing import Any

from dpatch._version import __version__
from dpatch.droppath import DropPath, drop_add, drop_path
from dpatch.errors import (
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
    WeightsError,
)
from dpatch.files import Target, load, load_target, load_weights, save
from dpatch.patch import PER, inject, inspect, retune, strip
from dpatch.results import Change, PatchReport, Skipped
from dpatch.schedule import SCHEDULES, expected_depth, schedule_rates
from dpatch.scheduler import DropPathScheduler
from dpatch.sites import Site, find_sites
from dpatch.verify import Finding, SiteCheck, VerifyReport, verify

__all__ = [
    "PER",
    "SCHEDULES",
    "Change",
    "DPatchError",
    "DownloadError",
    "DropPath",
    "DropPathScheduler",
    "Finding",
    "InvalidValueError",
    "ManifestError",
    "ModelNotFoundError",
    "ModelRunError",
    "NoResidualSitesError",
    "NoSlotsError",
    "OutputError",
    "PatchReport",
    "ProbeError",
    "Site",
    "SiteCheck",
    "Skipped",
    "Target",
    "VerifyReport",
    "WeightsError",
    "__version__",
    "drop_add",
    "drop_path",
    "expected_depth",
    "find_sites",
    "inject",
    "inspect",
    "load",
    "load_target",
    "load_weights",
    "retune",
    "save",
    "schedule_rates",
    "strip",
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
