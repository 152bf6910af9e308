"""The rules that say what a residual addition is, read off one block's traced graph.

An addition ``a + b`` of two same-shaped activations is *residual* when

1. one operand (the branch) holds learned computation that the other (the shortcut) lacks,
   and
2. both grow from one activation (``x + f(x)``, ``proj(x) + f(x)``), or the shortcut is a
   tensor handed in as an argument (Hugging Face ``ViTOutput``-style).

A native DropPath slot on exactly one operand marks that operand as the branch, whatever
the cost rule says. Position embeddings, biases, masks, equal-weight parallel branches
(RepVGG), Res2Net's channel-group sums and HRNet's resolution fusion fail these rules.
Finally, :func:`native_slots_win`: when a model has native slots, they alone define its
sites (its author chose where stochastic depth belongs).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from dpatch.analysis._views import is_dropout, is_reshape

__all__ = [
    "INPLACE_ADDS",
    "AddOperands",
    "BlockSite",
    "ResidualAdd",
    "add_operands",
    "find_residual_adds",
    "native_slots_win",
]

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__", "__radd__")
#: Targets of additions that write into their first operand (``a += b``, ``a.add_(b)``).
INPLACE_ADDS: tuple[Any, ...] = (operator.iadd, "add_", "__iadd__")

#: Functions that count as learned computation when applied to a parameter (``F.linear(x,
#: self.weight)``): the branch of ``x + F.linear(x, w)`` is the linear.
_HEAVY_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.nn.functional.linear,
        torch.nn.functional.conv1d,
        torch.nn.functional.conv2d,
        torch.nn.functional.conv3d,
        torch.matmul,
        torch.bmm,
        torch.einsum,
    }
)


@dataclass(frozen=True)
class AddOperands:
    """``out = first + alpha * second`` as an addition node reads."""

    first: fx.Node
    second: fx.Node
    alpha: float


def add_operands(node: fx.Node) -> AddOperands | None:
    """The tensor operands of an addition node, or None if ``node`` is not one."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )
    if not is_add:
        return None
    args = list(node.args)
    if len(args) < 2 and "other" in node.kwargs:
        args.append(node.kwargs["other"])
    if len(args) != 2 or not all(isinstance(a, fx.Node) for a in args):
        return None
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        return None
    first, second = args
    assert isinstance(first, fx.Node) and isinstance(second, fx.Node)
    if node.op == "call_method" and node.target == "__radd__":
        first, second = second, first
    return AddOperands(first, second, float(alpha))


@dataclass(frozen=True)
class ResidualAdd:
    """A residual addition in one block's traced graph: ``node = shortcut + alpha * branch``.

    Attributes:
        node: the addition.
        shortcut: the operand that is never dropped.
        branch: the operand stochastic depth drops.
        alpha: a constant on the branch (``torch.add(x, b, alpha=)``), else 1.
        slot_node: the ``call_module`` of a native slot on the branch, if any.
    """

    node: fx.Node
    shortcut: fx.Node
    branch: fx.Node
    alpha: float = 1.0
    slot_node: fx.Node | None = None

    @property
    def branch_first(self) -> bool:
        """Whether the branch is the first operand (``f(x) + x``). A sum takes its first
        operand's memory layout where the two differ, so the slot call keeps the order."""
        ops = add_operands(self.node)
        return ops is not None and ops.first is self.branch


@dataclass(frozen=True)
class BlockSite:
    """One site of a block: the attribute that holds (or will hold) its DropPath.

    Attributes:
        attr: the slot attribute on the block (``drop_path1``; existing or new).
        kind: ``"native"`` (the model's own slot) or ``"graph"`` (found by tracing).
        origin: the model's own slot attribute it came from; "" for graph sites. Two sites
            share an origin where one slot module serves two branches (torchvision Swin).
        add: the traced addition; None for a block that was rewritten already.
    """

    attr: str
    kind: str
    origin: str = ""
    add: ResidualAdd | None = None


#: Tensor attributes and methods that read metadata, not values: ``x.device`` feeding
#: ``torch.arange(n, device=x.device)`` makes no data flow from ``x``.
_METADATA_ATTRS = frozenset({"device", "dtype", "shape", "ndim", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "get_device", "type"})


def _data_inputs(n: fx.Node) -> list[fx.Node]:
    """The nodes whose values ``n`` reads (none for a read of a tensor's metadata)."""
    reads_attr = n.op == "call_function" and n.target is getattr and len(n.args) == 2
    if reads_attr and n.args[1] in _METADATA_ATTRS:
        return []
    # ``x.type()`` names the type; ``x.type(dtype)`` converts the values
    reads_method = n.op == "call_method" and n.target in _METADATA_METHODS
    if reads_method and (len(n.args) == 1 or (n.target != "type" and len(n.args) == 2)):
        return []
    return n.all_input_nodes


class _Ancestry:
    """Memoised ancestor sets (each node included in its own set), along data flow only
    (:func:`_data_inputs`), or with ``metadata`` along reads of shapes and devices too."""

    def __init__(self, *, metadata: bool = False) -> None:
        self._memo: dict[fx.Node, frozenset[fx.Node]] = {}
        self._inputs = (lambda n: n.all_input_nodes) if metadata else _data_inputs

    def __call__(self, node: fx.Node) -> frozenset[fx.Node]:
        if node in self._memo:
            return self._memo[node]
        stack: list[fx.Node] = [node]
        seen: set[fx.Node] = set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            if n in self._memo and n is not node:
                seen |= self._memo[n]
                continue
            seen.add(n)
            stack.extend(self._inputs(n))
        result = frozenset(seen)
        self._memo[node] = result
        return result


def _learned_cost(block: nn.Module, nodes: Iterable[fx.Node], memo: dict[int, int]) -> int:
    """How much learned computation ``nodes`` hold: parametrised modules they call."""
    cost = 0
    for n in nodes:
        if n.op == "call_module":
            mod = block.get_submodule(str(n.target))
            key = id(mod)
            if key not in memo:
                memo[key] = sum(
                    1
                    for sub in mod.modules()
                    if any(p is not None for p in sub._parameters.values())
                )
            cost += memo[key]
        elif (
            n.op == "call_function"
            and n.target in _HEAVY_FUNCTIONS
            and any(a.op == "get_attr" for a in n.all_input_nodes)
        ):
            cost += 1
    return cost


def _is_activation(value: Any) -> bool:
    """A floating-point tensor: integer inputs (token ids, positions) and boolean masks are
    looked up or compared, not transformed by a branch."""
    return isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex())


def _has_activation(
    nodes: Iterable[fx.Node], env: dict[fx.Node, Any], sized_by: Iterable[fx.Node] = ()
) -> bool:
    """True when ``nodes`` (what a value's data grows from) include a floating-point tensor
    input of the block (not only parameters, not only ids):
    ``inputs_embeds + position_embeddings(position_ids)`` adds two lookups of integer ids,
    which is no residual. A learned tensor sized by an input (a class token
    ``self.cls.expand(x.shape[0], -1, -1)``: ``sized_by`` holds what the value's shape
    grows from) is an activation of its own."""
    nodes = list(nodes)
    if any(n.op == "get_attr" and _is_activation(env.get(n)) for n in nodes) and _has_activation(
        sized_by, env
    ):
        return True
    for n in nodes:
        if n.op != "placeholder":
            continue
        value = env.get(n)
        if _is_activation(value):
            return True
        if isinstance(value, list | tuple) and any(_is_activation(v) for v in value):
            return True
    return False


def _summed_again(node: fx.Node, common: frozenset[fx.Node]) -> bool:
    """Whether ``node`` is added to a value of ``common`` (what its operands both grow from)."""
    for user in node.users:
        ops = add_operands(user)
        if ops is None:
            continue
        other = ops.second if ops.first is node else ops.first
        if other in common:
            return True
    return False


def _tensor_items(nodes: Iterable[fx.Node], env: dict[fx.Node, Any]) -> set[tuple[fx.Node, int]]:
    """(tuple, index) of the tensors ``nodes`` take out of a tuple: ``out[0]`` written twice
    (ALBERT's ``ffn(attention_output[0]) + attention_output[0]``) is one tensor, where
    Res2Net's ``split[0]`` and ``split[1]`` are two."""
    return {
        (n.args[0], n.args[1])
        for n in nodes
        if n.op == "call_function"
        and n.target is operator.getitem
        and isinstance(n.args[0], fx.Node)
        and isinstance(n.args[1], int)
        and isinstance(env.get(n), Tensor)
    }


def _ends_in_learned_op(block: nn.Module, node: fx.Node) -> bool:
    """Whether a value comes out of learned computation (a module with parameters, or a
    function of a parameter), looking through dropout and reshapes: a branch handed a
    shortcut ends in a projection (``dense(h)`` in Hugging Face's ``ViTOutput``), while
    attention logits plus a mask end in a product of two activations."""
    while True:
        if node.op == "call_module":
            mod = block.get_submodule(str(node.target))
            if any(True for _ in mod.parameters()):
                return True
        elif node.op == "call_function" and any(a.op == "get_attr" for a in node.all_input_nodes):
            return True
        passes = (
            (
                node.op == "call_module"
                and not any(True for _ in block.get_submodule(str(node.target)).parameters())
            )
            or is_reshape(node)
            or is_dropout(node)
        )
        first = node.args[0] if node.args else None
        if not passes or not isinstance(first, fx.Node):
            return False
        node = first


def find_residual_adds(
    block: nn.Module,
    graph: fx.Graph,
    env: dict[fx.Node, Any],
    slot_nodes: Sequence[fx.Node],
) -> list[ResidualAdd]:
    """Residual additions of one block's graph, in execution order.

    Args:
        block: the traced module (to weigh the children each operand calls).
        graph: its own forward, children as leaves.
        env: every node's meta value on the block's recorded inputs.
        slot_nodes: the graph's calls of native DropPath slots.
    """
    anc, sized = _Ancestry(), _Ancestry(metadata=True)
    memo: dict[int, int] = {}
    found: list[ResidualAdd] = []
    for node in graph.nodes:
        ops = add_operands(node)
        if ops is None:
            continue
        a, b = ops.first, ops.second
        va, vb, vo = env.get(a), env.get(b), env.get(node)
        if not (isinstance(va, Tensor) and isinstance(vb, Tensor) and isinstance(vo, Tensor)):
            continue
        if not (va.shape == vb.shape == vo.shape):
            continue
        anc_a, anc_b = anc(a), anc(b)
        if not _has_activation(anc_a, env, sized(a)) or not _has_activation(anc_b, env, sized(b)):
            continue
        excl_a, excl_b = anc_a - anc_b, anc_b - anc_a
        slot_a = [s for s in slot_nodes if s in excl_a]
        slot_b = [s for s in slot_nodes if s in excl_b]
        if len(slot_a) + len(slot_b) == 1:
            if slot_b:
                found.append(ResidualAdd(node, a, b, ops.alpha, slot_b[0]))
            elif ops.alpha == 1.0:
                found.append(ResidualAdd(node, b, a, 1.0, slot_a[0]))
            continue
        cost_a, cost_b = _learned_cost(block, excl_a, memo), _learned_cost(block, excl_b, memo)
        if cost_a == cost_b:
            continue  # parallel branches of equal weight (RepVGG-style): not a residual
        stream = {r.node for r in found}
        if (a in stream) != (b in stream):
            # The running sum of earlier residuals is the shortcut, whatever the costs:
            # Cohere's ``residual + attn(h) + mlp(h)`` adds the MLP to ``residual + attn``.
            shortcut, branch = (a, b) if a in stream else (b, a)
        elif cost_a and cost_b and _summed_again(node, anc_a & anc_b):
            # Parallel branches of unequal weight whose sum then goes onto a value both grow
            # from (Phi's and GPT-J's ``attn(h) + mlp(h) + residual``): that later addition
            # is the residual, with both branches as its branch.
            continue
        else:
            shortcut, branch = (a, b) if cost_b > cost_a else (b, a)
        if branch is a and ops.alpha != 1.0:
            continue  # ``branch + alpha * shortcut``: a scaled shortcut is not a residual
        # The nearest values both operands grow from must include an activation tensor:
        # ``x`` in ``x + f(x)``. Res2Net's ``f(split[0]) + split[1]`` meet only at the
        # tuple ``split``, so that addition mixes two channel groups, not a residual.
        common = anc_a & anc_b
        frontier = [n for n in common if not any(u in common for u in n.users)]
        shares_source = any(
            isinstance(env.get(n), Tensor) and n.op != "get_attr" for n in frontier
        ) or bool(_tensor_items(anc_a, env) & _tensor_items(anc_b, env))
        fed_in = (
            shortcut.op == "placeholder"
            and _is_activation(env.get(shortcut))
            and _ends_in_learned_op(block, branch)
        )
        if not (shares_source or fed_in):
            continue
        found.append(ResidualAdd(node, shortcut, branch, ops.alpha if branch is b else 1.0))
    return found


def native_slots_win(
    blocks: Sequence[Sequence[BlockSite]], has_loose_slots: bool
) -> list[list[BlockSite]] | None:
    """Apply the model author's choice: when a model has native slots anywhere, they alone
    define its sites, and its slot-less residual additions (timm's positional convolutions
    ``x + conv(x)``) are left alone.

    Args:
        blocks: each block's sites.
        has_loose_slots: the model has native slots outside traced blocks.

    Returns:
        Each block's native sites (same order), or None when the model has no native slot
        (then every graph site stands).
    """
    if not has_loose_slots and not any(s.kind == "native" for b in blocks for s in b):
        return None
    return [[s for s in b if s.kind == "native"] for b in blocks]
