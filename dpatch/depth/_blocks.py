"""Helpers of :mod:`dpatch.prune` and :mod:`dpatch.sensitivity`: rewriting chosen blocks
with a given set of pruned branches (keeping every slot's settings), and removing one branch
for a while.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from dpatch.analysis import Analysis, BlockSites, Call, Site, run_graph_meta, slot_settings
from dpatch.droppath import DropPath
from dpatch.errors import TraceError, first_line
from dpatch.marks import block_meta
from dpatch.patching import configure_slot, second_probe
from dpatch.rewrite import RewriteCache, rewrite_block, unpatch_block

__all__ = [
    "Removed",
    "Taken",
    "rebuild_blocks",
    "removable",
    "removed_branch",
    "take_apart",
]


@dataclass(frozen=True)
class Taken:
    """A block taken apart for a new rewrite: what it had before.

    Attributes:
        slots: its dpatch DropPath per slot attribute (None: it was not rewritten).
        pruned: its pruned slot attributes.
        skip: it was rewritten with compute-skipping on.
        coverage: the coverage its sites were chosen under.
    """

    slots: dict[str, DropPath] | None
    pruned: frozenset[str]
    skip: bool
    coverage: str = "slots"


def take_apart(blocks: Sequence[BlockSites]) -> dict[str, Taken]:
    """Undo the rewrite of ``blocks`` (by path), remembering their slots and pruning, so
    they can be traced and rewritten again with :func:`rebuild_blocks`."""
    out: dict[str, Taken] = {}
    for b in blocks:
        meta = block_meta(b.module)
        if meta is None:
            out[b.path] = Taken(None, frozenset(), False, b.coverage)
            continue
        slots = {s.attr: getattr(b.module, s.attr) for s in meta.sites}
        skip = any(s.skippable for s in meta.sites)
        out[b.path] = Taken(slots, frozenset(meta.pruned), skip, meta.coverage)
        unpatch_block(b.module)
    return out


def _slots_for(b: BlockSites, taken: Taken) -> dict[str, DropPath]:
    """Each site's DropPath: the one it had, or a new one with the settings of the model's
    own slot (an empty slot or a graph site: rate 0)."""
    slots = dict(taken.slots or {})
    for s in b.sites:
        if s.attr in slots:
            continue
        existing = b.module._modules.get(s.attr)
        if isinstance(existing, DropPath):
            slots[s.attr] = existing
            continue
        dp = DropPath()
        configure_slot(dp, slot_settings(existing))
        dp.train(b.module.training)
        slots[s.attr] = dp
    return slots


def rebuild_blocks(
    model: nn.Module,
    an: Analysis,
    wanted: Mapping[str, frozenset[str]],
    taken: Mapping[str, Taken],
) -> dict[str, str]:
    """Rewrite each block ``wanted`` names (by path, traced in ``an``) with those slot
    attributes pruned; returns the blocks that could not be rewritten, with why (they are
    left with their own forward)."""
    blocks = {b.path: b for b in an.blocks}
    cache = RewriteCache()
    skip_inputs: dict[int, Call] | None = None
    failed: dict[str, str] = {}
    for path, pruned in wanted.items():
        b = blocks.get(path)
        if b is None or b.traced is None:
            failed[path] = "it was not traced"
            continue
        before = taken.get(path, Taken(None, frozenset(), False))
        slots = _slots_for(b, before)
        env_alt: dict[fx.Node, Any] | None = None
        if before.skip:
            if skip_inputs is None:
                second = second_probe(model, an)  # ran when the block got its skipping form
                skip_inputs = second if isinstance(second, dict) else {}
            call = skip_inputs.get(id(b.module))
            try:
                env_alt = run_graph_meta(b.module, b.traced, call) if call else None
            except Exception:  # only a hint for skip planning (as in inject)
                env_alt = None
        try:
            meta = rewrite_block(
                b,
                slots,
                skip=before.skip,
                env_alt=env_alt,
                cache=cache,
                validate_inputs=an.inputs.get(id(b.module)),
                pruned=pruned,
            )
        except (TraceError, fx.proxy.TraceError, RuntimeError, TypeError, ValueError) as exc:
            failed[path] = first_line(exc, None)
            continue
        for ps in meta.sites:
            slots[ps.attr].skip = before.skip and ps.skippable
    return failed


# --------------------------------------------------------------------------- removing
class Removed(nn.Module):
    """Stands in for a slot while its branch is removed: the fused form
    ``slot(branch, residual)`` returns (a copy of) the residual, the plain form
    ``slot(branch)`` returns zeros."""

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None = None,
        alpha: float = 1.0,
        branch_first: bool = False,
    ) -> Tensor:
        # A copy: the addition it stands for made a new tensor, which the block may write.
        return torch.zeros_like(x) if residual is None else residual.clone()

    def skips(self) -> bool:
        """Never the compute-skipping path (see :data:`dpatch.rewrite._skip.SITE_TEMPLATE`)."""
        return False


def removable(site: Site, sites: Sequence[Site]) -> str:
    """Why a site's branch cannot be removed for a measurement ('' when it can)."""
    if site.pruned:
        return "pruned already"
    if not site.residual:
        return "its slot drops a value that is not a residual branch"
    if site.fused:
        return ""
    if site.kind != "native":
        return "its block could not be rewritten, so the branch cannot be removed"
    if any(o.slot == site.slot and o is not site for o in sites):
        return f"its slot {site.slot} also serves another branch"
    return ""


@contextmanager
def removed_branch(model: nn.Module, site: Site) -> Iterator[None]:
    """The model with ``site``'s branch removed (its slot swapped for :class:`Removed`)."""
    parent_path, _, attr = site.slot.rpartition(".")
    parent = model.get_submodule(parent_path)
    had_module = attr in parent._modules
    original = getattr(parent, attr, None)
    if not had_module and attr in parent.__dict__:
        del parent.__dict__[attr]  # timm's ``drop_path = None``
    setattr(parent, attr, Removed())
    try:
        yield
    finally:
        del parent._modules[attr]
        if had_module:
            parent._modules[attr] = original
        else:
            object.__setattr__(parent, attr, original)
