"""What patching does with a model's own LayerDrop (:mod:`dpatch.models`, ``LayerDrop``):
``inject`` turns it off where dpatch's sites sit on the layers it drops (so rates never
double), ``retune(layerdrop=)`` sets it, ``strip`` puts back what ``inject`` turned off,
and ``load`` sets it as a file's manifest records it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from dpatch.analysis import Site
from dpatch.errors import InvalidValueError, ManifestError
from dpatch.models import (
    LayerDrop,
    find_layerdrop,
    layerdrop_from_dict,
    set_layerdrop,
    unused_layerdrop,
)
from dpatch.patching._results import LayerDropChange, PatchReport

__all__ = [
    "apply_layerdrop_entries",
    "check_layerdrop",
    "layerdrop_state",
    "set_layerdrop_rates",
    "turn_off_layerdrop",
]


def _carries_sites(record: LayerDrop, sites: Iterable[Site]) -> bool:
    """Some site of dpatch's sits inside one of the layers ``record`` drops."""
    prefix = record.layers + "."
    return any(s.path.startswith(prefix) and not s.pruned for s in sites)


def layerdrop_state(model: nn.Module) -> dict[str, Any]:
    """``PatchReport`` fields for a model's LayerDrop as it is: the records, and a note for
    each config value that no forward reads."""
    records = find_layerdrop(model)
    return {"layerdrop": records, "notes": tuple(unused_layerdrop(model, records))}


def turn_off_layerdrop(report: PatchReport, *, keep: bool) -> PatchReport:
    """``report`` of an ``inject``, with every LayerDrop whose layers now carry dpatch's
    sites turned off (unless ``keep``) and a note saying so."""
    model = report.model
    if model is None:
        return report
    changes: list[LayerDropChange] = []
    notes: list[str] = []
    for record in find_layerdrop(model):
        if keep or (record.rate == 0 and record.read_rate == 0):
            continue
        if not _carries_sites(record, report.sites):
            continue
        set_layerdrop(model, record, 0.0, remember=True)
        changes.append(LayerDropChange(record.layers, record.attr, record.rate, 0.0))
        notes.append(
            f"turned off the model's own LayerDrop ({record.attr} {record.rate:g} -> 0) on "
            f"{record.layers}: dpatch's rates replace it; keep_layerdrop=True "
            "(--keep-layerdrop) keeps both"
        )
    return _with_changes(report, changes, notes)


def _with_changes(
    report: PatchReport, changes: list[LayerDropChange], notes: list[str]
) -> PatchReport:
    """``report`` with the changes made and the LayerDrop state of its model as it is now."""
    assert report.model is not None
    state = layerdrop_state(report.model)
    return dataclasses.replace(
        report,
        layerdrop=state["layerdrop"],
        layerdrop_changes=tuple(changes),
        notes=(*notes, *state["notes"]),
    )


def check_layerdrop(model: nn.Module, rate: object) -> float:
    """``rate`` for ``retune(layerdrop=)``, checked before anything changes.

    Raises:
        InvalidValueError: a rate outside [0, 1), or a model without LayerDrop of its own.
    """
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1:
        raise InvalidValueError(
            f"layerdrop has to be a number in [0, 1) (the share of layers skipped; 1 would "
            f"skip every layer), but got {rate!r}"
        )
    value = float(rate)
    if not find_layerdrop(model):
        raise InvalidValueError(
            f"layerdrop={rate!r}, but the model has no LayerDrop of its own (no forward "
            "skips layers of a list by a config.*layerdrop* or self.*layerdrop* rate); "
            "use inject to add stochastic depth, or leave layerdrop out"
        )
    return value


def set_layerdrop_rates(report: PatchReport, rate: float) -> PatchReport:
    """``report`` of a ``retune``, with every LayerDrop of its model set to ``rate``."""
    model = report.model
    assert model is not None
    changes: list[LayerDropChange] = []
    notes: list[str] = []
    for record in find_layerdrop(model):
        now = set_layerdrop(model, record, rate)
        if record.rate != rate or record.read_rate != rate:
            changes.append(LayerDropChange(record.layers, record.attr, record.rate, rate))
            notes.append(
                f"set the model's own LayerDrop on {record.layers}: {record.attr} "
                f"{record.rate:g} -> {now.rate:g}"
            )
    return _with_changes(report, changes, notes)


def apply_layerdrop_entries(model: nn.Module, entries: Sequence[Mapping[str, Any]]) -> None:
    """Set each LayerDrop of ``model`` as a manifest's ``layerdrop`` entries record it
    (the rate, and the rate ``inject`` turned off, which ``strip`` puts back).

    Raises:
        ManifestError: an entry is malformed or names a layer list the model does not
            drop layers of.
    """
    have = {r.layers: r for r in find_layerdrop(model)}
    for entry in entries:
        try:
            want = layerdrop_from_dict(dict(entry))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"the manifest's layerdrop entry {entry!r} is malformed") from exc
        record = have.get(want.layers)
        if record is None:
            raise ManifestError(
                f"the manifest records LayerDrop on {want.layers!r}, but the model drops no "
                "layers there; the file was made for another model (pass the right one: "
                "dpatch.load(path, model=...))"
            )
        if want.original is not None:
            record = set_layerdrop(model, record, want.original)
            set_layerdrop(model, record, want.rate, remember=True)
        else:
            set_layerdrop(model, record, want.rate)
