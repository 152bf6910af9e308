"""The dpatch manifest: what a saved file says about its patch, and reading it back.

A dpatch file is a safetensors file whose metadata key ``dpatch.manifest`` holds JSON:
format version, library versions, the model spec, the schedule arguments and every site
with its rate, mode and scaling. This module owns that format; :mod:`dpatch.files` reads
and writes the files.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import torch

from dpatch._version import __version__
from dpatch.analysis import Site
from dpatch.errors import ManifestError
from dpatch.marks import ScheduleMark
from dpatch.models import layerdrop_from_dict
from dpatch.patching import PatchReport, block_rates
from dpatch.schedule import expected_depth

__all__ = [
    "DEPTH_KEY",
    "FORMAT",
    "MANIFEST_KEY",
    "build_manifest",
    "parse_manifest",
    "report_from_manifest",
    "schedule_from_manifest",
]

FORMAT = "dpatch/1"
MANIFEST_KEY = "dpatch.manifest"
#: The manifest entry of depth operations: ``pruned_keys`` (tensors a pruned file leaves
#: out, see :mod:`dpatch.prune`) and ``folded`` (sites whose eval scaling was folded).
DEPTH_KEY = "depth"
_SCHEDULE_KEYS = ("schedule", "per", "max_rate", "min_rate", "mode", "scaling", "skip", "rates")


def _versions(transformers: bool = False) -> dict[str, str]:
    out = {"dpatch": __version__, "torch": torch.__version__}
    for lib in ("timm", "torchvision"):
        try:
            out[lib] = __import__(lib).__version__
        except ImportError:  # pragma: no cover - both are dependencies
            out[lib] = "absent"
    if transformers:  # optional: recorded for the transformers models that need it
        out["transformers"] = str(sys.modules["transformers"].__version__)
    return out


def build_manifest(
    report: PatchReport | None, spec: Any | None, rebuild: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest of a patch report and the model spec that rebuilds the model.

    ``rebuild`` adds what the spec alone cannot say (a transformers model's ``class`` and
    full ``config``, see :func:`dpatch.models.rebuild_info`) to the model entry.
    """
    model_entry = None if spec is None else {"spec": spec.text, "kwargs": dict(spec.kwargs)}
    if model_entry is not None and rebuild:
        model_entry.update(rebuild)
    body = report.to_dict() if report is not None else {"sites": []}
    # The model's own LayerDrop, as it is (and what inject turned off), when it has one.
    layerdrop = {"layerdrop": body["layerdrop"]} if body.get("layerdrop") else {}
    return {
        **layerdrop,
        "format": FORMAT,
        "versions": _versions(bool(model_entry and model_entry.get("config") is not None)),
        "model": model_entry,
        "schedule": {k: body.get(k) for k in _SCHEDULE_KEYS},
        "summary": body.get("summary", {}),
        "recipe": body.get("recipe"),
        "sites": body["sites"],
    }


def parse_manifest(raw: str, where: str) -> dict[str, Any]:
    """The manifest in a file's metadata, checked for its format.

    Raises:
        ManifestError: not valid JSON, or of an unknown format.
    """
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"the dpatch manifest in {where!r} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(
            f"{where!r} has manifest format {got!r}; this dpatch reads {FORMAT!r} (upgrade dpatch?)"
        )
    return manifest


def schedule_from_manifest(manifest: Mapping[str, Any]) -> ScheduleMark | None:
    """The schedule a manifest records (None for ``current``: rates as they were)."""
    sched = manifest.get("schedule") or {}
    kind = sched.get("schedule")
    if not kind or kind == "current":
        return None
    return ScheduleMark(
        str(kind),
        str(sched.get("per") or "block"),
        float(sched.get("max_rate") or 0.0),
        float(sched.get("min_rate") or 0.0),
        tuple(float(r) for r in sched.get("rates") or []),
    )


def report_from_manifest(manifest: dict[str, Any]) -> PatchReport:
    """The report a manifest records, without building the model.

    Raises:
        ManifestError: the manifest's sites are malformed.
    """
    try:
        sites = tuple(
            Site(**{k: d[k] for k in Site.__dataclass_fields__ if k in d})
            for d in manifest.get("sites", [])
        )
    except TypeError as exc:
        raise ManifestError(f"the manifest's sites are malformed ({exc})") from exc
    try:
        layerdrop = tuple(layerdrop_from_dict(d) for d in manifest.get("layerdrop") or [])
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"the manifest's layerdrop entries are malformed ({exc})") from exc
    sched = manifest.get("schedule") or {}
    steps = [float(r) for r in sched.get("rates") or []]
    # a pruned site never runs: depth 0
    depth_steps = block_rates(sites) if any(s.pruned for s in sites) else steps
    return PatchReport(
        sites=sites,
        schedule=str(sched.get("schedule") or "current"),
        per=str(sched.get("per") or "block"),
        max_rate=float(sched.get("max_rate") or 0.0),
        min_rate=float(sched.get("min_rate") or 0.0),
        mode=str(sched.get("mode") or "row"),
        scaling=str(sched.get("scaling") or "inverted"),
        skip=bool(sched.get("skip")),
        rates=tuple(steps),
        expected_depth=expected_depth(depth_steps),
        recipe=manifest.get("recipe"),
        layerdrop=layerdrop,
    )
