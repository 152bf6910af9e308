"""Pruning residual branches for inference: the block returns its shortcut and the branch is
never computed (fairseq's LayerDrop pruning, Huang et al.'s "shallower at test time", for any
model dpatch can rewrite). Whole layers go by their angular distance or Block Influence
(Gromov et al., ShortGPT): every branch of a chosen layer is pruned.

A pruned site stays a site (``Site.pruned``): its block is rewritten with the branch's nodes
left out of the generated forward (:mod:`dpatch.rewrite._prune_graph`). The tensors that only pruned
branches use are found from the block's trace and confirmed by a forward pass on the meta
device; saved files leave them out (:func:`unused_state_keys`), and :func:`dpatch.load`
accepts exactly those keys missing.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from dpatch.analysis import Analysis, BlockSites, Probe, Site, analyze, probe, qualify, site_list
from dpatch.depth._blocks import rebuild_blocks, take_apart
from dpatch.depth._layers import Layer, layers_of
from dpatch.errors import InvalidValueError, ProbeError, UnsupportedSiteError, first_line
from dpatch.marks import block_meta, set_block_meta
from dpatch.patching import Change, PatchReport, Skipped
from dpatch.rewrite import ancestors
from dpatch.settings import LAYER_METRICS, PRUNE_BY

__all__ = [
    "prune",
    "prune_order",
    "unused_state_keys",
]


def _check_request(
    sites: Sequence[str] | None, count: int | None, keep: int | None, by: str, scores: Any | None
) -> None:
    if sum(x is not None for x in (sites, count, keep)) != 1:
        raise InvalidValueError("prune needs exactly one of sites (names), count or keep")
    for name, n in (("count", count), ("keep", keep)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise InvalidValueError(f"{name} must be a whole number >= 0, but got {n!r}")
    if by not in PRUNE_BY:
        raise InvalidValueError(f"unknown by {by!r}; choose one of: {', '.join(PRUNE_BY)}")
    if by in LAYER_METRICS and scores is None:
        raise InvalidValueError(
            f"by={by!r} needs the layers' scores: scores=dpatch.sensitivity(model, inputs, "
            f"metric={by!r}) (or a layer path -> score mapping)"
        )
    if (by in ("sensitivity", *LAYER_METRICS)) != (scores is not None):
        raise InvalidValueError(
            "by='sensitivity' needs scores (a SensitivityReport or a name -> score mapping), "
            "and scores need by='sensitivity', 'angular' or 'bi'"
        )
    metric = getattr(scores, "metric", None)
    if by in LAYER_METRICS and metric is not None and metric != by:
        raise InvalidValueError(
            f"by={by!r} but the scores are {metric!r} scores; measure them with "
            f"metric={by!r}, or pass by='sensitivity'"
        )


def _score_map(scores: Any, sites: Sequence[Site]) -> dict[str, float]:
    raw = scores.scores if hasattr(scores, "scores") else scores
    if not isinstance(raw, Mapping):
        raise InvalidValueError(f"scores must map site names to numbers, got {type(raw).__name__}")
    names = {s.name for s in sites}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise InvalidValueError(
            f"the scores name {len(unknown)} site(s) this model lacks (e.g. {unknown[0]!r}); "
            "were they measured on another model?"
        )
    return {str(k): float(v) for k, v in raw.items()}


def prune_order(sites: Sequence[Site], by: str, scores: Any | None = None) -> list[Site]:
    """The unpruned sites in the order ``prune(count=N)`` takes them (first N are pruned).

    - ``rate``: highest rate first (the branches the schedule trained to be droppable);
    - ``depth``: deepest first;
    - ``every-other``: blocks 1, 3, 5, ... (deepest of them first), then the even blocks
      (deepest first), all sites of a block together: fairseq's advice to keep every other
      layer;
    - ``sensitivity``: least sensitive first (``scores``: a SensitivityReport or mapping;
      sites without a score come last).

    Ties go to the deeper site. ``angular`` and ``bi`` order whole layers, which needs the
    model: :func:`prune` takes them.
    """
    pos = {s.name: i for i, s in enumerate(sites)}
    todo = [s for s in sites if not s.pruned]
    if by == "rate":
        return sorted(todo, key=lambda s: (-s.rate, -pos[s.name]))
    if by == "depth":
        return sorted(todo, key=lambda s: -pos[s.name])
    if by == "every-other":
        blocks = sorted({s.block for s in sites})
        rank = {b: i for i, b in enumerate(blocks)}
        return sorted(todo, key=lambda s: (rank[s.block] % 2 == 0, -s.block, pos[s.name]))
    if by == "sensitivity":
        score = _score_map(scores, sites)
        inf = float("inf")
        return sorted(todo, key=lambda s: (score.get(s.name, inf), -pos[s.name]))
    if by in LAYER_METRICS:
        raise InvalidValueError(
            f"by={by!r} orders whole layers, which needs the model: prune(model, count=N, "
            f"by={by!r}, scores=...)"
        )
    raise InvalidValueError(f"unknown by {by!r}; choose one of: {', '.join(PRUNE_BY)}")


# --------------------------------------------------------------------------- layers
def _layer_scores(
    scores: Any, layers: Sequence[Layer], sites: Sequence[Site], want_layers: bool
) -> dict[str, float] | None:
    """The scores as layer path -> score, or None when they are branch scores (a report per
    branch, or a mapping of site names; ``want_layers`` makes those an error)."""
    per = getattr(scores, "per", None)
    raw = scores.scores if hasattr(scores, "scores") else scores
    if not isinstance(raw, Mapping):
        raise InvalidValueError(f"scores must map names to numbers, got {type(raw).__name__}")
    paths = {layer.path for layer in layers}
    names = {s.name for s in sites}
    branches = per == "branch" or (per is None and raw and set(raw) <= names)
    if branches or (per is None and not want_layers and not set(raw) & paths):
        if want_layers:
            raise InvalidValueError(
                "whole-layer pruning needs one score per layer, but the scores name branches; "
                "measure them with dpatch.sensitivity(model, inputs, metric='angular' or 'bi')"
            )
        return None
    unknown = sorted(set(raw) - paths)
    if unknown:
        known = ", ".join(sorted(paths)[:3]) or "none"
        raise InvalidValueError(
            f"the scores name {len(unknown)} layer(s) this model lacks (e.g. {unknown[0]!r}; "
            f"its layers: {known}, ...); were they measured on another model?"
        )
    return {str(k): float(v) for k, v in raw.items()}


def _chosen_layers(
    layers: Sequence[Layer],
    sites: Sequence[Site],
    score: Mapping[str, float],
    count: int | None,
    keep: int | None,
) -> list[Layer]:
    """The layers ``count`` (or all but ``keep``) takes among the scored ones: lowest score
    first, ties to the deeper layer; layers already pruned whole are not counted, and a
    layer without a score (one that could not be measured) is never chosen."""
    pruned = {s.name for s in sites if s.pruned}
    todo = [layer for layer in layers if not set(layer.sites) <= pruned and layer.path in score]
    order = sorted(todo, key=lambda layer: (score[layer.path], -layer.index))
    if keep is not None:
        if keep > len(order):
            raise InvalidValueError(
                f"cannot keep {keep} layers: the scores rank {len(order)} unpruned layers; "
                f"give a number of at most {len(order)}"
            )
        count = len(order) - keep
    assert count is not None
    if count > len(order):
        gone = sum(1 for layer in layers if set(layer.sites) <= pruned)
        raise InvalidValueError(
            f"cannot prune {count} layers: the scores rank {len(order)} of the model's "
            f"{len(layers)} layers with residual branches"
            + (f" ({gone} pruned already)" if gone else "")
            + f"; give a count of at most {len(order)}"
        )
    return order[:count]


def _chosen(
    all_sites: Sequence[Site],
    names: Sequence[str] | None,
    count: int | None,
    keep: int | None,
    by: str,
    scores: Any | None,
) -> list[Site]:
    by_name = {s.name: s for s in all_sites}
    if names is not None:
        out: list[Site] = []
        for n in names:
            if n not in by_name:
                known = ", ".join(list(by_name)[:3]) or "none"
                raise InvalidValueError(
                    f"no site named {n!r} (the model's sites: {known}, ...); "
                    "list them with dpatch inspect"
                )
            if not by_name[n].pruned and by_name[n] not in out:
                out.append(by_name[n])
        if scores is not None and by not in LAYER_METRICS:
            _score_map(scores, all_sites)
        return out
    order = prune_order(all_sites, by, scores)
    if keep is not None:
        if keep > len(order):
            raise InvalidValueError(
                f"cannot keep {keep} branches: the model has {len(order)} unpruned sites; "
                f"give a number of at most {len(order)}"
            )
        count = len(order) - keep
    assert count is not None
    if count > len(order):
        pruned = len(all_sites) - len(order)
        raise InvalidValueError(
            f"cannot prune {count} branches: the model has {len(all_sites)} sites"
            + (f", {pruned} of them pruned already" if pruned else "")
            + f"; give a count of at most {len(order)}"
        )
    return order[:count]


def _in_block(an: Analysis, site: Site) -> BlockSites:
    """The traced block a site's addition lives in, or an error naming the site."""
    for b in an.blocks:
        if b.path == site.path and any(s.attr == site.branch for s in b.sites):
            return b
    if not site.residual:
        raise UnsupportedSiteError(
            f"cannot prune {site.name}: its slot {site.slot} drops a value that is not a "
            "residual branch, so there is no shortcut to return"
        )
    raise UnsupportedSiteError(
        f"cannot prune {site.name}: its slot {site.slot} is not on a residual addition "
        "dpatch could trace (the forward around it could not be traced), so its block "
        "cannot return the shortcut alone"
    )


def _check_nested(
    an: Analysis, wanted: Mapping[str, frozenset[str]], sites: Sequence[Site]
) -> None:
    """Refuse a pruned branch that holds other sites (they would vanish with it)."""
    for b in an.blocks:
        if b.path not in wanted or b.traced is None:
            continue
        for s in b.sites:
            if s.attr not in wanted[b.path] or s.add is None:
                continue
            only = ancestors(s.add.branch) - ancestors(s.add.shortcut)
            inner = {qualify(b.path, str(n.target)) for n in only if n.op == "call_module"}
            held = [o.name for o in sites if any(o.path.startswith(p + ".") for p in inner)]
            if held:
                raise UnsupportedSiteError(
                    f"cannot prune {b.slot_name(s.attr)}: its branch holds {len(held)} other "
                    f"site(s) (e.g. {held[0]}); prune those by name, or not this one"
                )


def prune(
    model: nn.Module,
    sites: Sequence[str] | None = None,
    *,
    count: int | None = None,
    by: str = "rate",
    scores: Any | None = None,
    inplace: bool = True,
    keep: int | None = None,
    example_inputs: Sequence[Any] | None = None,
) -> PatchReport:
    """Remove residual branches: each pruned block returns its shortcut, in training and in
    eval, and never computes the branch.

    Args:
        model: any model dpatch finds sites in (patched or not; unpatched blocks of pruned
            sites are rewritten, their other sites at their current rates).
        sites: site names (``Site.name``) to prune; or
        count: how many (more) branches to prune, chosen by ``by``; 0 changes nothing; or
        keep: how many unpruned branches to keep (the others are pruned, chosen by ``by``).
            With layer scores both count whole layers (:func:`dpatch.find_layers`).
        by: ``rate``, ``depth``, ``every-other`` or ``sensitivity`` (see :func:`prune_order`);
            ``angular`` or ``bi``: whole layers, lowest score first (every branch of a chosen
            layer is pruned; ties go to the deeper layer).
        scores: for ``by="sensitivity"``: a :class:`~dpatch.SensitivityReport` or a mapping
            from site name to score (lower: less sensitive, pruned first), or from layer path
            to score (whole layers); for ``angular``/``bi``: a report of that metric, or a
            layer path -> score mapping.
        inplace: prune ``model`` itself; else a deep copy (``report.model``).
        example_inputs: inputs for the meta-device probe (default: an image batch).

    Returns:
        A report of the sites (``Site.pruned``), ``changed`` naming the newly pruned ones and
        ``skipped`` saying which tensors of pruned branches stay in saved files, and why.

    Raises:
        InvalidValueError: an unknown site name, a count above the number of sites (or
            layers), bad ``by``/``scores``.
        UnsupportedSiteError: a chosen site's block cannot be rewritten (a native slot not
            on a traced residual addition, a forward that fails the rewrite), or its branch
            holds other sites. The model is left as it was.
    """
    _check_request(sites, count, keep, by, scores)
    if not inplace:
        model = copy.deepcopy(model)
    an = analyze(model, example_inputs)
    before = site_list(an)
    layer_score = None
    layers: list[Layer] = []
    if sites is None and by in ("sensitivity", *LAYER_METRICS):
        layers = layers_of(model, before)
        layer_score = _layer_scores(scores, layers, before, by in LAYER_METRICS)
    if layer_score is not None:
        picked = _chosen_layers(layers, before, layer_score, count, keep)
        names = {n for layer in picked for n in layer.sites}
        chosen = [s for s in before if s.name in names and not s.pruned]
    else:
        chosen = _chosen(before, sites, count, keep, by, scores)
    if not chosen:
        return PatchReport.current(before, model=model)
    blocks: dict[str, BlockSites] = {}
    for s in chosen:
        blocks.setdefault(s.path, _in_block(an, s))
    taken = take_apart(list(blocks.values()))
    coverage = "all" if any(t.coverage == "all" for t in taken.values()) else "slots"
    an2 = analyze(model, an.example, coverage)
    wanted = {p: taken[p].pruned | {s.branch for s in chosen if s.path == p} for p in blocks}
    try:
        _check_nested(an2, wanted, before)
        failed = rebuild_blocks(model, an2, wanted, taken)
        if failed:
            path, why = next(iter(failed.items()))
            first = next(s for s in chosen if s.path == path)
            raise UnsupportedSiteError(
                f"cannot prune {first.name}: its block cannot be rewritten ({why})"
            )
    except Exception:
        _restore(model, an2, blocks, taken)
        raise
    notes = settle_unused(model, an.example)
    return PatchReport.current(
        site_list(an2),
        notes,
        model=model,
        changed=tuple(s.name for s in chosen),
        changes=tuple(Change(s.name, "pruned", False, True) for s in chosen),
    )


def _restore(
    model: nn.Module, an: Analysis, blocks: Mapping[str, BlockSites], taken: Mapping[str, Any]
) -> None:
    """Put the blocks of a failed prune back as they were."""
    from dpatch.rewrite import unpatch_block

    for b in blocks.values():
        unpatch_block(b.module)
    again = {p: t.pruned for p, t in taken.items() if t.slots is not None}
    rebuild_blocks(model, an, again, taken)


# --------------------------------------------------------------------------- tensors
def _tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name each parameter and buffer is registered under (shared ones have several)."""
    names: dict[int, list[str]] = {}
    named: list[tuple[str, Tensor]] = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for n, t in named:
        names.setdefault(id(t), []).append(n)
    return names


def _tensors_of(obj: Any) -> list[Tensor]:
    if isinstance(obj, nn.Module):
        return [*obj.parameters(), *obj.buffers()]
    return [obj] if isinstance(obj, Tensor) else []


def settle_unused(model: nn.Module, example_inputs: Any | None = None) -> list[Skipped]:
    """Confirm, for every block with pruned sites, which children and attributes only pruned
    branches use (recorded as ``PatchMeta.unused``); return why others stay.

    A child is unused when none of its modules runs in a forward pass of the pruned model
    (on the meta device) and none of its tensors is registered under another name.
    """
    try:
        pr: Probe | None = probe(model, example_inputs)
        failed = ""
    except ProbeError as exc:
        pr, failed = None, first_line(exc)
    names = _tensor_names(model)
    notes: list[Skipped] = []
    for path, mod in model.named_modules():
        meta = block_meta(mod)
        if meta is None or not meta.pruned:
            continue
        dropped = sorted({t for s in meta.sites if s.pruned for t in s.dropped})
        unused: list[str] = []
        for t in dropped:
            full = qualify(path, t)
            obj = _resolve(mod, t)
            tensors = _tensors_of(obj)
            if not tensors:
                continue
            why = ""
            if pr is None:
                why = f"the pruned model did not run on the meta device ({failed})"
            elif isinstance(obj, nn.Module) and any(id(m) in pr.order for m in obj.modules()):
                why = "it still runs outside the pruned branch"
            else:
                other = [
                    n
                    for x in tensors
                    for n in names.get(id(x), [])
                    if n != full and not n.startswith(full + ".")
                ]
                if other:
                    why = f"its tensors are also registered as {other[0]}"
            if why:
                notes.append(Skipped(full, f"only a pruned branch calls it, but {why}; it stays"))
            else:
                unused.append(t)
        set_block_meta(mod, dataclasses.replace(meta, unused=tuple(unused)))
    return notes


def _resolve(block: nn.Module, target: str) -> Any:
    obj: Any = block
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def unused_state_keys(model: nn.Module) -> tuple[str, ...]:
    """``state_dict`` keys only pruned branches use (what saved files leave out)."""
    prefixes = [
        qualify(path, t)
        for path, mod in model.named_modules()
        if (meta := block_meta(mod)) is not None
        for t in meta.unused
    ]
    if not prefixes:
        return ()
    return tuple(
        k for k in model.state_dict() if any(k == p or k.startswith(p + ".") for p in prefixes)
    )
