"""Finding residual sites: native DropPath slots and residual additions found by tracing.

Read-only: nothing here changes the model (hooks are added and removed, traces work on
shallow copies). The public result is a list of frozen :class:`Site`; :func:`analyze`
returns the richer :class:`Analysis` that :mod:`dpatch.patching` and :mod:`dpatch.rewrite` use.

How a site is found (each step in its own module):

1. *Probe* (:mod:`dpatch.analysis._probe`): one forward pass on the meta device records which
   modules run, in which order, and with which inputs.
2. *Trace* (:mod:`dpatch.analysis._trace`): each module that ran and has children is traced on its
   own with torch.fx, children as leaves, and the graph runs on the recorded meta inputs to
   learn every value's shape.
3. *Classify* (:mod:`dpatch.analysis._residual`): which additions are residual, and the rule that a
   model's native slots alone define its sites when it has any.
4. *Slots* (:mod:`dpatch.analysis._slots`): each residual addition gets the attribute that holds (or
   will hold) its DropPath; native slots that run outside traced blocks are taken at their
   word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from dpatch.analysis._analyze import Analysis, analyze, qualify
from dpatch.analysis._slots import slot_settings
from dpatch.droppath import DropPath
from dpatch.marks import block_meta

__all__ = ["Site", "find_sites", "site_list"]


@dataclass(frozen=True)
class Site:
    """One residual branch and the stochastic depth on it.

    Attributes:
        path: qualified name of the module whose forward adds the branch ("" for the root).
        branch: name of the branch inside that module: its slot attribute (``drop_path1``)
            or, for a slot nested deeper, the slot's path relative to ``path``.
        block: 0-based depth index of the owning block in forward execution order.
        kind: ``"native"`` (a timm/torchvision/dpatch slot the model author placed) or
            ``"graph"`` (a residual addition found by tracing).
        rate: current drop probability.
        mode: ``"row"`` or ``"batch"``.
        scaling: ``"inverted"``, ``"expected"`` or ``"none"``.
        slot: qualified name of the module that applies the drop (may not exist yet on an
            unpatched model: a ``None`` slot or a graph site).
        fused: the residual addition runs through dpatch's fused ``drop_add``.
        skip: compute-skipping is on for this site.
        origin: for native sites, the model's own slot this site came from (a slot one
            module shared by two branches is the origin of both); "" for graph sites.
        residual: False for a native slot its model applies to something other than a
            residual branch (it drops that whole value; never fused or skipped).
        pruned: the branch was removed (:func:`dpatch.prune`): the block returns its
            shortcut and never computes the branch.
        tie: ``"branch"`` (its own decision) or ``"block"`` (one decision per sample for
            every branch of its block, :mod:`dpatch.tie`).
    """

    path: str
    branch: str
    block: int
    kind: str
    rate: float
    mode: str = "row"
    scaling: str = "inverted"
    slot: str = ""
    fused: bool = False
    skip: bool = False
    origin: str = ""
    residual: bool = True
    pruned: bool = False
    tie: str = "branch"

    @property
    def name(self) -> str:
        """``path.branch``, the site's unique name in the model."""
        return qualify(self.path, self.branch)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (used by manifests and ``--json`` output)."""
        return {
            "path": self.path,
            "branch": self.branch,
            "block": self.block,
            "kind": self.kind,
            "rate": self.rate,
            "mode": self.mode,
            "scaling": self.scaling,
            "slot": self.slot,
            "fused": self.fused,
            "skip": self.skip,
            "origin": self.origin,
            "residual": self.residual,
            "pruned": self.pruned,
            "tie": self.tie,
        }


# --------------------------------------------------------------------------- public sites
@dataclass(frozen=True)
class _Found:
    """A site before blocks are numbered."""

    owner: str  # the module whose forward adds the branch
    branch: str
    slot: str
    kind: str
    order: int  # the owner's first-call order
    in_block: bool  # on a traced residual addition (can be fused)
    origin: str
    residual: bool = True


def _get_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _is_rewritten(model: nn.Module, path: str) -> bool:
    mod = _get_or_none(model, path)
    return mod is not None and block_meta(mod) is not None


def _is_pruned(model: nn.Module, path: str, attr: str) -> bool:
    mod = _get_or_none(model, path)
    meta = block_meta(mod) if mod is not None else None
    return meta is not None and any(s.attr == attr and s.pruned for s in meta.sites)


def site_list(an: Analysis) -> list[Site]:
    """The public sites of an analysis, numbered by block in forward order, with the
    settings their slots hold now."""
    found = [
        _Found(
            b.path,
            s.attr,
            b.slot_name(s.attr),
            s.kind,
            b.order,
            True,
            qualify(b.path, s.origin) if s.origin else "",
        )
        for b in an.blocks
        for s in b.sites
    ]
    found += [
        _Found(
            s.owner_path,
            s.slot_path[len(s.owner_path) + 1 :] if s.owner_path else s.slot_path,
            s.slot_path,
            "native",
            s.order,
            False,
            s.slot_path,
            s.residual,
        )
        for s in an.loose
    ]
    # Owners nested in another owner (an HF output module inside its layer) share its block.
    owners = sorted({(f.order, f.owner) for f in found})
    owner_paths = [p for _, p in owners]
    group: dict[str, str] = {}
    for p in owner_paths:
        outer = [q for q in owner_paths if q and p.startswith(q + ".")]
        group[p] = min(outer, key=len) if outer else p
    order_of = {p: o for o, p in owners}
    heads = sorted({group[p] for p in owner_paths}, key=lambda p: order_of[p])
    block_index = {h: i for i, h in enumerate(heads)}

    model = an.model
    sites: list[Site] = []
    for f in found:
        slot = f.slot
        module = _get_or_none(model, slot)
        rewritten = _is_rewritten(model, f.owner)
        if module is None and f.origin and not rewritten:
            # A shared slot in a block that could not be rewritten: both branches use
            # the model's one module.
            slot, module = f.origin, _get_or_none(model, f.origin)
        settings = slot_settings(module)
        fused = f.in_block and rewritten
        sites.append(
            Site(
                path=f.owner,
                branch=f.branch,
                block=block_index[group[f.owner]],
                kind=f.kind,
                rate=settings.rate,
                mode=settings.mode,
                scaling=settings.scaling,
                slot=slot,
                fused=fused,
                skip=isinstance(module, DropPath) and module.skip and f.in_block,
                origin=f.origin,
                residual=f.residual,
                pruned=f.in_block and rewritten and _is_pruned(model, f.owner, f.branch),
                tie="block"
                if isinstance(module, DropPath) and module._tie is not None
                else "branch",
            )
        )
    # Stable: by block, then by the order the entries were found (graph order in a block).
    return sorted(sites, key=lambda s: s.block)


def find_sites(
    model: nn.Module, example_inputs: Sequence[Any] | None = None, coverage: str = "slots"
) -> list[Site]:
    """Every residual site of ``model`` with its current rate, in forward order. Read-only.

    Args:
        model: any ``nn.Module``.
        example_inputs: positional inputs for one forward pass (shapes and dtypes only
            matter: they run on the meta device). Default: inferred from the model (its
            library's metadata, else its first layer; see the README).
        coverage: ``"slots"`` (a model's native slots alone when it has any) or ``"all"``
            (those plus every residual addition without a slot).

    Raises:
        ProbeError: the model runs on no input; pass ``example_inputs``.
    """
    return site_list(analyze(model, example_inputs, coverage))
