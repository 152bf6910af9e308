"""Planning compute-skipping: which nodes of a residual branch can move into a method of
their own, so that training can run the branch on a subset of rows (or not at all).

A branch can move when no node of it is needed outside it; shape computations of
batch-sized values that the branch reads (``B, N, C = x.shape``) are recomputed inside it on
the gathered rows.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

__all__ = [
    "SITE_TEMPLATE",
    "SkipPlan",
    "branch_graph",
    "branch_parameters",
    "branch_sources",
    "is_batched",
    "plan_skip",
    "prune_dead",
]

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

#: The generated site method of a skippable branch: in training with skipping on, the
#: branch runs on a fixed-size random subset of rows (row mode; at rate 1 on zero rows, so
#: nothing is computed yet every parameter stays in the graph, as DDP needs) or not at all
#: (batch mode, host decision; the branch's parameters, found by :func:`branch_parameters`,
#: get zero gradients, so DDP and FSDP see them in every step); otherwise the fused masking
#: form.
SITE_TEMPLATE = """
def {name}(self, residual, {params}):
    slot = self.{slot}
    if not torch.jit.is_scripting():
        if slot.skips():
            if slot.mode == "batch":
                if not torch.compiler.is_compiling():
                    if not slot.keep_batch():
                        return slot.dropped(residual, branch_parameters(self, {modules!r}, {tensors!r}))
                    return torch.add(residual, self.{branch}({params}), alpha=slot.batch_scale() * {alpha!r})
            else:
                index = slot.keep_indices(residual)
                return slot.scatter_add(residual, self.{branch}({gathered}), index, {alpha!r})
    return slot(self.{branch}({params}), residual, {alpha!r}{first})
"""


def _is_shape_op(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        return node.target in _SHAPE_FUNCTIONS
    return False


def ancestors(node: fx.Node) -> set[fx.Node]:
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
        for n in ancestors(branch) - ancestors(shortcut)
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


@dataclass(frozen=True)
class SkipPlan:
    """How one branch moves into its own method.

    Attributes:
        nodes: the branch's nodes (including recomputed shape chains), in graph order.
        externals: the branch's inputs from the rest of the graph (the method's arguments).
        moved: the nodes that leave the main graph.
    """

    nodes: tuple[fx.Node, ...]
    externals: tuple[fx.Node, ...]
    moved: frozenset[fx.Node]


def plan_skip(
    add: fx.Node, shortcut: fx.Node, branch: fx.Node, env: dict[fx.Node, Any]
) -> SkipPlan | str:
    """The plan for moving ``branch`` out of ``add``'s graph, or why it cannot move."""
    moved = _branch_nodes(add, shortcut, branch)
    if not moved:
        return "the branch output or its inputs are used elsewhere in the block"
    nodes = set(moved)
    for _ in range(8):  # pull shape chains of batch-sized ints into the branch
        externals = {a for n in nodes for a in n.all_input_nodes if a not in nodes}
        grew = False
        for e in externals:
            if e.op in ("placeholder", "get_attr") or isinstance(env.get(e), Tensor):
                continue
            chain = _shape_chain(e, env)
            if chain is None:
                return f"the branch uses {e.name!r}, computed outside it from the batch"
            if not chain <= nodes:
                nodes |= chain
                grew = True
        if not grew:
            break
    order = {n: i for i, n in enumerate(add.graph.nodes)}
    externals_list = sorted(
        {a for n in nodes for a in n.all_input_nodes if a not in nodes}, key=order.__getitem__
    )
    return SkipPlan(
        tuple(sorted(nodes, key=order.__getitem__)), tuple(externals_list), frozenset(moved)
    )


def branch_sources(plan: SkipPlan) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Where a branch's parameters live, relative to its block: the submodules it calls and
    the attributes it reads (``layer_scale.gamma``), each sorted."""
    modules = sorted({str(n.target) for n in plan.nodes if n.op == "call_module"})
    tensors = sorted({str(e.target) for e in plan.externals if e.op == "get_attr"})
    return tuple(modules), tuple(tensors)


def branch_parameters(
    block: nn.Module, modules: tuple[str, ...], tensors: tuple[str, ...]
) -> list[Tensor]:
    """The parameters a branch uses (see :func:`branch_sources`), read at call time:
    FSDP2 swaps a block's parameters between their sharded and gathered forms around each
    forward, so a list kept from an earlier step would hold the wrong tensors."""
    found: dict[int, Tensor] = {}
    for path in modules:
        for p in block.get_submodule(path).parameters():
            found.setdefault(id(p), p)
    for path in tensors:
        owner, _, name = path.rpartition(".")
        value = getattr(block.get_submodule(owner), name)
        if isinstance(value, Tensor) and value.requires_grad:
            found.setdefault(id(value), value)
    return list(found.values())


def branch_graph(plan: SkipPlan, branch: fx.Node) -> fx.Graph:
    """A graph of the branch alone: its externals as placeholders, the branch as output."""
    g = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    for e in plan.externals:
        remap[e] = g.placeholder(e.name)
    for n in plan.nodes:
        remap[n] = g.node_copy(n, lambda a: remap[a])
    g.output(remap[branch])
    g.lint()
    return g


def prune_dead(graph: fx.Graph) -> None:
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


def is_batched(node: fx.Node, env: dict[fx.Node, Any], env_alt: dict[fx.Node, Any] | None) -> bool:
    """Whether a branch input has the batch as its first dimension (its size follows the
    batch size between two probes), so skipping must gather its rows."""
    v = env.get(node)
    if not isinstance(v, Tensor) or v.dim() == 0 or env_alt is None:
        return False
    w = env_alt.get(node)
    return isinstance(w, Tensor) and w.dim() > 0 and w.shape[0] != v.shape[0]
