"""Wrappers around a module's forward: the forward its source writes, the decorators on
it, and subclasses that do not wrap it again.

transformers 5's ``GradientCheckpointingLayer`` wraps every subclass's ``forward`` in its
``__init_subclass__``; decorators (``@deprecate_kwarg``, ``@can_return_tuple``) wrap it in
the source. A tracer must see the forward as written (torch.fx would trace a wrapper's
``*args, **kwargs`` with the inner signature), and its shadow classes must not be wrapped
a second time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["decorators_of", "plain_subclass", "wrapper_name", "wrapper_names", "written_forward"]


def written_forward(cls: type) -> Callable[..., Any]:
    """``cls.forward`` as its source writes it: decorators (``@deprecate_kwarg``,
    ``@can_return_tuple``) and wrappers a base class adds (transformers 5's
    ``GradientCheckpointingLayer`` wraps every subclass's forward) taken off."""
    fn: Callable[..., Any] = inspect.unwrap(cls.forward)  # type: ignore[attr-defined]
    return fn


def _wrappers(fn: Any) -> list[Any]:
    """The functions wrapped around ``fn``'s innermost one, outermost first."""
    chain: list[Any] = []
    while hasattr(fn, "__wrapped__"):
        chain.append(fn)
        fn = fn.__wrapped__
    return chain


def wrapper_names(fn: Any) -> list[str]:
    """:func:`wrapper_name` of each function wrapped around ``fn``'s innermost one."""
    return [wrapper_name(f) for f in _wrappers(fn)]


def wrapper_name(fn: Any) -> str:
    """``deprecate_kwarg`` for the function ``@deprecate_kwarg(...)`` made, from where its
    code is written (``functools.wraps`` copies the wrapped function's name)."""
    code = getattr(fn, "__code__", None)
    qualname = str(getattr(code, "co_qualname", "") or getattr(code, "co_name", "?"))
    return qualname.split(".<locals>", 1)[0]


def plain_subclass(cls: type, namespace: dict[str, Any]) -> tuple[type, int]:
    """``type(cls.__name__, (cls,), namespace)`` with ``forward`` exactly as given (or as
    inherited), and how many wrappers ``cls``'s ``__init_subclass__`` puts around a
    subclass's forward by itself. transformers 5's ``GradientCheckpointingLayer`` wraps
    every subclass's ``forward``; a tracer's shadow class must not get a second wrapper
    (torch.fx would trace the wrapper's ``*args, **kwargs`` with the inner signature)."""
    sub = type(cls.__name__, (cls,), {"__module__": cls.__module__, **namespace})
    installed = sub.__dict__.get("forward")
    wanted = namespace.get("forward")
    added = 0
    if installed is not None and installed is not wanted:
        chain = _wrappers(installed)
        inner = wanted if wanted is not None else cls.forward  # type: ignore[attr-defined]
        added = next((i for i, f in enumerate(chain) if f.__wrapped__ is inner), len(chain)) + 1
        if wanted is None:
            delattr(sub, "forward")
        else:
            type.__setattr__(sub, "forward", wanted)
    return sub, added


def decorators_of(cls: type) -> list[str]:
    """Names of the wrappers around ``cls.forward`` that its source puts there (decorators),
    not counting those a subclass gets by itself (``GradientCheckpointingLayer``'s)."""
    chain = _wrappers(cls.forward)  # type: ignore[attr-defined]
    if not chain:
        return []
    _, added = plain_subclass(cls, {"forward": written_forward(cls)})
    return [wrapper_name(f) for f in chain[added:]]
