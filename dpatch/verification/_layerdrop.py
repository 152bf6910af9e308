"""Measuring a model's own LayerDrop (:class:`dpatch.models.LayerDrop`), for
:mod:`dpatch.verify`.

A forward pre-hook on the module that owns a layer list counts its training calls; one on
each layer of the list sees which layers ran in each of those calls. A layer that did not
run in a call was skipped: one draw per layer per call, compared with the rate the model
claims through a Wilson interval, as slots are.

Each training pass gives only one draw per layer (12 for a 12-layer encoder), so after the
model's own training passes the owning module alone is run again on the inputs its first
training call got, until :data:`LAYERDROP_DRAWS` draws are in: ``ceil(256 / layers)``
passes in all (22 for 12 layers), or ``steps`` when that is more. A LayerDrop at rate 0
(claimed and read: ``inject`` turned it off) draws nothing; the model's own passes check
that no layer is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dpatch.errors import first_line
from dpatch.models import LayerDrop
from dpatch.verification._measured import Measured, wilson

__all__ = ["LAYERDROP_DRAWS", "LayerDropCheck", "LayerDropWatch", "compare_layerdrop", "judge"]

#: Draws (layer runs) a LayerDrop is measured on at least, unless ``draws=0``: enough for a
#: 99.9 % Wilson interval to tell a rate of 0.1 from no layer drop at all (0 skips in 256
#: draws gives [0, 0.04]).
LAYERDROP_DRAWS = 256


@dataclass
class _Tally:
    """What one LayerDrop did: training calls of its owner, layer runs seen, skips."""

    calls: int = 0
    draws: int = 0
    skipped: int = 0
    per_layer: list[int] = field(default_factory=list)
    ran: set[int] | None = None  # layers run in the owner's current call
    recorded: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)


def _detached(value: Any) -> Any:
    """``value`` with every tensor cloned (a forward may write into its inputs)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list | tuple) and type(value) in (list, tuple):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


class LayerDropWatch:
    """Hooks on the owner and the layers of every LayerDrop of a model (a copy)."""

    def __init__(self, model: nn.Module, records: Sequence[LayerDrop]) -> None:
        self.records = tuple(records)
        self.tallies = [_Tally(per_layer=[0] * r.count) for r in self.records]
        self._owners: list[nn.Module] = []
        self._handles: list[Any] = []
        for i, record in enumerate(self.records):
            owner = model.get_submodule(record.path)
            layers = model.get_submodule(record.layers)
            self._owners.append(owner)
            self._handles.append(owner.register_forward_pre_hook(self._start(i), with_kwargs=True))
            self._handles.append(owner.register_forward_hook(self._end(i)))
            for j, layer in enumerate(layers.children()):
                self._handles.append(layer.register_forward_pre_hook(self._ran(i, j)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _start(self, i: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tally = self.tallies[i]
            tally.ran = set() if mod.training else None
            if mod.training and tally.recorded is None:
                tally.recorded = (_detached(args), _detached(kwargs))

        return hook

    def _ran(self, i: int, j: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            ran = self.tallies[i].ran
            if ran is not None:
                ran.add(j)

        return hook

    def _end(self, i: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            tally = self.tallies[i]
            if tally.ran is None:
                return
            tally.calls += 1
            for j in range(len(tally.per_layer)):
                tally.draws += 1
                if j not in tally.ran:
                    tally.skipped += 1
                    tally.per_layer[j] += 1
            tally.ran = None

        return hook

    def replay(self, draws: int) -> None:
        """Run each owner alone (in training mode, without gradients) on the inputs of its
        first training call until about ``draws`` layer runs were seen."""
        for record, tally, owner in zip(self.records, self.tallies, self._owners, strict=True):
            if tally.recorded is None or not record.count:
                continue
            if record.rate == 0 and record.read_rate == 0:
                continue  # nothing to draw: the model's own passes are the check
            args, kwargs = tally.recorded
            more = math.ceil(draws / record.count) - tally.calls
            try:
                with torch.no_grad():
                    for _ in range(more):
                        owner(*_detached(args), **_detached(kwargs))
            except Exception as exc:  # an owner that will not run twice on one input: say so
                tally.notes.append(
                    f"running {record.path or '(root)'} again failed "
                    f"({first_line(exc, 160, typed=True)}); measured on {tally.calls} passes"
                )


@dataclass(frozen=True)
class LayerDropCheck:
    """What one LayerDrop claims and what it did.

    Attributes:
        layerdrop: the record (its ``rate`` is the one claimed).
        passes: training calls of its owning module seen (model passes and replays).
        skipped: per layer, the calls that skipped it.
        measured: skips over layer runs, with the Wilson interval (``unit`` ``layer``).
        ok: no error concerns it.
    """

    layerdrop: LayerDrop
    passes: int
    skipped: tuple[int, ...]
    measured: Measured
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.layerdrop.to_dict(),
            "passes": self.passes,
            "skipped": list(self.skipped),
            **self.measured.to_dict(),
            "ok": self.ok,
        }


def judge(record: LayerDrop, tally: _Tally, z: float) -> tuple[Measured, list[str]]:
    """The realised skip share of one LayerDrop against its claimed rate."""
    n, k = tally.draws, tally.skipped
    share = k / n if n else None
    low, high = wilson(k, n, z) if n else (None, None)
    problems: list[str] = []
    if n and low is not None and high is not None:
        bad = k > 0 if record.rate == 0 else not low <= record.rate <= high
        if bad:
            reads = (
                f"; its forward reads {record.read} = {record.read_rate:g}"
                if record.read != record.attr and record.read_rate != record.rate
                else ""
            )
            problems.append(
                f"skipped {k} of {n} layer runs in {tally.calls} passes ({share:.4f}, interval "
                f"[{low:.4f}, {high:.4f}]), but {record.attr} is {record.rate:.4f}{reads}"
            )
    measured = Measured("layer", n, k, share, low, high, False, None, None)
    return measured, problems


def compare_layerdrop(
    records: Sequence[LayerDrop], declared: Sequence[LayerDrop]
) -> list[tuple[str, str]]:
    """(layers, message) for every declared LayerDrop rate the model does not have."""
    have: Mapping[str, LayerDrop] = {r.layers: r for r in records}
    out = []
    for want in declared:
        got = have.get(want.layers)
        if got is None:
            out.append((want.layers, "LayerDrop declared, but the model drops no layers there"))
        elif abs(got.rate - want.rate) > 1e-9:
            out.append(
                (want.layers, f"LayerDrop {got.attr} is {got.rate:.4f}, declared {want.rate:.4f}")
            )
    return out
