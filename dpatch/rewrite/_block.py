"""Rewriting one block so each residual branch goes through dpatch's op.

The block stays the same object with the same children, parameters, buffers and state_dict
keys. Only its class changes, to a subclass of its original class whose ``forward`` is
generated from the block's traced graph (:mod:`dpatch.analysis._trace`) with each residual addition
``x + b`` replaced:

- *masking* form: ``self.<slot>(b, x)``, i.e. ``DropPath.forward(branch, residual)``: the
  fused ``drop_add``; eval is exactly ``x + b``.
- *pruned* form (:mod:`dpatch.rewrite._prune_graph`): the addition becomes its shortcut and the
  branch's nodes are left out of the generated forward (never computed, in any mode).
- *skipping* form (:mod:`dpatch.rewrite._skip`): the branch's own nodes move into a generated method
  ``_dpatch_branch<j>`` and the addition becomes ``self._dpatch_site<j>(x, inputs...)``,
  which in training runs the branch on a fixed-size random subset of rows (row mode) or not
  at all (batch mode) and otherwise falls back to the masking form.

The block carries a :class:`PatchMeta` (:mod:`dpatch.marks`) to find its sites again, to
undo the rewrite and to pickle (:mod:`dpatch.rewrite._codegen`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from dpatch.analysis import (
    INPLACE_ADDS,
    BlockSites,
    Call,
    bind_inputs,
    materialise,
    meta_execution,
    real_execution,
    to_meta,
    trace_module,
)
from dpatch.droppath import DropPath
from dpatch.errors import TraceError, first_line
from dpatch.marks import (
    NOT_REQUESTED,
    GeneratedCode,
    PatchedSite,
    PatchMeta,
    block_meta,
    clear_block_meta,
    set_block_meta,
)
from dpatch.rewrite._codegen import generated_class
from dpatch.rewrite._prune_graph import Pruning, referenced
from dpatch.rewrite._skip import (
    SITE_TEMPLATE,
    SkipPlan,
    branch_graph,
    branch_parameters,
    branch_sources,
    is_batched,
    plan_skip,
    prune_dead,
)
from dpatch.rewrite._source import rewrite_source
from dpatch.rows import gather_rows

__all__ = ["RewriteCache", "rewrite_block", "unpatch_block"]


@dataclass(frozen=True)
class _Plan:
    """A generated class for blocks of one trace, and per site whether it can skip."""

    cls: type
    code: GeneratedCode
    skippable: tuple[bool, ...]
    reasons: tuple[str, ...]
    dropped: tuple[tuple[str, ...], ...] = ()


_PlanKey = tuple[int, bool, tuple[str, ...], tuple[str, ...]]
_PRUNED = "pruned"


@dataclass
class RewriteCache:
    """Per-patch memo: blocks that share a trace share one plan (and so one class)."""

    plans: dict[_PlanKey, _Plan | TraceError] = field(default_factory=dict)
    tried: set[type] = field(default_factory=set)  # classes whose trial run passed


@dataclass
class _Edit:
    """A residual addition being rewritten (its nodes move as the graph changes)."""

    node: fx.Node
    shortcut: fx.Node
    branch: fx.Node
    alpha: float
    slot_node: fx.Node | None
    branch_first: bool


def _graph_source(graph: fx.Graph, name: str) -> tuple[str, str, dict[str, Any]]:
    code = graph.python_code(root_module="self")
    return name, code.src.replace("def forward(", f"def {name}(", 1), code.globals


def _replace_add(graph_add: fx.Node, new: fx.Node, mutated: fx.Node | None) -> None:
    """Point every use of an addition (and, for ``a += b``, later uses of ``a``) at ``new``."""
    graph_add.replace_all_uses_with(new)
    if mutated is not None:
        after = False
        for n in list(graph_add.graph.nodes):
            if n is graph_add:
                after = True
                continue
            if after and n is not new and mutated in n.all_input_nodes:
                n.replace_input_with(mutated, new)


def _plan_key(bs: BlockSites, skip: bool, pruned: frozenset[str]) -> _PlanKey:
    assert bs.traced is not None
    return (id(bs.traced.graph), skip, tuple(s.attr for s in bs.sites), tuple(sorted(pruned)))


_SHAPE_BRANCHES = (
    "its forward is rewritten at source level (it branches on shapes or arguments, or "
    "unpacks a child's tuple), which masks (no skipping)"
)


def _generate_source(bs: BlockSites, skip: bool, pruned: frozenset[str]) -> _Plan:
    """Edit the block's own forward source (a trace specialised to one shape)."""
    assert bs.traced is not None
    done = rewrite_source(bs.module, bs.sites, bs.traced.spans, bs.traced.helpers, pruned)
    code = GeneratedCode((("forward", done.source),), in_place=True)
    reason = _SHAPE_BRANCHES if skip else NOT_REQUESTED
    reasons = tuple(_PRUNED if s.attr in pruned else reason for s in bs.sites)
    cls = generated_class(type(bs.module), code)
    return _Plan(cls, code, (False,) * len(bs.sites), reasons, done.dropped)


def _generate(
    bs: BlockSites, skip: bool, env_alt: dict[fx.Node, Any] | None, pruned: frozenset[str]
) -> _Plan:
    """Generate the patched methods for a traced block (``pruned``: slot attributes whose
    branches are left out)."""
    assert bs.traced is not None
    if bs.traced.specialised:
        return _generate_source(bs, skip, pruned)
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(bs.traced.graph, val_map))
    env = {val_map[k]: v for k, v in bs.traced.env.items() if k in val_map}
    alt = {val_map[k]: v for k, v in env_alt.items() if k in val_map} if env_alt else None

    prune_dead(graph)
    edits: list[_Edit] = []
    for s in bs.sites:
        assert s.add is not None
        a = s.add
        slot_node = val_map[a.slot_node] if a.slot_node is not None else None
        edits.append(
            _Edit(
                val_map[a.node],
                val_map[a.shortcut],
                val_map[a.branch],
                a.alpha,
                slot_node,
                a.branch_first,
            )
        )
    # Native slots leave the graph: the slot module is re-entered at the addition.
    for e in edits:
        if e.slot_node is not None:
            slot_in = e.slot_node.args[0]
            assert isinstance(slot_in, fx.Node)
            if e.branch is e.slot_node:
                e.branch = slot_in
            e.slot_node.replace_all_uses_with(slot_in)
            graph.erase_node(e.slot_node)

    functions: dict[str, str] = {}
    globals_: dict[str, Any] = {
        "torch": torch,
        "gather_rows": gather_rows,
        "branch_parameters": branch_parameters,
    }
    skippable: list[bool] = []
    reasons: list[str] = []
    cut = Pruning(bs.module)
    for j, (e, site) in enumerate(zip(edits, bs.sites, strict=True)):
        mutated = e.node.args[0] if e.node.target in INPLACE_ADDS else None
        mutated = mutated if isinstance(mutated, fx.Node) else None
        if site.attr in pruned:
            new = cut.shortcut(e.node, e.shortcut, env, alt)
            _replace_add(e.node, new, mutated)
            _retarget(edits[j + 1 :], e.node, new)
            graph.erase_node(e.node)
            cut.erase(j, e.branch)
            skippable.append(False)
            reasons.append(_PRUNED)
            continue
        plan: SkipPlan | str = (
            plan_skip(e.node, e.shortcut, e.branch, env) if skip else NOT_REQUESTED
        )
        if isinstance(plan, str):
            with graph.inserting_before(e.node):
                args: tuple[Any, ...] = (e.branch, e.shortcut)
                if e.alpha != 1.0:
                    args = (*args, e.alpha)
                kwargs: dict[str, Any] = {"branch_first": True} if e.branch_first else {}
                new = graph.call_module(site.attr, args, kwargs)
            skippable.append(False)
            reasons.append(plan)
        else:
            branch_fn, site_fn = f"_dpatch_branch{j}", f"_dpatch_site{j}"
            name, src, g = _graph_source(branch_graph(plan, e.branch), branch_fn)
            functions[name] = src
            globals_.update(g)
            params = [x.name for x in plan.externals]
            gathered = [
                f"gather_rows({p}, index)" if is_batched(x, env, alt) else p
                for p, x in zip(params, plan.externals, strict=True)
            ]
            modules, tensors = branch_sources(plan)
            functions[site_fn] = SITE_TEMPLATE.format(
                name=site_fn,
                modules=modules,
                tensors=tensors,
                slot=site.attr,
                branch=branch_fn,
                params=", ".join(params),
                gathered=", ".join(gathered),
                alpha=e.alpha,
                first=", branch_first=True" if e.branch_first else "",
            )
            with graph.inserting_before(e.node):
                new = graph.call_module(site_fn, (e.shortcut, *plan.externals))
            skippable.append(True)
            reasons.append("")
            cut.moved |= referenced(plan.nodes)
        env[new] = env.get(e.node)
        if alt is not None:
            alt[new] = alt.get(e.node)
        _replace_add(e.node, new, mutated)
        _retarget(edits[j + 1 :], e.node, new)
        graph.erase_node(e.node)
        if not isinstance(plan, str):
            for n in reversed(plan.nodes):
                if n in plan.moved and not n.users:
                    graph.erase_node(n)

    dropped = cut.finish(graph, len(edits))
    graph.lint()
    name, src, g = _graph_source(graph, "forward")
    functions[name] = src
    globals_.update(g)
    code = GeneratedCode.of(functions, globals_)
    cls = generated_class(type(bs.module), code)
    return _Plan(cls, code, tuple(skippable), tuple(reasons), dropped)


def _retarget(later_edits: list[_Edit], old: fx.Node, new: fx.Node) -> None:
    """A later site may add onto this one's result."""
    for later in later_edits:
        if later.shortcut is old:
            later.shortcut = new
        if later.branch is old:
            later.branch = new


def _plan(
    bs: BlockSites,
    skip: bool,
    env_alt: dict[fx.Node, Any] | None,
    cache: RewriteCache,
    pruned: frozenset[str] = frozenset(),
) -> _Plan:
    """The (shared) plan of a block's class; a failure remembered for its trace is raised."""
    key = _plan_key(bs, skip, pruned)
    hit = cache.plans.get(key)
    if hit is None:
        hit = cache.plans[key] = _generate(bs, skip, env_alt, pruned)
    if isinstance(hit, TraceError):
        raise TraceError(f"the rewritten forward failed a trial run ({hit})")
    return hit


def check_training_invariant(bs: BlockSites) -> None:
    """Raise TraceError when the block's own forward branches on ``self.training``.

    A traced graph fixes Python-level decisions; one that depends on the mode would
    silently keep one mode's behaviour in the other.
    """
    assert bs.traced is not None
    if not bs.traced.reads_training or bs.traced.specialised:
        return  # a source-level rewrite keeps the forward's own ``self.training`` tests
    other = trace_module(
        bs.module, training=not bs.module.training, concrete_args=bs.traced.concrete or None
    )
    if _code_of(other.graph) != _code_of(bs.traced.graph):
        raise TraceError("its forward branches on self.training")


def _code_of(graph: fx.Graph) -> str:
    return graph.python_code(root_module="self").src


def rewrite_block(
    bs: BlockSites,
    slots: dict[str, DropPath],
    *,
    skip: bool,
    env_alt: dict[fx.Node, Any] | None,
    cache: RewriteCache,
    validate_inputs: Call | None = None,
    pruned: frozenset[str] = frozenset(),
) -> PatchMeta:
    """Rewrite one traced block in place so its residual branches go through ``slots``.

    Args:
        bs: the block's analysis (trace, residual adds, slot attribute names).
        slots: the DropPath for each slot attribute (new or reused).
        skip: generate the compute-skipping form where the branch allows it.
        env_alt: node values at a second batch size (tells batched inputs apart).
        cache: plans shared by blocks of one trace, within one patch.
        validate_inputs: a recorded call to run the new forward once on meta.
        pruned: slot attributes whose branches are left out (the block returns their
            shortcut); their slots stay, uncalled.

    Raises:
        TraceError: the block cannot be rewritten faithfully (it is left unchanged).
    """
    assert bs.traced is not None
    module = bs.module
    check_training_invariant(bs)
    plan = _plan(bs, skip, env_alt, cache, pruned)
    # A class tried once (for an identical block) need not be tried again.
    if validate_inputs is not None and plan.cls not in cache.tried and any(plan.skippable):
        bad = _trial_run(module, plan.cls, slots, validate_inputs, skip=True)
        if bad:
            masked = _plan(bs, False, env_alt, cache, pruned)
            reason = f"skip failed a trial run ({bad})"
            reasons = tuple(_PRUNED if r == _PRUNED else reason for r in masked.reasons)
            plan = _Plan(masked.cls, masked.code, masked.skippable, reasons, masked.dropped)
            cache.plans[_plan_key(bs, True, pruned)] = plan
    if validate_inputs is not None and plan.cls not in cache.tried:
        bad = _trial_run(
            module, plan.cls, slots, validate_inputs, skip=False, direct=bs.traced.specialised
        )
        if bad:
            cache.plans[_plan_key(bs, skip, pruned)] = TraceError(bad)
            raise TraceError(f"the rewritten forward failed a trial run ({bad})")
        cache.tried.add(plan.cls)

    replaced: list[tuple[str, Any]] = []
    added: list[str] = []
    for s in bs.sites:
        if s.attr in module._modules:
            replaced.append((s.attr, module._modules[s.attr]))
        elif s.attr in module.__dict__:
            replaced.append((s.attr, module.__dict__[s.attr]))
        else:
            added.append(s.attr)
    meta = PatchMeta(
        orig_cls=type(module),
        sites=tuple(
            PatchedSite(s.attr, s.kind, s.origin, can, why, s.attr in pruned, gone)
            for s, can, why, gone in zip(
                bs.sites, plan.skippable, plan.reasons, plan.dropped, strict=True
            )
        ),
        added_attrs=tuple(added),
        replaced_slots=tuple(replaced),
        consts=tuple(bs.traced.consts),
        code=plan.code,
        coverage=bs.coverage,
        unslotted=tuple(bs.unslotted),
    )
    for name, value in bs.traced.consts.items():
        object.__setattr__(module, name, value)
    for s in bs.sites:
        if s.attr in module.__dict__ and module.__dict__[s.attr] is None:
            del module.__dict__[s.attr]  # a None slot (timm ResNet) becomes a module
        setattr(module, s.attr, slots[s.attr])
    module.__class__ = plan.cls
    set_block_meta(module, meta)
    return meta


def _trial_run(
    module: nn.Module,
    cls: type,
    slots: dict[str, DropPath],
    call: Call,
    *,
    skip: bool,
    direct: bool = False,
) -> str:
    """Run a generated forward once on meta tensors, training with rate 0.5 (so a skipping
    branch really runs on a subset); return an error line or ''. ``direct``: call it with
    the recorded call as it was (a source-level rewrite keeps the signature as written)."""
    trial = copy.copy(module)
    trial.__dict__ = dict(module.__dict__)
    trial._modules = dict(module._modules)
    for attr in slots:
        if attr in trial.__dict__ and trial.__dict__[attr] is None:
            del trial.__dict__[attr]
        trial._modules[attr] = DropPath(0.5, mode="row", skip=skip).train()
    object.__setattr__(trial, "__class__", cls)
    args, kwargs = call
    if not direct:
        args, kwargs = tuple(bind_inputs(module, args, kwargs)), {}
    try:
        with meta_execution(trial):
            trial(*to_meta(args), **to_meta(kwargs))
    except Exception as exc:
        failure = first_line(exc, 160, typed=True)
    else:
        return ""
    # A block that does not run on meta (a mixture of experts routes on values, as the probe
    # found) is tried for real, on random inputs, with copies of its buffers.
    device = next((t.device for t in module.parameters() if not t.is_meta), None)
    if device is None:
        return failure
    try:
        with real_execution(trial):
            trial(*_real(args, device), **_real(kwargs, device))
    except Exception:  # the meta failure says more about a rewrite that is wrong
        return failure
    return ""


def _real(value: Any, device: torch.device) -> Any:
    """Recorded inputs with meta tensors replaced by random ones on ``device``."""
    if isinstance(value, torch.Tensor):
        return materialise(value, device) if value.is_meta else value
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(_real(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _real(v, device) for k, v in value.items()}
    return value


def unpatch_block(module: nn.Module) -> None:
    """Undo :func:`rewrite_block`: original class, original slot values, no added slots."""
    meta = block_meta(module)
    if meta is None:
        return
    for attr in meta.added_attrs:
        delattr(module, attr)
    for attr, value in meta.replaced_slots:
        module._modules.pop(attr, None)
        if value is None:
            object.__setattr__(module, attr, None)
        else:
            setattr(module, attr, value)
    for name in meta.consts:
        module.__dict__.pop(name, None)
    clear_block_meta(module)
    module.__class__ = meta.orig_cls
