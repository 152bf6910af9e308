"""Graph operations that pass a value on without computing a new feature from it: the one
vocabulary the residual rules, pruning (what may share memory) and folding (what a scale
passes through) read."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["is_dropout", "is_reshape", "may_alias"]

# Same values in another shape or layout.
_RESHAPE_METHODS = frozenset(
    {"view", "reshape", "permute", "transpose", "flatten", "contiguous", "squeeze", "unsqueeze"}
)
_RESHAPE_FUNCTIONS: frozenset[Any] = frozenset(
    {torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.squeeze, torch.unsqueeze}
)
# Besides reshapes, what may return a view of (share memory with) its first argument.
_ALIAS_METHODS = _RESHAPE_METHODS | {
    "view_as",
    "reshape_as",
    "unflatten",
    "expand",
    "expand_as",
    "t",
    "narrow",
    "chunk",
    "split",
    "unbind",
    "__getitem__",
    "detach",
    "type_as",
    "to",
}
_ALIAS_FUNCTIONS = _RESHAPE_FUNCTIONS | {
    operator.getitem,
    torch.narrow,
    torch.chunk,
    torch.split,
    torch.unbind,
}


def is_reshape(node: fx.Node) -> bool:
    """``node`` gives its first argument's values in another shape (``view``, ``permute``,
    ``flatten``, ``torch.reshape``, ...)."""
    return (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS
    )


def may_alias(node: fx.Node) -> bool:
    """``node``'s result may share memory with its first argument (a view of it)."""
    return (node.op == "call_method" and node.target in _ALIAS_METHODS) or (
        node.op == "call_function" and node.target in _ALIAS_FUNCTIONS
    )


def is_dropout(node: fx.Node) -> bool:
    """``F.dropout`` written in a forward (dropout modules are leaves, found by class)."""
    return node.op == "call_function" and node.target is F.dropout
