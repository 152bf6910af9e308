"""Graph edits that prune a residual branch: the addition becomes its shortcut and the
branch's nodes leave the generated forward.

:func:`dpatch.rewrite.rewrite_block` calls these for the sites it is asked to prune. What the
removed nodes referenced (child modules, parameters) is returned, so :mod:`dpatch.prune` can
leave the tensors only pruned branches use out of a saved file.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from dpatch.analysis import may_alias

__all__ = [
    "Pruning",
    "erase_branch",
    "prune_addition",
    "referenced",
    "settle_copy",
    "unreferenced",
]

_INPLACE_FUNCTIONS = frozenset(
    {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}
)


def _writes_in_place(user: fx.Node, value: fx.Node, block: nn.Module) -> bool:
    """Whether ``user`` writes into ``value`` (its first argument)."""
    first = user.args[0] if user.args else None
    if first is not value:
        return False
    if user.kwargs.get("inplace") is True:
        return True
    if user.op == "call_method":
        name = str(user.target)
        return name == "__setitem__" or (
            name.endswith("_") and (not name.startswith("__") or name.startswith("__i"))
        )
    if user.op == "call_function":
        return user.target in _INPLACE_FUNCTIONS
    if user.op == "call_module":
        try:
            mod = block.get_submodule(str(user.target))
        except AttributeError:  # a generated site method: it never writes its residual
            return False
        return getattr(mod, "inplace", False) is True
    return False


def _is_view(user: fx.Node, value: fx.Node) -> bool:
    first = user.args[0] if user.args else None
    if first is not value:
        return False
    return may_alias(user)


def _written_later(value: fx.Node, block: nn.Module) -> bool:
    """Whether the forward writes into ``value`` or a view of it."""
    stack, seen = [value], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if _writes_in_place(u, n, block):
                return True
            if _is_view(u, n):
                stack.append(u)
    return False


def prune_addition(add: fx.Node, shortcut: fx.Node) -> fx.Node:
    """The value that replaces a pruned addition: the shortcut itself, or a copy of it where
    the forward later writes into the addition's result in place (``out += identity;
    relu_(out)``), which would otherwise write into the shortcut (often the block's input).

    The caller points the addition's uses at the returned node, then calls
    :func:`settle_copy` once the graph is final.
    """
    graph = add.graph
    with graph.inserting_before(add):
        return graph.call_method("clone", (shortcut,))


def settle_copy(copy_node: fx.Node, block: nn.Module) -> None:
    """Drop the copy :func:`prune_addition` made when nothing writes into it."""
    if _written_later(copy_node, block):
        return
    shortcut = copy_node.args[0]
    assert isinstance(shortcut, fx.Node)
    copy_node.replace_all_uses_with(shortcut)
    copy_node.graph.erase_node(copy_node)


def erase_branch(branch: fx.Node) -> set[str]:
    """Erase ``branch`` and every node that becomes unused with it; return the module and
    attribute targets the erased nodes referenced. Placeholders stay (the signature does
    not change), and so do nodes that still have users elsewhere."""
    targets: set[str] = set()
    stack = [branch]
    erased: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op in ("placeholder", "output"):
            continue
        if n.op in ("call_module", "get_attr"):
            targets.add(str(n.target))
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)
    return targets


def referenced(nodes: Iterable[fx.Node]) -> set[str]:
    """The module and attribute targets ``nodes`` read."""
    return {str(n.target) for n in nodes if n.op in ("call_module", "get_attr")}


def unreferenced(targets: Iterable[str], refs: set[str]) -> tuple[str, ...]:
    """The targets no reference reaches (a reference to ``a.b`` keeps ``a`` and ``a.b.c``)."""

    def reached(t: str) -> bool:
        return any(r == t or r.startswith(t + ".") or t.startswith(r + ".") for r in refs)

    return tuple(sorted(t for t in set(targets) if not reached(t)))


@dataclass
class Pruning:
    """The pruned branches of one generated forward: what they referenced, and the copies of
    shortcuts that replaced their additions.

    Attributes:
        block: the block being rewritten.
        removed: site index -> the targets its erased branch nodes referenced.
        copies: shortcut copies (:func:`prune_addition`), settled by :meth:`finish`.
        moved: targets that branches moved into their own methods (skipping) reference.
    """

    block: nn.Module
    removed: dict[int, set[str]] = field(default_factory=dict)
    copies: list[fx.Node] = field(default_factory=list)
    moved: set[str] = field(default_factory=set)

    def shortcut(
        self, add: fx.Node, shortcut: fx.Node, *envs: dict[fx.Node, Any] | None
    ) -> fx.Node:
        """The node that replaces ``add``; it carries the shortcut's value in ``envs`` (later
        branches may read it, and skip planning must know it is a tensor)."""
        new = prune_addition(add, shortcut)
        self.copies.append(new)
        for env in envs:
            if env is not None:
                env[new] = env.get(shortcut)
        return new

    def erase(self, index: int, branch: fx.Node) -> None:
        self.removed[index] = erase_branch(branch)

    def finish(self, graph: fx.Graph, sites: int) -> tuple[tuple[str, ...], ...]:
        """Settle the copies; per site, the targets only its pruned branch used."""
        for c in self.copies:
            settle_copy(c, self.block)
        refs = referenced(graph.nodes) | self.moved
        return tuple(unreferenced(self.removed.get(j, ()), refs) for j in range(sites))
