"""Folding Huang et al.'s eval scaling into the weights.

A site trained with ``scaling="expected"`` computes ``x + (1 - p) * f(x)`` at eval, which the
plain architecture cannot. Folding multiplies the last affine operation of each such branch
by ``(1 - p)`` (a Linear/Conv weight and bias, a BatchNorm/LayerNorm/GroupNorm weight and
bias, a LayerScale ``gamma`` or a parameter the forward multiplies by), found from the
block's trace by walking back from the addition through dropout, reshapes, scalar factors and
positive-homogeneous activations (ReLU, LeakyReLU, PReLU: ``relu(c x) = c relu(x)`` for
``c > 0``; GELU and SiLU are not, so they stop the walk). The site then switches to
``scaling="inverted"`` at the same rate: eval is the identity on the folded branch, so the
plain architecture reproduces the model's eval output, and training keeps its distribution
(a kept branch is ``f'(x) / (1 - p) = f(x)``, as before).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from dpatch.analysis import (
    BlockSites,
    Site,
    analyze,
    is_dropout,
    is_reshape,
    is_slot_module,
    qualify,
    site_list,
)
from dpatch.droppath import DropPath
from dpatch.errors import UnsupportedSiteError
from dpatch.patching import PatchReport, strip

__all__ = ["FoldReport", "FoldedSite", "fold"]

_AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)
_HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Flatten,
)
# Positively homogeneous activations: a positive scale passes through them.
_HOMOGENEOUS_METHODS = frozenset({"relu", "relu_"})
_HOMOGENEOUS_FUNCTIONS = frozenset(
    {torch.relu, torch.nn.functional.relu, torch.nn.functional.leaky_relu}
)


def _passes_scale(node: fx.Node) -> bool:
    """A scale of the output equals the same scale of the input (reshapes, dropout,
    positively homogeneous activations)."""
    return (
        is_reshape(node)
        or is_dropout(node)
        or (node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS)
        or (node.op == "call_function" and node.target in _HOMOGENEOUS_FUNCTIONS)
    )


_MULS = (operator.mul, torch.mul)
_MUL_METHODS = ("mul", "mul_", "__mul__", "__rmul__")


@dataclass(frozen=True)
class FoldedSite:
    """One folded site.

    Attributes:
        name: ``Site.name``.
        rate: its drop rate p.
        factor: ``1 - p``, multiplied into ``tensors``.
        tensors: the qualified names of the parameters scaled.
    """

    name: str
    rate: float
    factor: float
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold` did.

    Attributes:
        folded: the sites whose ``(1 - p)`` went into their weights.
        report: the sites afterwards (their scaling is ``inverted``).
        model: the folded model (a copy when ``inplace=False``).
    """

    folded: tuple[FoldedSite, ...]
    report: PatchReport
    model: nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def changed(self) -> bool:
        return bool(self.folded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folded": [
                {"site": f.name, "rate": f.rate, "factor": f.factor, "tensors": list(f.tensors)}
                for f in self.folded
            ],
            **self.report.to_dict(),
        }


@dataclass(frozen=True)
class _Target:
    """Parameters to scale, relative to the block, and the nodes the walk passed."""

    names: tuple[str, ...]
    path: tuple[fx.Node, ...]


def _param_root(node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` a value comes from through reshapes (``gamma.view(1, -1, 1, 1)``)."""
    while True:
        if node.op == "get_attr":
            return node
        passes = _passes_scale(node)
        first = node.args[0] if node.args else None
        if not passes or not isinstance(first, fx.Node):
            return None
        node = first


def _affine_params(mod: nn.Module, target: str) -> tuple[str, ...] | None:
    """The parameters that scale ``mod``'s output, if it is an affine module."""
    if isinstance(mod, _AFFINE_MODULES) or (
        isinstance(mod, _NORMS) and getattr(mod, "weight", None) is not None
    ):
        return tuple(qualify(target, n) for n in ("weight", "bias") if getattr(mod, n) is not None)
    if "LayerScale" in type(mod).__name__ and isinstance(getattr(mod, "gamma", None), nn.Parameter):
        return (qualify(target, "gamma"),)
    return None


def _passes(mod: nn.Module, target: str) -> bool:
    return isinstance(mod, _PASS_MODULES + _HOMOGENEOUS_MODULES) or is_slot_module(
        mod, target.rsplit(".", 1)[-1]
    )


def _in_sequential(seq: nn.Sequential, prefix: str) -> tuple[str, ...] | str | None:
    """The affine parameters that end an ``nn.Sequential`` (its children run in order), a
    reason it ends in something else, or None when all of it passes a value through."""
    children = list(seq.named_children())
    if len({id(c) for _, c in children}) != len(children):
        return f"{prefix} (a module repeated in one Sequential)"
    for name, child in reversed(children):
        target = qualify(prefix, name)
        if isinstance(child, nn.Sequential):
            inner = _in_sequential(child, target)
            if inner is None:
                continue
            return inner
        params = _affine_params(child, target)
        if params is not None:
            return params
        if not _passes(child, target):
            return f"{target} ({type(child).__name__})"
    return None


def _last_affine(block: nn.Module, start: fx.Node) -> _Target | str:
    """Walk back from a branch's output to the affine operation that ends it."""
    node, path = start, []
    while True:
        path.append(node)
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            target = str(node.target)
            mod = block.get_submodule(target)
            params = _affine_params(mod, target)
            if params is not None:
                return _Target(params, tuple(path))
            if isinstance(mod, nn.Sequential):
                inner = _in_sequential(mod, target)
                if isinstance(inner, tuple):
                    return _Target(inner, tuple(path))
                if isinstance(inner, str):
                    return inner
            elif not _passes(mod, target):
                return f"{target} ({type(mod).__name__})"
        elif (node.op == "call_function" and node.target in _MULS) or (
            node.op == "call_method" and node.target in _MUL_METHODS
        ):
            a, b = [*node.args, None, None][:2]
            if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
                first = a if isinstance(a, fx.Node) else b  # a constant factor: look through
            else:
                for p, other in ((a, b), (b, a)):
                    root = _param_root(p)
                    if root is not None and _param_root(other) is None:
                        return _Target((str(root.target),), tuple(path))
                return f"{node.name} (a product of two activations)"
        elif not _passes_scale(node):
            return f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"
        if not isinstance(first, fx.Node):
            return f"{node.name} (no tensor input)"
        node = first


def _plan(b: BlockSites, attr: str, name: str) -> _Target:
    site = next(s for s in b.sites if s.attr == attr)
    assert site.add is not None
    add = site.add
    start = add.branch
    target = _last_affine(b.module, start)
    if isinstance(target, str):
        raise UnsupportedSiteError(
            f"cannot fold {name}: its branch does not end in an affine operation "
            f"(the walk back from the addition stopped at {target})"
        )
    for n in target.path:  # every value on the way feeds only the addition
        if len(n.users) != 1:
            raise UnsupportedSiteError(
                f"cannot fold {name}: {n.name} in its branch is also used elsewhere in the block"
            )
    calls = [str(n.target) for n in start.graph.nodes if n.op == "call_module"]
    for t in target.names:
        owner = t.rpartition(".")[0]
        users = [c for c in calls if owner == c or owner.startswith(c + ".")]
        if owner and len(users) > 1:
            raise UnsupportedSiteError(f"cannot fold {name}: {users[0]} is called more than once")
    return target


def _tensor_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for n, t in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), []).append(n)
    return names


def fold(
    model: nn.Module, *, inplace: bool = True, example_inputs: Any | None = None
) -> FoldReport:
    """Fold every ``scaling="expected"`` site's ``(1 - p)`` into its branch's last affine
    operation, and switch the site to ``scaling="inverted"`` (same rate).

    Afterwards the plain architecture loaded with the model's weights computes the
    patched model's eval output (to float32 rounding).

    Raises:
        UnsupportedSiteError: a site's branch ends in no affine operation, its last affine
            operation is shared, or it was not traced; nothing is changed then.
    """
    if not inplace:
        model = copy.deepcopy(model)
    an = analyze(model, example_inputs)
    sites = site_list(an)
    todo = [s for s in sites if s.scaling == "expected" and s.rate > 0 and not s.pruned]
    if not todo:
        return FoldReport((), PatchReport.current(sites, model=model), model)
    reference = copy.deepcopy(model)
    strip(reference, pruned="restore")  # only read, for the traces of the original blocks
    blocks = {b.path: b for b in analyze(reference, an.example).blocks}
    plans: list[tuple[Site, tuple[str, ...]]] = []
    for s in todo:
        b = blocks.get(s.path)
        if b is None or b.traced is None or not any(x.attr == s.branch for x in b.sites):
            raise UnsupportedSiteError(
                f"cannot fold {s.name}: its branch was not traced (its block's forward "
                "could not be traced), so its last affine operation is unknown"
            )
        target = _plan(b, s.branch, s.name)
        plans.append((s, tuple(qualify(s.path, t) for t in target.names)))
    names = _tensor_names(model)
    seen: dict[str, str] = {}
    for s, tensors in plans:
        for t in tensors:
            if t in seen:
                raise UnsupportedSiteError(
                    f"cannot fold {s.name}: {t} also ends the branch of {seen[t]}"
                )
            seen[t] = s.name
            others = [n for n in names.get(id(model.get_parameter(t)), []) if n != t]
            if others:
                raise UnsupportedSiteError(f"cannot fold {s.name}: {t} is shared with {others[0]}")
    folded = []
    with torch.no_grad():
        for s, tensors in plans:
            factor = 1.0 - s.rate
            for t in tensors:
                model.get_parameter(t).mul_(factor)
            slot = model.get_submodule(s.slot)
            assert isinstance(slot, DropPath)
            slot.scaling = "inverted"
            folded.append(FoldedSite(s.name, s.rate, factor, tensors))
        for s in sites:  # at rate 0 nothing to fold; the site still switches, for one rule
            idle = model.get_submodule(s.slot) if s.scaling == "expected" else None
            if isinstance(idle, DropPath) and s.rate == 0:
                idle.scaling = "inverted"
    return FoldReport(tuple(folded), PatchReport.current(site_list(an), model=model), model)
