"""Tying a patched model's blocks: the slots of each block share one :class:`dpatch.tie.Tie`,
hooked on the block, which says from two probes which call arguments are per-sample."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor, nn

from dpatch.analysis import Analysis, Call, Site
from dpatch.droppath import DropPath
from dpatch.patching._listed import module_or_none
from dpatch.patching._results import Skipped
from dpatch.tie import Tie

__all__ = ["tie_blocks", "tied", "untie"]


def untie(model: nn.Module) -> int:
    """Remove every tie (their hooks and the slots' links); returns how many."""
    ties = {id(t): t for t in _ties(model)}
    for tie in ties.values():
        tie.detach()
    return len(ties)


def tied(model: nn.Module) -> Tie | None:
    """A tie of ``model`` (None when it has none): what an earlier patch tied."""
    return next(_ties(model), None)


def _ties(model: nn.Module) -> Iterator[Tie]:
    for m in model.modules():
        if isinstance(m, DropPath) and isinstance(m._tie, Tie):
            yield m._tie


def tie_blocks(
    model: nn.Module,
    an: Analysis,
    sites: Sequence[Site],
    *,
    skip: bool,
    skip_inputs: dict[int, Call] | None,
    block: bool = True,
) -> tuple[list[Skipped], set[str]]:
    """Give the slots of every block one decision; with ``skip`` in row mode, the whole
    layer runs on the kept rows where its call allows (its slots then say ``skip``, whether
    or not each branch could skip on its own). Returns what could not be tied or skipped,
    and the sites whose whole layer skips."""
    untie(model)
    notes: list[Skipped] = []
    whole: set[str] = set()
    if not block:
        return notes, whole
    by_block: dict[int, list[Site]] = {}
    for s in sites:
        if not s.pruned:
            by_block.setdefault(s.block, []).append(s)
    rows = _batch(an)
    for group in by_block.values():
        head_path = min((s.path for s in group), key=len)  # the block's outermost owner
        head = module_or_none(model, head_path)
        slots = [module_or_none(model, s.slot) for s in group]
        if head is None or not all(isinstance(dp, DropPath) for dp in slots):
            notes.append(Skipped(head_path, "not tied: a branch of this block has no slot"))
            continue
        batched, shared, hidden, reason = _per_sample(
            an.inputs.get(id(head)),
            skip_inputs.get(id(head)) if skip_inputs is not None else None,
            rows,
        )
        tie = Tie([dp for dp in slots if isinstance(dp, DropPath)], skip=skip, batched=batched,
                  shared=shared, hidden=hidden, skip_reason=reason)  # fmt: skip
        tie.attach(head)
        if not skip or group[0].mode != "row":
            continue
        if tie.whole_layer:
            for s, dp in zip(group, slots, strict=True):
                assert isinstance(dp, DropPath)
                dp.skip = True
                whole.add(s.name)
        else:
            notes.append(
                Skipped(head_path, f"whole-layer skip unavailable ({reason}); the block's "
                        "branches share one decision and skip one by one where they can")
            )  # fmt: skip
    return notes, whole


def _batch(an: Analysis) -> int | None:
    first = next((v for v in an.example.values if isinstance(v, Tensor) and v.dim()), None)
    return None if first is None else int(first.shape[0])


def _per_sample(
    call: Call | None, other: Call | None, rows: int | None
) -> tuple[frozenset[str] | None, frozenset[str], str | None, str]:
    """Which call values (by place, ``pytree.keystr``) follow the batch size between the
    two probes, which tensors stay shared, which value is the hidden state (the first
    batched one), and why the whole layer cannot skip ('' if it can)."""
    none: frozenset[str] = frozenset()
    if call is None or rows is None:
        return None, none, None, "the block's call was not recorded"
    if other is None:
        return None, none, None, "skip was not asked"
    placed, spec = pytree.tree_flatten_with_path(call)
    leaves2, spec2 = pytree.tree_flatten(other)
    if spec != spec2:
        return None, none, None, "its arguments change structure with the batch size"
    batched: list[str] = []
    shared: set[str] = set()
    for (path, a), b in zip(placed, leaves2, strict=True):
        if _rows_of(a) == rows and _rows_of(b) == rows + 1:
            batched.append(pytree.keystr(path))
        elif isinstance(a, Tensor):
            shared.add(pytree.keystr(path))
    if not batched:
        return None, none, None, "no argument of its call holds the samples"
    return frozenset(batched), frozenset(shared), batched[0], ""


def _rows_of(value: Any) -> int | None:
    return int(value.shape[0]) if isinstance(value, Tensor) and value.dim() > 0 else None
