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
import importlib
import inspect
import linecache
import types
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["GeneratedCode", "compile_function", "generated_class", "rebuild_block"]


@dataclass(frozen=True)
class _ModuleRef:
    """A module in a generated function's globals, by name (modules do not pickle)."""

    name: str


@dataclass(frozen=True)
class GeneratedCode:
    """The methods dpatch generated for one block class: sources and what they refer to.

    Attributes:
        functions: (method name, source) pairs; the last is ``forward``.
        globals: (name, value) pairs the sources read; modules are kept by name so the
            record pickles and deep-copies.
        in_place: the sources are the original class's own methods edited at source level
            (:mod:`dpatch._source`): they run in that method's module, with its closure.
    """

    functions: tuple[tuple[str, str], ...]
    globals: tuple[tuple[str, Any], ...] = ()
    in_place: bool = False

    @classmethod
    def of(cls, functions: Mapping[str, str], globals_: Mapping[str, Any]) -> GeneratedCode:
        portable = tuple(
            (k, _ModuleRef(v.__name__) if isinstance(v, types.ModuleType) else v)
            for k, v in sorted(globals_.items())
        )
        return cls(tuple(functions.items()), portable)

    @property
    def key(self) -> str:
        """A digest of the sources: equal code, equal class."""
        text = "\n".join(f"{name}\n{src}" for name, src in self.functions) + str(self.in_place)
        return hashlib.sha1(text.encode()).hexdigest()

    def namespace(self) -> dict[str, Any]:
        """The globals the sources run in."""
        return {
            k: importlib.import_module(v.name) if isinstance(v, _ModuleRef) else v
            for k, v in self.globals
        }

    def source(self, name: str) -> str:
        return dict(self.functions)[name]


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
        from dpatch._source import compile_like

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
    _CLASSES[key] = cls
    return cls


def _reduce_block(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # A generated class knows what it was generated from: pickle rebuilds it from that.
    origin: tuple[type, GeneratedCode] = type(self).__dict__["_dpatch_generated_from"]
    return (rebuild_block, origin, self.__getstate__())


def rebuild_block(orig_cls: type, code: GeneratedCode) -> nn.Module:
    """An empty instance of the patched class (pickle then restores its state)."""
    obj: nn.Module = object.__new__(generated_class(orig_cls, code))
    return obj
