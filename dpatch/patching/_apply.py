"""Applying settings to one block or slot: rewrite it, update it, or fall back.

:func:`dpatch.patching.inject` decides what every site gets (a :class:`SlotSettings`); this
module makes one block or loose slot carry it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from dpatch.analysis import (
    Analysis,
    BlockSites,
    Call,
    Site,
    SlotSettings,
    probe,
    run_graph_meta,
)
from dpatch.droppath import DropPath
from dpatch.errors import ProbeError, TraceError, first_line
from dpatch.marks import block_meta, has_original_slot, set_original_slot
from dpatch.patching._results import Skipped
from dpatch.ranks import RankCheck
from dpatch.rewrite import RewriteCache, rewrite_block, unpatch_block

__all__ = [
    "apply_block",
    "attach_rank_check",
    "configure_slot",
    "second_probe",
    "set_slot",
    "unpatch_to_redo",
]


def configure_slot(dp: DropPath, s: SlotSettings) -> None:
    """Give a dpatch DropPath these settings (its host generator restarts on a new seed)."""
    dp.drop_prob = s.rate
    dp.mode = s.mode
    dp.scaling = s.scaling
    dp.skip = s.skip
    seed = s.seed if s.mode == "batch" else None
    if seed != dp.seed:
        dp.seed = seed
        dp._generator = None


def attach_rank_check(model: nn.Module, sites: Sequence[Site]) -> None:
    """Give the slots of ``sites`` one shared :class:`RankCheck` (a new one: a patch may
    have changed modes and seeds, so the ranks are compared again at the next step)."""
    slots: list[tuple[str, DropPath]] = []
    for s in sites:
        try:
            dp = model.get_submodule(s.slot) if s.slot else None
        except AttributeError:
            dp = None
        if isinstance(dp, DropPath):
            slots.append((s.name, dp))
    check = RankCheck(slots)
    for _, dp in slots:
        dp._ranks = check


def _make_slot(s: SlotSettings) -> DropPath:
    dp = DropPath()
    configure_slot(dp, s)
    return dp


def set_slot(model: nn.Module, path: str, s: SlotSettings) -> None:
    """Give the slot at ``path`` these settings, replacing a timm/torchvision/Identity/None
    slot by a dpatch DropPath that remembers it (for :func:`dpatch.strip`)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)  # "" is the model itself
    current = getattr(parent, attr)
    if isinstance(current, DropPath):
        configure_slot(current, s)
        return
    dp = _make_slot(s)
    dp.train(parent.training if current is None else current.training)
    set_original_slot(dp, current)
    if current is None:
        del parent.__dict__[attr]  # timm's ``drop_path = None``
    setattr(parent, attr, dp)


def unpatch_to_redo(model: nn.Module, *, skip: bool, coverage: str) -> int:
    """Restore the blocks a patch must rewrite anew: rewritten without the skipping form
    when skipping is asked for, or under another coverage (other sites). Returns how
    many."""
    restored = 0
    for mod in model.modules():
        meta = block_meta(mod)
        if meta is None or meta.pruned:  # redoing a pruned block would lose its pruning
            continue
        if (skip and meta.rewritten_without_skip) or meta.coverage != coverage:
            unpatch_block(mod)
            restored += 1
    return restored


def second_probe(model: nn.Module, an: Analysis) -> dict[int, Call] | str:
    """Block inputs at one more row than the example, to tell batched tensors from shared
    ones (skip planning); or why the model does not run there (a video model that folds
    frames into the batch), in which case its branches cannot run on a subset of rows."""
    first = next((v for v in an.example.values if isinstance(v, torch.Tensor) and v.dim()), None)
    batch = 3 if first is None else int(first.shape[0]) + 1
    try:
        return probe(model, an.example.with_batch(batch)).inputs
    except ProbeError as exc:
        return (
            f"the model does not run at batch {batch} ({exc.failure[:120]}), so its "
            "branches cannot run on a subset of rows; masks instead"
        )


def apply_block(
    b: BlockSites,
    settings: Mapping[str, SlotSettings],
    skip: bool,
    skip_inputs: dict[int, Call] | None,
    cache: RewriteCache,
    an: Analysis,
) -> list[Skipped]:
    """Rewrite (or update) one block; fall back to slot replacement when it cannot be.

    ``settings`` maps each site's name to what it gets (``skip`` where the block allows).
    Returns what could not be applied.
    """
    mod = b.module
    meta = block_meta(mod)
    notes: list[Skipped] = []
    if meta is not None:  # rewritten earlier: only settings change, each site's own skip
        for ps in meta.sites:
            name = b.slot_name(ps.attr)
            wants = settings[name].skip
            configure_slot(
                getattr(mod, ps.attr), _with_skip(settings[name], wants and ps.skippable)
            )
            if wants and not ps.skippable:
                notes.append(Skipped(name, f"skip unavailable: {ps.skip_reason}"))
        return notes

    slots: dict[str, DropPath] = {}
    for s in b.sites:
        wanted = _with_skip(settings[b.slot_name(s.attr)], False)
        existing = mod._modules.get(s.attr)
        dp = existing if isinstance(existing, DropPath) else _make_slot(wanted)
        configure_slot(dp, wanted)
        dp.train(mod.training)
        slots[s.attr] = dp
    env_alt = None
    if skip and skip_inputs is not None and id(mod) in skip_inputs and b.traced is not None:
        try:
            env_alt = run_graph_meta(mod, b.traced, skip_inputs[id(mod)])
        except Exception:  # only a hint for skip planning; without it nothing is gathered
            env_alt = None
    try:
        new_meta = rewrite_block(
            b,
            slots,
            skip=skip,
            env_alt=env_alt,
            cache=cache,
            validate_inputs=an.inputs.get(id(mod)),
        )
    except (TraceError, fx.proxy.TraceError, RuntimeError, TypeError, ValueError) as exc:
        # torch's argument errors run to many lines
        return _fallback(b, settings, first_line(exc, None), skip)
    for ps in new_meta.sites:
        wants = skip and settings[b.slot_name(ps.attr)].skip
        slots[ps.attr].skip = wants and ps.skippable
        if wants and not ps.skippable:
            notes.append(Skipped(b.slot_name(ps.attr), f"skip unavailable: {ps.skip_reason}"))
    return notes


def _with_skip(s: SlotSettings, skip: bool) -> SlotSettings:
    return SlotSettings(s.rate, s.mode, s.scaling, s.seed, skip)


def _fallback(
    b: BlockSites, settings: Mapping[str, SlotSettings], why: str, skip: bool
) -> list[Skipped]:
    """A block that cannot be rewritten keeps its forward: native slots are swapped in place
    (unfused), graph sites are reported as skipped."""
    notes: list[Skipped] = []
    mod = b.module
    for s in b.sites:
        name = b.slot_name(s.attr)
        if s.kind == "native" and s.attr != s.origin:  # second use of a shared slot
            notes.append(Skipped(name, f"shares {s.origin} (block could not be rewritten: {why})"))
            continue
        is_none_slot = s.attr not in mod._modules and mod.__dict__.get(s.attr, 0) is None
        if s.kind != "native" or (s.attr not in mod._modules and not is_none_slot):
            notes.append(Skipped(name, f"not patched: {why}"))
            continue
        set_slot(mod, s.attr, _with_skip(settings[name], False))  # also fills a None slot
        notes.append(Skipped(name, f"unfused (block could not be rewritten: {why})"))
    if skip:
        notes += [
            Skipped(b.slot_name(s.attr), "skip needs a rewritten block; this site masks")
            for s in b.sites
        ]
    return notes


def restore_slots(model: nn.Module) -> int:
    """Put every model slot a dpatch DropPath replaced back; returns how many."""
    from dpatch.marks import clear_original_slot, original_slot

    restored = 0
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if isinstance(child, DropPath) and has_original_slot(child):
                original = original_slot(child)
                clear_original_slot(child)
                del parent._modules[attr]
                if original is None:
                    object.__setattr__(parent, attr, None)
                else:
                    setattr(parent, attr, original)
                restored += 1
    return restored
