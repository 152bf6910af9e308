"""A tied block: one decision per sample (or per batch) for every branch of the block, as
LayerDrop and LayerSkip drop a whole layer; and, with compute-skipping, the whole layer run
on the kept rows only.

timm draws each branch of a block on its own; ``tie="block"`` makes the branches of a
block one unit. A :class:`Tie` is shared by the block's slots and hooked on the block:

- before each training call it draws the block's decision: per row a keep/drop and the
  kept rows' scale (``mode="row"``), or one host decision for the batch (``mode="batch"``,
  through the first slot's generator, so ranks agree and checkpointing replays it); every
  slot the forward calls then applies that decision instead of drawing its own;
- with ``skip=True`` in row mode, it runs the block's forward on a fixed-size random subset
  of rows (k = max(round(B (1 - p)), 1), scaled B/k, DINOv2's scheme): every per-sample
  argument of the call goes through the gather (hidden states, attention masks of shape
  (B, 1, T, T) or (B, T), position ids, rotary ``(cos, sin)`` tuples), whatever is shared
  (a (1, T, D) rotary table, ``cache_position``) passes as it is, and the kept rows' output
  is put back in place: a dropped row leaves the block as it came in.

Which arguments are per-sample is read off two probes at different batch sizes (see
:func:`dpatch.patching` ``second_probe``): a value whose first dimension follows the batch
size. Arguments are named by their place in the call (``[1]['attention_mask']``), not by
position among the tensors, so a value the probe saw as ``None`` (transformers builds no
attention mask for an unpadded batch) does not shift the others; such a value is gathered
when its first dimension is the batch size. Eval and generation never touch a tie: the
hooks act in training only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from dpatch.droppath import DropPath, keep_count
from dpatch.errors import DPatchError

__all__ = ["Tie"]


@dataclass
class _Call:
    """One training call of a tied block in flight."""

    factor: Tensor | float  # per-row factor (B,), or one scale for every computed row
    keep: bool = True  # batch mode: the batch's decision
    index: Tensor | None = None  # whole-layer skip: the computed rows
    hidden: Tensor | None = None  # whole-layer skip: the block's input, all rows
    rows: int = 0


class Tie:
    """The one decision the slots of a block share, per training call of the block.

    Args:
        slots: the block's DropPath slots (their first gives rate, mode, scaling).
        batched: places (``pytree.keystr`` of ``(args, kwargs)``: ``[0][0]``,
            ``[1]['position_ids']``) of the call's per-sample values, or None where no
            second probe told them apart (no whole-layer skipping then).
        shared: places of tensors the probes saw shared by every sample (never gathered).
        hidden: the place of the hidden states among those values (the block's input and
            output), or None.
        skip_reason: why the whole layer cannot run on a subset of rows ('' when it can).
        skip: compute-skipping was asked: the whole layer runs on the kept rows (row mode,
            where ``skip_reason`` is '').
    """

    def __init__(
        self,
        slots: Sequence[DropPath],
        *,
        skip: bool = False,
        batched: frozenset[str] | None = None,
        shared: frozenset[str] = frozenset(),
        hidden: str | None = None,
        skip_reason: str = "",
    ) -> None:
        self.slots = tuple(slots)
        self.skip = skip
        self.batched = batched
        self.shared = shared
        self.seen = (batched or frozenset()) | shared  # places the probes classified
        self.hidden = hidden
        self.skip_reason = skip_reason if skip_reason or batched is not None else "no probe"
        self._calls: list[_Call] = []
        self._block: nn.Module | None = None

    # -- state ---------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_calls": []}

    @property
    def active(self) -> bool:
        """A training call of the block is in flight: slots apply its decision."""
        return bool(self._calls)

    @property
    def whole_layer(self) -> bool:
        """``skip=True`` in row mode runs the block on the kept rows only."""
        return self.skip_reason == ""

    def _lead(self) -> DropPath:
        return self.slots[0]

    # -- hooks ---------------------------------------------------------------------------
    def attach(self, block: nn.Module) -> None:
        """Hook the block (and point its slots at this tie)."""
        self.detach()
        self._block = block
        block.register_forward_pre_hook(self.pre, with_kwargs=True)
        block.register_forward_hook(self.post, with_kwargs=True, always_call=True)
        for s in self.slots:
            s._tie = self

    def detach(self) -> None:
        """Remove the hooks; the slots draw on their own again. Hooks are found on the
        block by whom they belong to, so a copy (deepcopy, pickle) detaches its own."""
        block = self._block
        if block is not None:
            for hooks in (block._forward_pre_hooks, block._forward_hooks):
                for key, fn in list(hooks.items()):
                    if getattr(fn, "__self__", None) is self:
                        del hooks[key]
                        block._forward_hooks_with_kwargs.pop(key, None)
                        block._forward_pre_hooks_with_kwargs.pop(key, None)
                        block._forward_hooks_always_called.pop(key, None)
        self._block = None
        for s in self.slots:
            if s._tie is self:
                s._tie = None

    def pre(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        lead = self._lead()
        if not block.training or lead.drop_prob == 0.0 or torch.jit.is_scripting():
            return None
        placed, spec = pytree.tree_flatten_with_path((args, kwargs))
        places = [pytree.keystr(p) for p, _ in placed]
        leaves = [v for _, v in placed]
        if any(isinstance(v, Tensor) and v.is_meta for v in leaves):
            return None  # dpatch's own probe, recording the block's natural call
        if lead.mode == "batch":
            keep = lead.draw_batch()
            self._calls.append(_Call(lead.batch_scale() if keep else 0.0, keep))
            return None
        at = dict(zip(places, leaves, strict=True))
        hidden = at.get(self.hidden) if self.hidden is not None else _first_tensor(leaves)
        if not isinstance(hidden, Tensor) or hidden.dim() == 0:
            return None  # nothing to draw rows for: the slots draw on their own
        rows = int(hidden.shape[0])
        if self.skip and self.whole_layer and self.batched is not None:
            k = keep_count(rows, lead.drop_prob)
            if k > 0:
                index = torch.randperm(rows, device=hidden.device)[:k]
                scale = rows / k if lead.scaling == "inverted" else 1.0
                self._calls.append(_Call(scale, True, index, hidden, rows))
                gathered = [
                    _rows(v, index) if self._gathers(place, v, rows) else v
                    for place, v in zip(places, leaves, strict=True)
                ]
                new_args, new_kwargs = pytree.tree_unflatten(gathered, spec)
                return new_args, new_kwargs
        factor = torch.empty(rows, device=hidden.device).bernoulli_(1.0 - lead.drop_prob)
        if lead.scaling == "inverted" and lead.drop_prob < 1.0:
            factor.mul_(1.0 / (1.0 - lead.drop_prob))
        self._calls.append(_Call(factor))
        return None

    def _gathers(self, place: str, value: Any, rows: int) -> bool:
        """Whether an argument is per-sample: as the probes told, or, for one they saw as
        no tensor (a mask built only for padded batches), by its first dimension."""
        if not _per_sample(value, rows) or place in self.shared:
            return False
        return self.batched is None or place in self.batched or place not in self.seen

    def post(
        self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if not self._calls:
            return None
        call = self._calls.pop()
        if call.index is None or call.hidden is None:
            return None
        return _put_back(output, call)

    # -- what the slots ask ----------------------------------------------------------------
    def keep(self) -> bool:
        """The batch-mode decision of the call in flight."""
        return self._calls[-1].keep

    def apply(self, x: Tensor, residual: Tensor | None, alpha: float) -> Tensor:
        """A slot's output under the block's decision: ``residual + alpha * factor * x``."""
        factor = self._calls[-1].factor
        if isinstance(factor, float):
            if residual is None:
                return x * (alpha * factor)
            return torch.add(residual, x, alpha=alpha * factor)
        f = factor.view((factor.shape[0],) + (1,) * (x.dim() - 1)).to(x.dtype)
        if residual is None:
            return x * f * alpha if alpha != 1.0 else x * f
        return torch.addcmul(residual, x, f, value=alpha)


def _first_tensor(leaves: Sequence[Any]) -> Tensor | None:
    return next((v for v in leaves if isinstance(v, Tensor)), None)


def _per_sample(value: Any, rows: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and int(value.shape[0]) == rows


def _rows(value: Tensor, index: Tensor) -> Tensor:
    return value.index_select(0, index)


def _put_back(output: Any, call: _Call) -> Any:
    """The block's output on every row: the computed rows from ``output``, the others as
    they came in (a dropped row skips the whole block)."""
    assert call.index is not None and call.hidden is not None
    if isinstance(output, Tensor):
        return torch.index_copy(call.hidden, 0, call.index, output.to(call.hidden.dtype))
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        rest = output[1:]
        k = int(call.index.shape[0])
        if any(isinstance(v, Tensor) and v.dim() > 0 and int(v.shape[0]) == k for v in rest):
            raise DPatchError(
                "a tied block skipping its whole layer returned per-sample values besides "
                "its hidden states (attention weights, a cache); they exist for the "
                "computed rows only: train with output_attentions/use_cache off, or pass "
                "skip=False (or tie='branch')"
            )
        first = torch.index_copy(call.hidden, 0, call.index, output[0].to(call.hidden.dtype))
        return type(output)([first, *rest]) if isinstance(output, list) else (first, *rest)
    raise DPatchError(
        f"a tied block skipping its whole layer returned a {type(output).__name__}, not its "
        "hidden states: pass skip=False (or tie='branch')"
    )
