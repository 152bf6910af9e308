"""Rewriting one block so each residual branch goes through dpatch's op.

The block stays the same object with the same children, parameters, buffers and state_dict
keys. Only its class changes, to a subclass of its original class whose ``forward`` is
generated from the block's traced graph (:func:`dpatch.sites.trace_module`) with each
residual addition ``x + b`` replaced:

- *masking* form: ``self.<slot>(b, x)``, i.e. ``DropPath.forward(branch, residual)``: the
  fused ``drop_add``; eval is exactly ``x + b``.
- *skipping* form: the branch's own nodes move into a generated method
  ``_dpatch_branch<j>`` and the addition becomes ``self._dpatch_site<j>(x, inputs...)``,
  which in training runs the branch on a fixed-size random subset of rows (row mode) or not
  at all (batch mode) and otherwise falls back to the masking form.

Generated source is registered with ``linecache`` (as torch.fx does for GraphModule), so
tracebacks, ``inspect`` and TorchScript can read it. The subclass carries a
:class:`PatchMeta` under ``dpatch.sites.PATCH_ATTR`` to find its sites again and to undo it.
"""

from __future__ import annotations

import copy
import hashlib
import linecache
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from dpatch.droppath import DropPath, gather_rows
from dpatch.errors import TraceError
from dpatch.sites import (
    INPLACE_ADDS,
    PATCH_ATTR,
    BlockSites,
    MetaMode,
    ResidualAdd,
    bind_inputs,
    on_meta,
    to_meta,
    trace_module,
)

__all__ = ["PatchMeta", "rewrite_block", "unpatch_block"]


@dataclass(frozen=True)
class PatchMeta:
    """What dpatch did to one block's class (stored on the generated subclass)."""

    orig_cls: type
    slot_attrs: tuple[str, ...]
    kinds: tuple[str, ...]
    origins: tuple[str, ...]
    skippable: tuple[bool, ...]
    skip_reasons: tuple[str, ...]
    added_attrs: tuple[str, ...]  # DropPath children dpatch created (graph sites, shared slots)
    replaced_slots: tuple[tuple[str, Any], ...]  # (attr, original value) of native slots
    consts: tuple[str, ...]  # tensor constants the tracer lifted onto the block


# Shape-only operations a branch may recompute on its gathered inputs.
_SHAPE_METHODS = frozenset({"size", "dim", "numel"})
_SHAPE_FUNCTIONS = frozenset(
    {
        operator.getitem,
        getattr,
        operator.add,
        operator.sub,
        operator.mul,
        operator.floordiv,
        operator.mod,
        operator.neg,
    }
)


def _is_shape_op(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        return node.target in _SHAPE_FUNCTIONS
    return False


# --------------------------------------------------------------------------- compiling
def _compile_function(src: str, globals_: dict[str, Any], name: str) -> Callable[..., Any]:
    """Exec generated source; register it in linecache so inspect/TorchScript can read it."""
    key = f"<dpatch-{hashlib.sha1(src.encode()).hexdigest()[:16]}>"
    linecache.cache[key] = (len(src), None, src.splitlines(keepends=True), key)
    namespace: dict[str, Any] = dict(globals_)
    exec(compile(src, key, "exec"), namespace)
    fn: Callable[..., Any] = namespace[name]
    return fn


def _graph_source(graph: fx.Graph, name: str) -> tuple[str, dict[str, Any], str]:
    code = graph.python_code(root_module="self")
    return code.src.replace("def forward(", f"def {name}(", 1), code.globals, name


_SITE_TEMPLATE = """
def {name}(self, residual, {params}):
    slot = self.{slot}
    if not torch.jit.is_scripting():
        if slot.skips():
            if slot.mode == "batch":
                if not torch.compiler.is_compiling():
                    if not slot.keep_batch():
                        return residual.clone()
                    return torch.add(residual, self.{branch}({params}), alpha=slot.batch_scale() * {alpha!r})
            else:
                index = slot.keep_indices(residual)
                return slot.scatter_add(residual, self.{branch}({gathered}), index, {alpha!r})
    return slot(self.{branch}({params}), residual, {alpha!r})
"""


# --------------------------------------------------------------------------- graph surgery
def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _branch_nodes(add: fx.Node, shortcut: fx.Node, branch: fx.Node) -> set[fx.Node]:
    """Nodes only the branch needs: movable into a separate function. Empty if none."""
    cand = {
        n
        for n in _ancestors(branch) - _ancestors(shortcut)
        if n.op not in ("placeholder", "get_attr", "output")
    }
    changed = True
    while changed:  # drop nodes whose value is also needed outside the branch
        changed = False
        for n in list(cand):
            if any(u not in cand and u is not add for u in n.users):
                cand.discard(n)
                changed = True
    return cand if branch in cand else set()


def _shape_chain(ext: fx.Node, env: dict[fx.Node, Any]) -> set[fx.Node] | None:
    """Shape computations between a non-tensor input of a branch and tensor values."""
    chain: set[fx.Node] = set()
    stack = [ext]
    while stack:
        n = stack.pop()
        if n in chain:
            continue
        if isinstance(env.get(n), Tensor):
            continue  # a tensor root: the chain starts here
        if n.op in ("placeholder", "get_attr") or not _is_shape_op(n):
            return None
        chain.add(n)
        stack.extend(n.all_input_nodes)
    return chain


@dataclass
class _SkipPlan:
    nodes: list[fx.Node]  # branch nodes (incl. cloned shape chains), graph order
    externals: list[fx.Node]  # inputs of the branch from the rest of the graph
    moved: set[fx.Node]  # nodes that leave the main graph


def _plan_skip(
    add: fx.Node, shortcut: fx.Node, branch: fx.Node, env: dict[fx.Node, Any]
) -> tuple[_SkipPlan | None, str]:
    moved = _branch_nodes(add, shortcut, branch)
    if not moved:
        return None, "the branch output or its inputs are used elsewhere in the block"
    nodes = set(moved)
    for _ in range(8):  # pull shape chains of batch-sized ints into the branch
        externals = {a for n in nodes for a in n.all_input_nodes if a not in nodes}
        grew = False
        for e in externals:
            if e.op in ("placeholder", "get_attr") or isinstance(env.get(e), Tensor):
                continue
            chain = _shape_chain(e, env)
            if chain is None:
                return None, f"the branch uses {e.name!r}, computed outside it from the batch"
            if not chain <= nodes:
                nodes |= chain
                grew = True
        if not grew:
            break
    order = {n: i for i, n in enumerate(add.graph.nodes)}
    externals_list = sorted(
        {a for n in nodes for a in n.all_input_nodes if a not in nodes}, key=order.__getitem__
    )
    return _SkipPlan(sorted(nodes, key=order.__getitem__), externals_list, moved), ""


def _branch_graph(plan: _SkipPlan, branch: fx.Node) -> fx.Graph:
    g = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    for e in plan.externals:
        remap[e] = g.placeholder(e.name)
    for n in plan.nodes:
        remap[n] = g.node_copy(n, lambda a: remap[a])
    g.output(remap[branch])
    return g


def _prune_dead(graph: fx.Graph) -> None:
    """Erase unused projections (``out[1]`` of a tuple nobody reads): they would pin a
    branch's values to the main graph."""
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if n.users:
                continue
            pure = (n.op == "call_function" and n.target in (operator.getitem, getattr)) or (
                n.op == "call_method" and n.target in _SHAPE_METHODS
            )
            if pure:
                graph.erase_node(n)
                changed = True


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


# --------------------------------------------------------------------------- rewriting
def _batched(node: fx.Node, env: dict[fx.Node, Any], env_alt: dict[fx.Node, Any] | None) -> bool:
    v = env.get(node)
    if not isinstance(v, Tensor) or v.dim() == 0:
        return False
    if env_alt is None:
        return False
    w = env_alt.get(node)
    return isinstance(w, Tensor) and w.dim() > 0 and w.shape[0] != v.shape[0]


def build_patched_class(
    bs: BlockSites,
    skip: bool,
    env_alt: dict[fx.Node, Any] | None,
    class_cache: dict[Any, Any],
) -> tuple[type, list[bool], list[str], bool]:
    """Generate the patched subclass for a traced block (internal).

    Returns the class, per site whether it can skip and, if not, why, and whether the
    class is new (not shared with an identical block patched before).
    """
    assert bs.graph is not None
    # Blocks that share a trace (same configuration) share the generated class.
    plan_key = (id(bs.graph), skip, tuple(bs.slot_attrs))
    if plan_key in class_cache:
        hit = class_cache[plan_key]
        if isinstance(hit, TraceError):
            raise TraceError(f"the rewritten forward failed a trial run ({hit})")
        return hit[0], list(hit[1]), list(hit[2]), False
    orig_cls = type(bs.module)
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(bs.graph, val_map)
    graph.output(out)
    env = {val_map[k]: v for k, v in bs.env.items() if k in val_map}
    alt = {val_map[k]: v for k, v in env_alt.items() if k in val_map} if env_alt else None

    _prune_dead(graph)
    adds: list[ResidualAdd] = [
        ResidualAdd(
            val_map[a.node],
            val_map[a.shortcut],
            val_map[a.branch],
            a.alpha,
            val_map[a.slot_node] if a.slot_node is not None else None,
        )
        for a in bs.adds
    ]
    # Native slots leave the graph: the slot module is re-entered at the addition.
    for a in adds:
        if a.slot_node is not None:
            slot_in = a.slot_node.args[0]
            assert isinstance(slot_in, fx.Node)
            if a.branch is a.slot_node:
                a.branch = slot_in
            a.slot_node.replace_all_uses_with(slot_in)
            graph.erase_node(a.slot_node)

    pending: list[tuple[str, dict[str, Any], str]] = []  # (source, globals, name)
    skippable: list[bool] = []
    reasons: list[str] = []
    for j, (a, attr) in enumerate(zip(adds, bs.slot_attrs, strict=True)):
        mutated = a.node.args[0] if a.node.target in INPLACE_ADDS else None
        mutated = mutated if isinstance(mutated, fx.Node) else None
        plan, why = (
            (None, "skip not requested")
            if not skip
            else _plan_skip(a.node, a.shortcut, a.branch, env)
        )
        if plan is None:
            with graph.inserting_before(a.node):
                args: tuple[Any, ...] = (a.branch, a.shortcut)
                if a.alpha != 1.0:
                    args = (*args, a.alpha)
                new = graph.call_module(attr, args)
            skippable.append(False)
            reasons.append(why)
        else:
            branch_fn = f"_dpatch_branch{j}"
            site_fn = f"_dpatch_site{j}"
            pending.append(_graph_source(_branch_graph(plan, a.branch), branch_fn))
            params = [e.name for e in plan.externals]
            gathered = [
                f"gather_rows({p}, index)" if _batched(e, env, alt) else p
                for p, e in zip(params, plan.externals, strict=True)
            ]
            ssrc = _SITE_TEMPLATE.format(
                name=site_fn,
                slot=attr,
                branch=branch_fn,
                params=", ".join(params),
                gathered=", ".join(gathered),
                alpha=a.alpha,
            )
            pending.append((ssrc, {"torch": torch, "gather_rows": gather_rows}, site_fn))
            with graph.inserting_before(a.node):
                new = graph.call_module(site_fn, (a.shortcut, *plan.externals))
            skippable.append(True)
            reasons.append("")
        env[new] = env.get(a.node)
        if alt is not None:
            alt[new] = alt.get(a.node)
        _replace_add(a.node, new, mutated)
        for later in adds[j + 1 :]:  # a later site may add onto this one's result
            if later.shortcut is a.node:
                later.shortcut = new
            if later.branch is a.node:
                later.branch = new
        graph.erase_node(a.node)
        if plan is not None:
            for n in reversed(plan.nodes):
                if n in plan.moved and not n.users:
                    graph.erase_node(n)

    pending.append(_graph_source(graph, "forward"))
    key = (orig_cls, "".join(src for src, _, _ in pending))
    cls = class_cache.get(key)
    new_class = cls is None
    if cls is None:
        namespace: dict[str, Any] = {
            name: _compile_function(src, globals_, name) for src, globals_, name in pending
        }
        namespace.update(
            {
                "__module__": orig_cls.__module__,
                "__qualname__": f"{orig_cls.__qualname__}_dpatch",
                "__doc__": orig_cls.__doc__,
            }
        )
        cls = type(orig_cls.__name__, (orig_cls,), namespace)
        class_cache[key] = cls
    class_cache[plan_key] = (cls, tuple(skippable), tuple(reasons))
    return cls, skippable, reasons, new_class


def check_training_invariant(bs: BlockSites) -> None:
    """Raise TraceError when the block's own forward branches on ``self.training``.

    A traced graph fixes Python-level decisions; one that depends on the mode would
    silently keep one mode's behaviour in the other.
    """
    assert bs.graph is not None
    if not getattr(bs.graph, "_dpatch_reads_training", True):
        return
    other = trace_module(
        bs.module,
        training=not bs.module.training,
        concrete_args=getattr(bs.graph, "_dpatch_concrete", None) or None,
    )
    if _code_of(other) != _code_of(bs.graph):
        raise TraceError("its forward branches on self.training")


def _code_of(graph: fx.Graph) -> str:
    return graph.python_code(root_module="self").src


def rewrite_block(
    bs: BlockSites,
    slots: dict[str, DropPath],
    *,
    skip: bool,
    env_alt: dict[fx.Node, Any] | None,
    class_cache: dict[Any, Any],
    validate_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
) -> PatchMeta:
    """Rewrite one traced block in place so its residual branches go through ``slots``.

    Args:
        bs: the block's analysis (graph, residual adds, slot attribute names).
        slots: the DropPath for each slot attribute (new or reused).
        skip: generate the compute-skipping form where the branch allows it.
        env_alt: node values at a second batch size (tells batched inputs apart).
        class_cache: generated classes by (original class, source), shared across blocks.
        validate_inputs: recorded (args, kwargs) to run the new forward once on meta.

    Raises:
        TraceError: the block cannot be rewritten faithfully (it is left unchanged).
    """
    module = bs.module
    check_training_invariant(bs)
    cls, skippable, reasons, new_class = build_patched_class(bs, skip, env_alt, class_cache)
    # A class shared with an identical block was tried already (and fallen back from).
    if validate_inputs is not None and new_class and any(skippable):
        bad = _trial_run(module, cls, slots, validate_inputs, skip=True)
        if bad:
            cls, skippable, reasons, _ = build_patched_class(bs, False, env_alt, class_cache)
            reasons = [f"skip failed a trial run ({bad})"] * len(reasons)
            class_cache[(id(bs.graph), True, tuple(bs.slot_attrs))] = (
                cls,
                tuple(skippable),
                tuple(reasons),
            )
    if validate_inputs is not None and new_class:
        bad = _trial_run(module, cls, slots, validate_inputs, skip=False)
        if bad:
            class_cache[(id(bs.graph), skip, tuple(bs.slot_attrs))] = TraceError(bad)
            raise TraceError(f"the rewritten forward failed a trial run ({bad})")

    consts = tuple(getattr(bs.graph, "_dpatch_consts", {}))
    replaced: list[tuple[str, Any]] = []
    added: list[str] = []
    for attr in bs.slot_attrs:
        if attr in module._modules:
            replaced.append((attr, module._modules[attr]))
        elif attr in module.__dict__:
            replaced.append((attr, module.__dict__[attr]))
        else:
            added.append(attr)
    meta = PatchMeta(
        orig_cls=type(module),
        slot_attrs=tuple(bs.slot_attrs),
        kinds=tuple(bs.kinds),
        origins=tuple(bs.origins),
        skippable=tuple(skippable),
        skip_reasons=tuple(reasons),
        added_attrs=tuple(added),
        replaced_slots=tuple(replaced),
        consts=consts,
    )
    # The class is per (original class, generated code); the meta is per instance, so a
    # thin per-instance subclass would defeat the cache. Keep meta on the instance's dict
    # under a name TorchScript ignores, and the marker on the class.
    for name, value in getattr(bs.graph, "_dpatch_consts", {}).items():
        object.__setattr__(module, name, value)
    for attr in bs.slot_attrs:
        if attr in module.__dict__ and module.__dict__[attr] is None:
            del module.__dict__[attr]  # a None slot (timm ResNet) becomes a module
        setattr(module, attr, slots[attr])
    setattr(cls, PATCH_ATTR, True)
    module.__class__ = cls
    object.__setattr__(module, "_dpatch_meta", meta)
    return meta


def _trial_run(
    module: nn.Module,
    cls: type,
    slots: dict[str, DropPath],
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    *,
    skip: bool,
) -> str:
    """Run a generated forward once on meta tensors, training with rate 0.5 (so a skipping
    branch really runs on a subset); return an error line or ''."""
    trial = copy.copy(module)
    trial.__dict__ = dict(module.__dict__)
    trial._modules = dict(module._modules)
    for attr in slots:
        if attr in trial.__dict__ and trial.__dict__[attr] is None:
            del trial.__dict__[attr]
        trial._modules[attr] = DropPath(0.5, mode="row", skip=skip).train()
    object.__setattr__(trial, "__class__", cls)
    args, kwargs = inputs
    try:
        values = [to_meta(v) for v in bind_inputs(module, args, kwargs)]
        with torch.no_grad(), on_meta(trial), torch.device("meta"), MetaMode():
            trial(*values)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return ""


def block_meta(module: nn.Module) -> PatchMeta | None:
    """The PatchMeta of a rewritten block, or None."""
    meta = module.__dict__.get("_dpatch_meta")
    return meta if isinstance(meta, PatchMeta) else None


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
    del module.__dict__["_dpatch_meta"]
    module.__class__ = meta.orig_cls
