"""dpatch: add or retune stochastic depth (DropPath) in existing PyTorch models.

The public surface. Names load on first use (PEP 562), so ``import dpatch`` and the
command line's ``--help`` do not import torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dpatch._version import __version__

if TYPE_CHECKING:
    from dpatch.analysis import Site, find_sites
    from dpatch.depth import (
        Data,
        FoldedSite,
        FoldReport,
        Layer,
        LayerSensitivity,
        PruneStats,
        SensitivityReport,
        SiteSensitivity,
        find_layers,
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
        UnanalysedError,
        UnsupportedSiteError,
        WeightsError,
    )
    from dpatch.files import Target, load, load_target, load_weights, save, save_pretrained
    from dpatch.models import LayerDrop, find_layerdrop
    from dpatch.patching import (
        Change,
        LayerDropChange,
        PatchReport,
        Skipped,
        inject,
        inspect,
        retune,
        strip,
    )
    from dpatch.schedule import PER, SCHEDULES, expected_depth, schedule_rates
    from dpatch.scheduler import DropPathScheduler
    from dpatch.settings import Settings
    from dpatch.verification import Finding, LayerDropCheck, SiteCheck, VerifyReport, verify

#: Where each public name lives.
_HOMES: dict[str, str] = {
    "find_sites": "dpatch.analysis",
    "Site": "dpatch.analysis",
    "Data": "dpatch.depth",
    "find_layers": "dpatch.depth",
    "fold": "dpatch.depth",
    "FoldedSite": "dpatch.depth",
    "FoldReport": "dpatch.depth",
    "Layer": "dpatch.depth",
    "LayerSensitivity": "dpatch.depth",
    "load_data": "dpatch.depth",
    "measure_pruning": "dpatch.depth",
    "prune": "dpatch.depth",
    "prune_order": "dpatch.depth",
    "PruneStats": "dpatch.depth",
    "sensitivity": "dpatch.depth",
    "SensitivityReport": "dpatch.depth",
    "SiteSensitivity": "dpatch.depth",
    "suggest_rates": "dpatch.depth",
    "drop_add": "dpatch.droppath",
    "drop_path": "dpatch.droppath",
    "DropPath": "dpatch.droppath",
    "DataError": "dpatch.errors",
    "DownloadError": "dpatch.errors",
    "DPatchError": "dpatch.errors",
    "InvalidValueError": "dpatch.errors",
    "ManifestError": "dpatch.errors",
    "ModelNotFoundError": "dpatch.errors",
    "ModelRunError": "dpatch.errors",
    "NoResidualSitesError": "dpatch.errors",
    "NoSlotsError": "dpatch.errors",
    "OutputError": "dpatch.errors",
    "ProbeError": "dpatch.errors",
    "RankMismatchError": "dpatch.errors",
    "ReplayError": "dpatch.errors",
    "UnanalysedError": "dpatch.errors",
    "UnsupportedSiteError": "dpatch.errors",
    "WeightsError": "dpatch.errors",
    "load": "dpatch.files",
    "load_target": "dpatch.files",
    "load_weights": "dpatch.files",
    "save": "dpatch.files",
    "save_pretrained": "dpatch.files",
    "Target": "dpatch.files",
    "find_layerdrop": "dpatch.models",
    "LayerDrop": "dpatch.models",
    "Change": "dpatch.patching",
    "inject": "dpatch.patching",
    "inspect": "dpatch.patching",
    "LayerDropChange": "dpatch.patching",
    "PatchReport": "dpatch.patching",
    "retune": "dpatch.patching",
    "Skipped": "dpatch.patching",
    "strip": "dpatch.patching",
    "expected_depth": "dpatch.schedule",
    "PER": "dpatch.schedule",
    "schedule_rates": "dpatch.schedule",
    "SCHEDULES": "dpatch.schedule",
    "DropPathScheduler": "dpatch.scheduler",
    "Settings": "dpatch.settings",
    "Finding": "dpatch.verification",
    "LayerDropCheck": "dpatch.verification",
    "SiteCheck": "dpatch.verification",
    "verify": "dpatch.verification",
    "VerifyReport": "dpatch.verification",
}

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
    "Layer",
    "LayerDrop",
    "LayerDropChange",
    "LayerDropCheck",
    "LayerSensitivity",
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
    "Settings",
    "Site",
    "SiteCheck",
    "SiteSensitivity",
    "Skipped",
    "Target",
    "UnanalysedError",
    "UnsupportedSiteError",
    "VerifyReport",
    "WeightsError",
    "__version__",
    "drop_add",
    "drop_path",
    "expected_depth",
    "find_layerdrop",
    "find_layers",
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
    "save_pretrained",
    "schedule_rates",
    "sensitivity",
    "strip",
    "suggest_rates",
    "verify",
]


#: Subpackages and modules reachable as attributes of ``dpatch`` (imported on first use).
_PACKAGES = frozenset(
    {
        "analysis",
        "depth",
        "droppath",
        "env",
        "errors",
        "files",
        "integrations",
        "kernels",
        "marks",
        "models",
        "patching",
        "ranks",
        "recipes",
        "report",
        "rewrite",
        "rows",
        "schedule",
        "scheduler",
        "settings",
        "tie",
        "verification",
    }
)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    # ``dpatch.io`` was renamed ``dpatch.files`` in 0.2 (it shadowed the standard module);
    # the old name keeps working for one release.
    if name == "io":
        import warnings

        warnings.warn(
            "dpatch.io is now dpatch.files; the old name goes in dpatch 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module("dpatch.files")
    if name in _PACKAGES:  # ``dpatch.depth.find_layers`` after a plain ``import dpatch``
        return importlib.import_module(f"dpatch.{name}")
    raise AttributeError(f"module 'dpatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
