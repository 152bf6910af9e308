"""Watched copies of a block for tracing: what its forward reads, so that two blocks share a
trace only when everything that forward read is equal in both.

A trace bakes in every Python value its forward read: ``len(self.layers)``, a loop over a
``ModuleList``, ``self.attn.num_heads``, ``if self.shift:``. Blocks of one class built with
other depths or settings (an encoder and a decoder from one class, stages of 2, 2, 6, 2
layers) must not share one. Tracing works on a *shadow* of the block: a shallow copy of it
and of every module under it, each of a subclass that records the plain values its
instance attributes hand out. Parameters, buffers and hooks are the real ones.

:func:`structure` (every module under a block: path, class, parameter and buffer names) is
part of every trace key; :class:`Reads` (the plain attribute values read while tracing, by
path and name) is checked again on each block that would reuse a trace.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dpatch.analysis._wrappers import plain_subclass

__all__ = [
    "MODULE_INTERNALS",
    "Reads",
    "Recorder",
    "Shadow",
    "freeze",
    "shadow_of",
    "structure",
    "watcher_class",
]

# nn.Module bookkeeping: reading these is how every module works, not a setting.
MODULE_INTERNALS = frozenset(
    {
        "__dict__",
        "__class__",
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_compiled_call_impl",
    }
)
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_LOG = "__dpatch_reads"  # on each shadow: the log its reads go to
_PATH = "__dpatch_path"  # on each shadow: its path under the block


def freeze(value: Any) -> Hashable:
    """A hashable stand-in for a configuration value; raises TypeError for tensors and
    other values a trace could capture by value."""
    if isinstance(value, _PLAIN):
        return (type(value).__name__, value)
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((freeze(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, set | frozenset):
        return ("set", tuple(sorted((freeze(v) for v in value), key=repr)))
    if isinstance(value, Tensor):
        raise TypeError("tensor attribute")
    if callable(value) or isinstance(value, type):
        return ("id", id(value))
    raise TypeError(type(value).__name__)


def structure(module: nn.Module) -> Hashable:
    """Every module under ``module`` (itself included): path, class, parameter and buffer
    names. Container lengths and keys are in it: a loop over a ``ModuleList`` unrolls to
    its length in a trace."""
    return tuple(
        (path, type(m), tuple(m._parameters), tuple(m._buffers))
        for path, m in module.named_modules(remove_duplicate=False)
    )


@dataclass(frozen=True)
class Reads:
    """Plain attribute values a traced forward read under its block, by (path relative to
    the block, attribute name) -> frozen value; ``unfrozen`` names values that could not be
    compared (then the trace is never shared)."""

    values: tuple[tuple[str, str, Hashable], ...] = ()
    unfrozen: tuple[str, ...] = ()

    def match(self, block: nn.Module) -> bool:
        """Whether ``block`` holds the same values where this trace read them."""
        if self.unfrozen:
            return False
        for path, name, value in self.values:
            try:
                owner = block.get_submodule(path) if path else block
                if freeze(owner.__dict__[name]) != value:
                    return False
            except (AttributeError, KeyError, TypeError):
                return False
        return True


@dataclass
class Recorder:
    """Where watched copies log what is read: one per attempt to trace a block (a plain
    trace, then perhaps a retry and a value-carrying one: all of them count)."""

    values: dict[tuple[str, str], Hashable] = field(default_factory=dict)
    unfrozen: set[str] = field(default_factory=set)
    read_training: bool = False

    def reads(self) -> Reads:
        """The plain values read so far under the block (the block's own attributes are in
        its trace key already; this covers the modules under it too)."""
        values = tuple(sorted(((p, n, v) for (p, n), v in self.values.items()), key=repr))
        return Reads(values, tuple(sorted(self.unfrozen)))

    def record(self, path: str, name: str, value: Any) -> None:
        if isinstance(value, nn.Module | Tensor):
            return  # children and tensors are covered by the structure and the graph
        key = (path, name)
        if key in self.values:
            return
        try:
            self.values[key] = freeze(value)
        except TypeError:
            self.unfrozen.add(f"{path}.{name}" if path else name)


_WATCHERS: dict[type, type] = {}


def _watcher(cls: type) -> type:
    """A subclass of ``cls`` whose instances record reads of their own plain attributes."""
    hit = _WATCHERS.get(cls)
    if hit is not None:
        return hit

    def __getattribute__(self: nn.Module, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in MODULE_INTERNALS or name.startswith("__dpatch"):
            return value
        state = object.__getattribute__(self, "__dict__")
        if name in state:
            log: Recorder = state[_LOG]
            if name == "training":
                if state[_PATH] == "":
                    log.read_training = True
            else:
                log.record(state[_PATH], name, value)
        return value

    # a plain subclass: a base's __init_subclass__ (GradientCheckpointingLayer) must not
    # wrap the forward a second time
    watcher, _ = plain_subclass(cls, {"__getattribute__": __getattribute__})
    _WATCHERS[cls] = watcher
    return watcher


@dataclass
class Shadow:
    """A watched copy of a block: trace ``module``; its recorder says what was read."""

    module: nn.Module
    recorder: Recorder
    original_keys: frozenset[str]
    copies: dict[int, nn.Module] = field(default_factory=dict)  # id(original) -> its copy

    def known(self, outputs: dict[int, Any]) -> dict[int, Any]:
        """``outputs`` (by id of an original module) by id of its copy."""
        return {id(c): outputs[i] for i, c in self.copies.items() if i in outputs}

    def added(self) -> dict[str, Any]:
        """Attributes the tracer put on the block's copy (tensor constants it lifted)."""
        state = self.module.__dict__
        return {
            k: v
            for k, v in state.items()
            if k not in self.original_keys and not k.startswith("__dpatch")
        }


def shadow_of(
    module: nn.Module,
    *,
    recorder: Recorder | None = None,
    training: bool | None = None,
    cls: type | None = None,
) -> Shadow:
    """A watched copy of ``module`` and of every module under it (see the module docstring).

    Args:
        recorder: where reads are logged (default: a new one).
        training: the mode the copy reports (default: the block's own).
        cls: the class of the block's copy (default: a watcher of the block's class); a
            subclass of that watcher, for tracers that replace ``forward``.
    """
    log = recorder if recorder is not None else Recorder()
    copies: dict[int, nn.Module] = {}

    def copy(m: nn.Module, path: str, own_cls: type | None) -> nn.Module:
        if id(m) in copies:  # a module used twice keeps one copy
            return copies[id(m)]
        shadow: nn.Module = object.__new__(own_cls or _watcher(type(m)))
        state = dict(m.__dict__)
        state[_LOG] = log
        state[_PATH] = path
        state["_modules"] = {
            k: None if child is None else copy(child, f"{path}.{k}" if path else k, None)
            for k, child in m._modules.items()
        }
        object.__setattr__(shadow, "__dict__", state)
        copies[id(m)] = shadow
        return shadow

    root = copy(module, "", cls)
    if training is not None:
        root.__dict__["training"] = training
    return Shadow(root, log, frozenset(root.__dict__), copies)


def watcher_class(cls: type) -> type:
    """The watched subclass of ``cls`` that :func:`shadow_of` gives a block's copy."""
    return _watcher(cls)
