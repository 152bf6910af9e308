"""What a patch keeps and what it changed, site by site: ``retune`` keeps each site's mode,
scaling, skipping and seed unless told otherwise, and its report lists every change."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from dpatch.analysis import Site
from dpatch.droppath import DropPath
from dpatch.patching._listed import module_or_none
from dpatch.patching._results import Change

__all__ = ["SETTINGS", "changes", "common", "current_seed"]

#: The per-site settings a patch sets and a report compares (``PatchReport.changes``).
SETTINGS: tuple[str, ...] = ("rate", "mode", "scaling", "skip", "fused")


def current_seed(model: nn.Module, site: Site, index: int) -> int:
    """The batch-mode seed a site's slot has now (``inject``'s default where it has none)."""
    slot = module_or_none(model, site.slot)
    seed = slot.seed if isinstance(slot, DropPath) else None
    return index if seed is None else int(seed)


def common(values: Iterable[str], default: str) -> str:
    """The one value every site has, ``"mixed"``, or ``default`` when there is no site."""
    distinct = set(values)
    if not distinct:
        return default
    return distinct.pop() if len(distinct) == 1 else "mixed"


def changes(before: Mapping[str, Site], after: Sequence[Site]) -> tuple[Change, ...]:
    """Every setting (``SETTINGS``) that differs between a site before and after."""
    return tuple(
        Change(s.name, name, getattr(before[s.name], name), getattr(s, name))
        for s in after
        if s.name in before
        for name in SETTINGS
        if getattr(before[s.name], name) != getattr(s, name)
    )
