"""Tracing a block whose forward branches on shapes: proxies that carry meta values.

torch.fx cannot trace ``B, H, W, C = x.shape`` followed by ``if H % window:``, nor unpack a
child's tuple output (``hidden, _ = self.attention(x)``, Hugging Face's layers): a proxy has
no value. Here every proxy carries the meta tensor (or tuple, or number) its node computes
on the block's recorded inputs, so shapes, ``len``, iteration and shape conditions resolve to
Python values while tracing (the idea of ``torch.fx.experimental.meta_tracer``). The graph is
then *specialised* to these shapes: good for finding the residual additions, not for
generating code. Each node also records the source span of the block's own ``forward``
expression that made it, so :mod:`dpatch.rewrite._source` can rewrite the forward's source instead
(keeping its control flow for every input shape).
"""

from __future__ import annotations

import inspect
import operator
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from dpatch.analysis._meta import meta_execution, to_meta
from dpatch.analysis._probe import Call
from dpatch.analysis._shadow import Recorder, shadow_of, watcher_class
from dpatch.analysis._trace import HelperSpan, LeafTracer, Span, TracedBlock
from dpatch.analysis._wrappers import plain_subclass, written_forward
from dpatch.errors import TraceError, first_line

__all__ = ["meta_trace"]


class _MetaProxy(fx.Proxy):
    """A proxy whose value is known on the meta device: shape questions get answers."""

    tracer: _MetaTracer

    @property
    def _value(self) -> Any:
        return self.tracer.values[self.node]

    def _tensor(self) -> Tensor:
        value = self._value
        if not isinstance(value, Tensor):
            raise TraceError(f"{self.node.name} is a {type(value).__name__}, not a tensor")
        return value

    @property
    def shape(self) -> torch.Size:
        return self._tensor().shape

    @property
    def ndim(self) -> int:
        return self._tensor().dim()

    @property
    def dtype(self) -> torch.dtype:
        return self._tensor().dtype

    @property
    def is_cuda(self) -> bool:
        return False

    def size(self, dim: int | None = None) -> Any:
        t = self._tensor()
        return t.shape if dim is None else t.shape[dim]

    def dim(self) -> int:
        return self._tensor().dim()

    def numel(self) -> int:
        return self._tensor().numel()

    def __len__(self) -> int:
        value = self._value
        return int(value.shape[0]) if isinstance(value, Tensor) else len(value)

    def __iter__(self) -> Iterator[Any]:
        return iter([self.__getitem__(i) for i in range(len(self))])

    def __setitem__(self, key: Any, value: Any) -> None:
        """``mask[:, rows, cols, :] = count`` (transformers 4's Swin builds its shifted-window
        mask so): an ``operator.setitem`` node, applied to the meta value in place."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __bool__(self) -> bool:
        value = self._value
        if isinstance(value, Tensor):
            raise TraceError("the forward branches on a tensor's values (data-dependent)")
        return bool(value)


class _MetaTracer(LeafTracer):
    """A leaf tracer whose proxies carry meta values and source spans."""

    def __init__(self, code: Any, placeholders: dict[str, Any], known: dict[int, Any]) -> None:
        super().__init__()
        self._known = known
        self.values: dict[fx.Node, Any] = {}
        self.spans: dict[fx.Node, Span] = {}
        self.helpers: dict[fx.Node, HelperSpan] = {}
        self._helper_positions: dict[Any, list[Any]] = {}
        self._code = code
        self._positions = list(code.co_positions()) if hasattr(code, "co_positions") else []
        self._placeholders = placeholders
        self._computing = False  # running a child for its meta value: no nodes, no proxies

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _MetaProxy(node, self)

    def create_arg(self, a: Any) -> Any:
        try:
            return super().create_arg(a)
        except NotImplementedError:
            # An object torch.fx has no node for (transformers' ``Cache``) is handed to
            # children as it is: this graph is specialised, read for its additions and
            # never turned into code.
            return a

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self._computing:
            return forward(*args, **kwargs)
        return self._structured(super().call_module(m, forward, args, kwargs))

    def _structured(self, value: Any) -> Any:
        """A child's tuple output as a tuple of proxies (one ``getitem`` each), so a forward
        can test ``type(out) is tuple``, slice it and unpack it as it would the real one."""
        if not isinstance(value, _MetaProxy):
            return value
        known = self.values.get(value.node)
        if not isinstance(known, list | tuple):
            return value
        items = [self._structured(value[i]) for i in range(len(known))]  # type: ignore[index]
        if hasattr(known, "_fields"):  # a named tuple
            return type(known)(*items)
        return type(known)(items)

    def create_proxy(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any = None,
        proxy_factory_fn: Any = None,
    ) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        try:
            self.values[proxy.node] = self._compute(kind, target, args, kwargs)
        except TraceError:
            raise
        except Exception as exc:
            # Never let an AttributeError out of here: fx's lazy ``Attribute.node`` property
            # would turn it into a fresh attribute proxy, and so on without end.
            what = f"{kind} {getattr(target, '__name__', target)}"
            raise TraceError(f"{what} does not run on meta: {type(exc).__name__}: {exc}") from exc
        span = self._span()
        if span is not None:
            self.spans[proxy.node] = span[0]
            if span[1] is not None:
                self.helpers[proxy.node] = span[1]
        return proxy

    def _compute(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            return self._placeholders.get(str(target))
        if kind == "output":
            return None

        def value(a: Any) -> Any:
            return self.values[a.node] if isinstance(a, fx.Proxy) else a

        args_v = fx.node.map_aggregate(args, value)
        kwargs_v = fx.node.map_aggregate(kwargs, value)
        self._computing = True
        try:
            if kind == "get_attr":
                obj: Any = self.root
                for atom in str(target).split("."):
                    obj = getattr(obj, atom)
                return to_meta(obj)
            if kind == "call_function":
                return target(*args_v, **kwargs_v)
            if kind == "call_method":
                return getattr(args_v[0], target)(*args_v[1:], **kwargs_v)
            child = self.root.get_submodule(str(target))
            if id(child) in self._known:
                # It ran once in the probe, on these very inputs: its output stands in.
                return to_meta(self._known[id(child)])
            return child(*args_v, **kwargs_v)
        finally:
            self._computing = False

    def _span(self) -> tuple[Span, HelperSpan | None] | None:
        """Where in the block's own forward the current operation is written, and, for an
        operation written in a function that forward calls (``dropout_add(x, residual,
        ...)``), where in that function."""
        frame = sys._getframe(2)
        child = None
        while frame is not None and frame.f_code is not self._code:
            child, frame = frame, frame.f_back  # type: ignore[assignment]
        if frame is None or not self._positions:
            return None
        span = _position(self._positions, frame.f_lasti)
        if span is None:
            return None
        helper = None
        code = child.f_code if child is not None else None
        if (
            code is not None
            and hasattr(code, "co_positions")
            and not code.co_filename.startswith(_LIBRARY_DIRS)
        ):
            if code not in self._helper_positions:
                self._helper_positions[code] = list(code.co_positions())
            inner = _position(self._helper_positions[code], child.f_lasti)  # type: ignore[union-attr]
            helper = HelperSpan(code, inner) if inner is not None else None
        return span, helper


#: Where torch.fx's and dpatch's own frames between a forward and its operations live.
_LIBRARY_DIRS = (
    str(Path(torch.__file__).parent) + os.sep,
    str(Path(__file__).parent.parent) + os.sep,
)


def _position(positions: list[Any], lasti: int) -> Span | None:
    line, end_line, col, end_col = positions[lasti // 2]
    if line is None or end_line is None or col is None or end_col is None:
        return None
    return Span(line, col, end_line, end_col)


def _flat_forward(
    fn: Callable[..., Any], bound: inspect.BoundArguments, names: list[str]
) -> Callable[..., Any]:
    """A forward with one positional parameter per tensor argument of the recorded call,
    calling ``fn`` with the rest of the call as recorded (torch.fx needs a fixed
    signature; Hugging Face layers take ``**kwargs``)."""
    sig = bound.signature
    this = next(iter(sig.parameters))

    def call(self: nn.Module, tensors: tuple[Any, ...]) -> Any:
        values = dict(bound.arguments)
        values.update(zip(names, tensors, strict=True))
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for pname, param in sig.parameters.items():
            if pname == this or pname not in values:
                continue
            v = values[pname]
            if param.kind == param.VAR_POSITIONAL:
                args.extend(v)
            elif param.kind == param.VAR_KEYWORD:
                kwargs.update(v)
            elif param.kind == param.KEYWORD_ONLY:
                kwargs[pname] = v
            else:
                args.append(v)
        return fn(self, *args, **kwargs)

    params = ", ".join(names)
    src = (
        f"def forward(self, {params}):\n    return _call(self, ({params}{',' if names else ''}))\n"
    )
    namespace: dict[str, Any] = {"_call": call}
    exec(compile(src, "<dpatch-meta-trace>", "exec"), namespace)
    forward: Callable[..., Any] = namespace["forward"]
    return forward


def meta_trace(
    mod: nn.Module,
    call: Call,
    known: dict[int, Any] | None = None,
    recorder: Recorder | None = None,
) -> TracedBlock:
    """Trace ``mod``'s own forward on its recorded call with value-carrying proxies.

    ``known`` maps id(child) to the output the probe saw when it ran once (not run again).

    Raises:
        TraceError: the forward cannot be traced even so (data-dependent control flow, an
            operation the meta device lacks, a forward Python cannot show).
    """
    cls: type[nn.Module] = type(mod)
    fn = written_forward(cls)
    if not hasattr(fn, "__code__"):
        raise TraceError("its forward is not Python code")
    args, kwargs = call
    try:
        bound = inspect.signature(fn).bind(mod, *args, **kwargs)
    except TypeError as exc:
        raise TraceError(f"the recorded call does not fit its forward ({exc})") from exc
    bound.apply_defaults()
    this = next(iter(bound.signature.parameters))  # ``self``, whatever its name
    names = [k for k, v in bound.arguments.items() if k != this and isinstance(v, Tensor)]
    placeholders = {k: to_meta(bound.arguments[k]) for k in names}
    # a plain subclass: no second wrapper from a base's __init_subclass__
    shadow_cls, _ = plain_subclass(watcher_class(cls), {"forward": _flat_forward(fn, bound, names)})
    shadow = shadow_of(mod, recorder=recorder, cls=shadow_cls)
    tracer = _MetaTracer(fn.__code__, placeholders, shadow.known(known or {}))
    try:
        with meta_execution(mod):
            graph = tracer.trace(shadow.module)
    except TraceError:
        raise
    except Exception as exc:
        raise TraceError(first_line(exc, typed=True)) from exc
    consts = {k: v for k, v in shadow.added().items() if k[:2] != "__"}
    return TracedBlock(
        graph,
        consts,
        reads_training=True,
        env={n: tracer.values.get(n) for n in graph.nodes},
        spans=dict(tracer.spans),
        helpers=dict(tracer.helpers),
        specialised=True,
    )
