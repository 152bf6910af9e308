"""dpatch: add or retune stochastic depth (DropPath) in existing PyTorch vision models."""

from __future__ import annotations

from dpatch._version import __version__
from dpatch.droppath import DropPath, drop_add, drop_path
from dpatch.errors import (
    DownloadError,
    DPatchError,
    InvalidValueError,
    ManifestError,
    ModelNotFoundError,
    NoResidualSitesError,
    OutputError,
    WeightsError,
)
from dpatch.io import load, save
from dpatch.patch import PatchReport, Skipped, inject, inspect, retune, strip
from dpatch.schedule import SCHEDULES, expected_depth, schedule_rates
from dpatch.scheduler import DropPathScheduler
from dpatch.sites import Site, find_sites

__all__ = [
    "SCHEDULES",
    "DPatchError",
    "DownloadError",
    "DropPath",
    "DropPathScheduler",
    "InvalidValueError",
    "ManifestError",
    "ModelNotFoundError",
    "NoResidualSitesError",
    "OutputError",
    "PatchReport",
    "Site",
    "Skipped",
    "WeightsError",
    "__version__",
    "drop_add",
    "drop_path",
    "expected_depth",
    "find_sites",
    "inject",
    "inspect",
    "load",
    "retune",
    "save",
    "schedule_rates",
    "strip",
]
