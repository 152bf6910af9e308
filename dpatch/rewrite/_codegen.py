"""Turning generated source into methods and classes that tracebacks, TorchScript and
pickle can all handle.

Generated source is registered with ``linecache`` (as torch.fx does for GraphModule), so
tracebacks, ``inspect`` and TorchScript can read it. A generated class cannot be found by
name, so a patched block pickles through :func:`rebuild_block` with its original class and
its :class:`GeneratedCode`, from which the class is made again (the way
``torch.fx.GraphModule`` pickles its generated code).
"""

from __future__ import annotations

import hashlib
import inspect
import linecache
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

from dpatch.analysis import wrapper_names
from dpatch.errors import TraceError
from dpatch.marks import GeneratedCode

__all__ = ["compile_function", "generated_class", "rebuild_block"]


def compile_function(src: str, globals_: dict[str, Any], name: str) -> Callable[..., Any]:
    """Exec generated source; register it in linecache so inspect/TorchScript can read it."""
    key = f"<dpatch-{hashlib.sha1(src.encode()).hexdigest()[:16]}>"
    linecache.cache[key] = (len(src), None, src.splitlines(keepends=True), key)
    namespace: dict[str, Any] = dict(globals_)
    exec(compile(src, key, "exec"), namespace)
    fn: Callable[..., Any] = namespace[name]
    return fn


# Generated classes by (original class, code digest): identical blocks, patched in one call
# or unpickled later, share one class. Weak values: a class lives as long as its blocks.
_CLASSES: weakref.WeakValueDictionary[tuple[type, str], type] = weakref.WeakValueDictionary()


def generated_class(orig_cls: type, code: GeneratedCode) -> type:
    """The subclass of ``orig_cls`` whose methods are ``code`` (made once per code)."""
    key = (orig_cls, code.key)
    cls = _CLASSES.get(key)
    if cls is not None:
        return cls
    namespace: dict[str, Any]
    if code.in_place:
        from dpatch.rewrite._source import compile_like

        namespace = {
            name: compile_like(
                src,
                inspect.unwrap(getattr(orig_cls, name)),
                f"<dpatch-{hashlib.sha1(src.encode()).hexdigest()[:16]}>",
            )
            for name, src in code.functions
        }
    else:
        globals_ = code.namespace()
        namespace = {name: compile_function(src, globals_, name) for name, src in code.functions}
    namespace.update(
        {
            "__module__": orig_cls.__module__,
            "__qualname__": f"{orig_cls.__qualname__}_dpatch",
            "__doc__": orig_cls.__doc__,
            "__reduce_ex__": _reduce_block,
            "_dpatch_generated_from": (orig_cls, code),
        }
    )
    cls = type(orig_cls.__name__, (orig_cls,), namespace)
    # Wrappers around the forward must come back as they were: decorators kept in a
    # source-level rewrite, and those a base class's ``__init_subclass__`` adds to every
    # subclass (transformers 5's GradientCheckpointingLayer). Anything else (a forward
    # wrapped after its class was made) would be lost.
    before = _behaviour(wrapper_names(orig_cls.forward))  # type: ignore[attr-defined]
    after = _behaviour(wrapper_names(cls.forward))  # type: ignore[attr-defined]
    if after != before:
        raise TraceError(
            f"its forward is wrapped by {', '.join(before) or 'nothing'}, but the rewritten "
            f"one would be wrapped by {', '.join(after) or 'nothing'}"
        )
    _CLASSES[key] = cls
    return cls


def _behaviour(names: list[str]) -> list[str]:
    """Wrapper names without those of docstring decorators (a rewrite drops them)."""
    from dpatch.rewrite._source import DOC_DECORATORS

    return [n for n in names if n not in DOC_DECORATORS]


def _reduce_block(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # A generated class knows what it was generated from: pickle rebuilds it from that.
    origin: tuple[type, GeneratedCode] = type(self).__dict__["_dpatch_generated_from"]
    return (rebuild_block, origin, self.__getstate__())


def rebuild_block(orig_cls: type, code: GeneratedCode) -> nn.Module:
    """An empty instance of the patched class (pickle then restores its state)."""
    obj: nn.Module = object.__new__(generated_class(orig_cls, code))
    return obj
