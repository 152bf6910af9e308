"""Watching stochastic-depth slots at work, for :mod:`dpatch.verify`.

Every slot module of a model copy gets hooks that classify each row of each training call
as dropped, kept or partly dropped, and measure the factor a kept branch was scaled by:

- ``slot(branch, residual)`` (dpatch's fused form): a row is dropped when the output row
  equals the residual row, kept when it differs wherever the branch is visible;
- ``slot(branch)`` (timm, torchvision, unfused dpatch, a user's class): dropped when the
  output row is zero wherever the branch is not;
- compute-skipping (dpatch ``skip``): the slot's forward is not called in training; its
  ``scatter_add`` (row mode: exactly B - k rows are dropped) and ``keep_batch`` (batch
  mode: one host decision per call) are wrapped instead.

A training forward pass at a small batch says which slots run and how they are called;
its first call of each slot is then *replayed* on that slot alone, many times, with the
recorded residual cropped to a few elements per row and tiled to more rows, and a random
branch (a zero-initialised branch, timm's ResNet at init, shows nothing): the same module
with the same arguments, at a sample size that makes the share measurable in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dpatch.analysis import slot_settings
from dpatch.droppath import DropPath
from dpatch.errors import first_line

__all__ = ["Observer", "Tally"]

#: Elements kept per row when a recorded tensor is replayed (at least 2 per dimension).
ROW_ELEMENTS = 128
#: Kept-row scale factors remembered per slot (enough for a median and a tail).
_MAX_RATIOS = 4096


@dataclass
class Tally:
    """What one slot module did.

    Attributes:
        calls: training calls seen in the forward passes (any path).
        row_draws, row_dropped: rows whose fate was visible, and how many were dropped.
        call_draws, call_dropped: calls whose rows were all dropped or all kept, and how
            many were dropped (the unit of batch mode).
        mixed_calls: calls with both dropped and kept rows (impossible in batch mode).
        whole_calls: calls that dropped every one of so many rows that row mode would
            practically never do it (see :meth:`Observer.replay`).
        partial: rows dropped in part (a mask finer than a sample).
        ratios: the factor each kept row's branch was scaled by.
        expected: the factor the slot's settings call for, row by row (``ratios``'s pair).
        skip_rows, skip_kept: compute-skipping in row mode: rows seen and rows computed.
        skip_target, skip_slack: the rows the declared rate keeps, sum of B (1 - p) over
            calls, and how far a whole number of rows may be from it (1/2 a call, more
            where at least one row must be kept).
        eval_calls, eval_bad, eval_note: eval calls, those whose output was not the
            identity (or ``1 - p`` for expected scaling), and the first one's mismatch.
        path: how the slot was called: ``fused``, ``forward``, ``skip-row``,
            ``skip-batch`` (the last one seen).
        notes: why a measurement could not be made (replay failed, odd output shape).
    """

    calls: int = 0
    row_draws: int = 0
    row_dropped: int = 0
    call_draws: int = 0
    call_dropped: int = 0
    mixed_calls: int = 0
    whole_calls: int = 0
    partial: int = 0
    ratios: list[float] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)
    skip_rows: int = 0
    skip_kept: int = 0
    skip_target: float = 0.0
    skip_slack: float = 0.0
    eval_calls: int = 0
    eval_bad: int = 0
    eval_note: str = ""
    path: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class _Recorded:
    """The first training call of a slot, cropped for replay."""

    kind: str  # "forward", "skip-row", "skip-batch"
    branch: Tensor | None  # a cropped sample of the branch (shape, dtype, device)
    residual: Tensor | None  # cropped residual (fused forward and skip-row)
    alpha: float


@dataclass(frozen=True)
class _Rows:
    """One call's rows: visible ones, dropped, kept, partly dropped, kept rows' scales."""

    seen: int
    dropped: int
    kept: int
    partial: int
    ratios: list[float]


def _window(t: Tensor, limit: int) -> Tensor:
    """The first elements of every row of ``t`` (at most ``limit`` per row, at least 2 per
    dimension), as a (rows, n) float tensor: a mask finer than a row still shows in it."""
    crop = _crop_shape(tuple(t.shape[1:]), limit)
    window = (slice(None), *tuple(slice(0, n) for n in crop))
    small = t.detach()[window].reshape(t.shape[0], -1)
    return small.float() if small.dtype in (torch.float16, torch.bfloat16) else small


def _measure(
    branch: Tensor, out: Tensor, residual: Tensor | None, alpha: float, limit: int = 1024
) -> _Rows:
    """Classify each row of one slot call (see the module docstring), on a window of at
    most ``limit`` elements per row."""
    if branch.dim() == 0:
        branch, out = branch.reshape(1), out.reshape(1)
        residual = None if residual is None else residual.reshape(1)
    if branch.shape[0] == 0 or branch.numel() == 0:
        return _Rows(0, 0, 0, 0, [])
    b = _window(branch, limit)
    o = _window(out, limit)
    if residual is not None:
        r = _window(residual.expand_as(branch), limit)
        visible = (r + alpha * b) != r
        same = o == r
        delta = o - r
    else:
        visible = b != 0
        same = o == 0
        delta = o
    n_visible = visible.sum(1)
    n_same = (same & visible).sum(1)
    seen = n_visible > 0
    dropped = seen & (n_same == n_visible)
    kept = seen & (n_same == 0)
    n_seen, n_dropped, n_kept = int(seen.sum()), int(dropped.sum()), int(kept.sum())
    ratios: list[float] = []
    if n_kept:
        bb = b * alpha * visible
        num = (delta * bb)[kept].sum(1)
        den = (bb * bb)[kept].sum(1)
        ratios = (num / den).tolist()
    return _Rows(n_seen, n_dropped, n_kept, n_seen - n_dropped - n_kept, ratios)


def _factor(mod: nn.Module) -> float:
    """The scale a kept row's branch should carry in training: 1/(1-p) for inverted
    scaling (p < 1; at p = 1 no row is kept), else 1."""
    s = slot_settings(mod)
    return 1.0 / (1.0 - s.rate) if s.scaling == "inverted" and s.rate < 1.0 else 1.0


def _crop_shape(shape: tuple[int, ...], limit: int = ROW_ELEMENTS) -> tuple[int, ...]:
    """A shape of at most ``limit`` elements inside ``shape``: the largest dimension is
    halved until it fits (never below 2)."""
    dims = list(shape)
    while dims and math.prod(dims) > limit:
        i = max(range(len(dims)), key=dims.__getitem__)
        if dims[i] <= 2:
            break
        dims[i] = (dims[i] + 1) // 2
    return tuple(dims)


def _shrink(t: Tensor, rows: int) -> Tensor:
    """``t`` cropped to a few elements per row and tiled (or cut) to ``rows`` rows."""
    crop = _crop_shape(tuple(t.shape[1:]))
    window = (slice(None), *tuple(slice(0, n) for n in crop))
    small = t.detach()[window]
    index = torch.arange(rows, device=t.device) % max(small.shape[0], 1)
    return small.index_select(0, index).contiguous()


def _parts(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """(branch, residual or None, alpha) of a slot call."""
    branch = args[0] if args else next(iter(kwargs.values()), None)
    residual = None
    alpha = 1.0
    if isinstance(module, DropPath):
        residual = args[1] if len(args) > 1 else kwargs.get("residual")
        alpha = float(args[2] if len(args) > 2 else kwargs.get("alpha", 1.0))
    return branch, residual, alpha


class Observer:
    """Hooks on every slot module of a model (a copy: its methods are wrapped)."""

    def __init__(self, slots: dict[int, nn.Module]) -> None:
        self.tallies: dict[int, Tally] = {key: Tally() for key in slots}
        self._slots = slots
        self._recorded: dict[int, _Recorded] = {}
        self._originals: dict[int, dict[str, Callable[..., Any]]] = {}
        self._in_forward: set[int] = set()
        self._replaying = False
        self.training = True
        self._handles = []
        for key, mod in slots.items():
            self._handles.append(mod.register_forward_pre_hook(self._pre(key)))
            self._handles.append(mod.register_forward_hook(self._post(key), with_kwargs=True))
            if isinstance(mod, DropPath):
                self._wrap_skip(key, mod)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for key, methods in self._originals.items():
            for name in methods:
                self._slots[key].__dict__.pop(name, None)

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Slot calls made meanwhile are not counted (other measurements running the
        model, such as LayerDrop's)."""
        was, self._replaying = self._replaying, True
        try:
            yield
        finally:
            self._replaying = was

    # -- recording ----------------------------------------------------------------------
    def _pre(self, key: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            self._in_forward.add(key)

        return hook

    def _post(self, key: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            self._in_forward.discard(key)
            if self._replaying:  # replay counts its own calls
                return
            branch, residual, alpha = _parts(mod, args, kwargs)
            if not isinstance(branch, Tensor) or not isinstance(out, Tensor):
                return
            tally = self.tallies[key]
            if not self.training:
                self._check_eval(mod, tally, branch, residual, alpha, out)
                return
            tally.calls += 1
            tally.path = "fused" if residual is not None else "forward"
            if key not in self._recorded and branch.dim() > 0:
                self._recorded[key] = _Recorded(
                    "forward",
                    _shrink(branch, 1),
                    None if residual is None else _shrink(residual, branch.shape[0]),
                    alpha,
                )
            self._classify(mod, tally, branch, out, residual, alpha)

        return hook

    def _wrap_skip(self, key: int, slot: DropPath) -> None:
        scatter_add, keep_batch = slot.scatter_add, slot.keep_batch
        self._originals[key] = {"scatter_add": scatter_add, "keep_batch": keep_batch}
        tally = self.tallies[key]

        def scatter_add_watched(
            residual: Tensor, branch: Tensor, index: Tensor, alpha: float = 1.0
        ) -> Tensor:
            out = scatter_add(residual, branch, index, alpha)
            if self.training and not self._replaying:
                tally.calls += 1
                tally.path = "skip-row"
                if key not in self._recorded:
                    rec = _Recorded("skip-row", _shrink(branch, 1), _shrink(residual, 1), alpha)
                    self._recorded[key] = rec
                self._skip_rows(slot, tally, residual, branch, index, alpha, out)
            return out

        def keep_batch_watched() -> bool:
            kept = keep_batch()
            # the skipping form's draw (not a masking call's, nor one while quiet)
            if self.training and not self._replaying and key not in self._in_forward:
                tally.calls += 1
                tally.path = "skip-batch"
                self._recorded.setdefault(key, _Recorded("skip-batch", None, None, 1.0))
                tally.call_draws += 1
                tally.call_dropped += not kept
            return kept

        # Instance attributes shadow the methods the generated site code calls.
        slot.__dict__["scatter_add"] = scatter_add_watched
        slot.__dict__["keep_batch"] = keep_batch_watched

    # -- measuring ----------------------------------------------------------------------
    @staticmethod
    def _count(tally: Tally, rows: _Rows, factor: float, *, unit: bool = True) -> None:
        """Add one call's rows to the tally (``unit``: also count it as a batch-mode draw);
        ``factor`` is the scale the slot's settings call for."""
        tally.row_draws += rows.seen
        tally.row_dropped += rows.dropped
        tally.partial += rows.partial
        if unit and rows.seen and not rows.partial and rows.dropped in (0, rows.seen):
            tally.call_draws += 1
            tally.call_dropped += rows.dropped == rows.seen
        elif unit and rows.dropped and rows.kept:
            tally.mixed_calls += 1
        room = _MAX_RATIOS - len(tally.ratios)
        tally.ratios.extend(rows.ratios[:room])
        tally.expected.extend([factor] * len(rows.ratios[:room]))

    def _classify(
        self,
        mod: nn.Module,
        tally: Tally,
        branch: Tensor,
        out: Tensor,
        residual: Tensor | None,
        alpha: float,
    ) -> _Rows | None:
        if out.shape != branch.shape:
            note = f"output shape {tuple(out.shape)} is not the branch's {tuple(branch.shape)}"
            if note not in tally.notes:
                tally.notes.append(note)
            return None
        rows = _measure(branch, out, residual, alpha)
        self._count(tally, rows, _factor(mod))
        return rows

    def _skip_rows(
        self,
        mod: nn.Module,
        tally: Tally,
        residual: Tensor,
        branch: Tensor,
        index: Tensor,
        alpha: float,
        out: Tensor,
    ) -> None:
        """Compute-skipping, row mode: rows outside ``index`` must be the residual exactly;
        rows inside carry the branch scaled by B/k (inverted scaling)."""
        n, k = residual.shape[0], int(index.numel())
        s = slot_settings(mod)
        chosen = torch.zeros(n, dtype=torch.bool, device=residual.device)
        chosen[index] = True
        tally.skip_rows += n
        tally.skip_kept += k
        tally.skip_target += n * (1.0 - s.rate)
        tally.skip_slack += max(0.5, 1.0 - n * (1.0 - s.rate))
        rest = ~chosen
        if bool(rest.any()):
            untouched = (out[rest] == residual[rest]).reshape(int(rest.sum()), -1).all(1)
            tally.partial += int((~untouched).sum())
        computed = _measure(branch, out[index], residual[index], alpha)
        factor = n / k if s.scaling == "inverted" and k else 1.0
        self._count(tally, computed, factor, unit=False)

    def _check_eval(
        self,
        mod: nn.Module,
        tally: Tally,
        branch: Tensor,
        residual: Tensor | None,
        alpha: float,
        out: Tensor,
    ) -> None:
        tally.eval_calls += 1
        s = slot_settings(mod)
        factor = alpha * ((1.0 - s.rate) if s.scaling == "expected" and s.rate > 0 else 1.0)
        if residual is None:
            want = branch if factor == 1.0 else branch * factor
        else:
            want = residual + branch if factor == 1.0 else torch.add(residual, branch, alpha=factor)
        exact = s.scaling != "expected" or s.rate == 0
        same = out.shape == want.shape and (
            torch.equal(out, want) if exact else torch.allclose(out, want, rtol=1e-5, atol=1e-6)
        )
        if not same:
            tally.eval_bad += 1
            if not tally.eval_note:
                how = "x + branch" if residual is not None else "the branch"
                tally.eval_note = (
                    f"in eval its output is not {how}"
                    + (f" scaled by {factor:g}" if factor != 1.0 else "")
                    + (" bit for bit" if exact else "")
                )

    # -- replaying ----------------------------------------------------------------------
    def replay(self, draws: int, rows: int) -> None:
        """Run each recorded slot alone on ``rows``-row calls until about ``draws`` rows (or,
        for batch-mode slots, ``draws // 8`` calls) were seen. Call in training mode."""
        self._replaying = True
        try:
            for key, rec in self._recorded.items():
                mod, tally = self._slots[key], self.tallies[key]
                try:
                    self._replay_one(mod, tally, rec, draws, rows)
                except Exception as exc:  # a user's slot may reject the cropped call: say so
                    line = first_line(exc, 160, typed=True)
                    tally.notes.append(
                        f"replay failed ({line}); counts come from the forward passes"
                    )
        finally:
            self._replaying = False

    def _replay_one(
        self, mod: nn.Module, tally: Tally, rec: _Recorded, draws: int, rows: int
    ) -> None:
        batch_mode = slot_settings(mod).mode == "batch"
        if rec.kind == "skip-batch":
            keep_batch = self._originals[id(mod)]["keep_batch"]
            for _ in range(max(draws // 8, 1)):
                tally.call_draws += 1
                tally.call_dropped += not keep_batch()
            return
        assert rec.branch is not None
        n_rows = 2 if batch_mode else rows
        calls = max(draws // 8, 1) if batch_mode else max(math.ceil(draws / rows), 1)
        shape = (n_rows, *rec.branch.shape[1:])
        residual = None if rec.residual is None else _shrink(rec.residual, n_rows)
        for _ in range(calls):
            branch = torch.randn(shape, device=rec.branch.device).to(rec.branch.dtype)
            if rec.kind == "skip-row":
                assert residual is not None
                index = mod.keep_indices(residual)  # type: ignore[operator]
                gathered = branch[: index.numel()]
                out = self._originals[id(mod)]["scatter_add"](residual, gathered, index, rec.alpha)
                self._skip_rows(mod, tally, residual, gathered, index, rec.alpha, out)
                continue
            out = mod(branch) if residual is None else mod(branch, residual, rec.alpha)
            counted = self._classify(mod, tally, branch, out, residual, rec.alpha)
            p = slot_settings(mod).rate
            # Row mode drops every one of n rows with probability p**n: flag it only where
            # that is below one in a million.
            if (
                counted is not None
                and counted.seen
                and counted.dropped == counted.seen
                and (p == 0 or counted.seen * math.log(p) < -13.8)
            ):
                tally.whole_calls += 1
