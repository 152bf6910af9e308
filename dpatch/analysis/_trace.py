"""Tracing one block's own ``forward`` with torch.fx, and running the trace on meta inputs.

Every child module stays a leaf, so a block's graph is exactly its own forward code. The
tracer works on a shallow copy of the block: attributes the tracer adds (lifted tensor
constants) land on the copy, and reads of ``self.training`` are recorded. Blocks of one
configuration (the 12 blocks of a ViT) share one trace through :class:`TraceCache`.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn

from dpatch.analysis._meta import meta_execution, to_meta
from dpatch.analysis._probe import Call
from dpatch.analysis._residual import add_operands
from dpatch.analysis._shadow import (
    MODULE_INTERNALS,
    Recorder,
    freeze,
    shadow_of,
    structure,
    watcher_class,
)
from dpatch.analysis._wrappers import decorators_of, plain_subclass, written_forward
from dpatch.errors import TraceError, first_line

__all__ = [
    "HelperSpan",
    "LeafTracer",
    "Span",
    "TracedBlock",
    "bind_inputs",
    "concrete_candidates",
    "config_key",
    "run_graph_meta",
    "trace_and_run",
    "trace_module",
]


@dataclass(frozen=True)
class Span:
    """Where an expression is written: 1-based lines, 0-based UTF-8 byte columns (as
    ``ast`` and ``code.co_positions`` count them)."""

    line: int
    col: int
    end_line: int
    end_col: int


@dataclass(frozen=True)
class HelperSpan:
    """Where an operation is written inside a plain function a forward calls (transformers'
    ``dropout_add(x, residual, prob, training)``): the function's code and the span in it."""

    code: types.CodeType
    span: Span


@dataclass(frozen=True, eq=False)
class TracedBlock:
    """One block's traced forward and the facts the trace established.

    Attributes:
        graph: the block's own forward, children as ``call_module`` leaves.
        consts: tensor constants the tracer lifted (attribute name -> tensor); a rewritten
            block needs them as attributes.
        reads_training: the forward read ``self.training`` while tracing.
        concrete: arguments specialised to the constant they had (``mask=None``).
        env: the value of every node on the block's recorded meta inputs (empty when the
            graph has no addition, so nothing needed running).
        spans: where in the block's forward source each node was made (meta traces only).
        helpers: for a node made inside a function the forward calls, where in that
            function (meta traces only); its ``spans`` entry is the call.
        specialised: the graph holds the recorded shapes as constants (a forward that
            branches on shapes, traced by :mod:`dpatch.analysis._metatrace`): it finds sites, but
            the block is rewritten at source level, not generated from the graph.
    """

    graph: fx.Graph
    consts: dict[str, Any] = field(default_factory=dict)
    reads_training: bool = True
    concrete: dict[str, Any] = field(default_factory=dict)
    env: dict[fx.Node, Any] = field(default_factory=dict)
    spans: dict[fx.Node, Span] = field(default_factory=dict)
    helpers: dict[fx.Node, HelperSpan] = field(default_factory=dict)
    specialised: bool = False


class LeafTracer(fx.Tracer):
    """Traces one module's own forward: every submodule is a leaf.

    Buffers are traced as graph values, not touched: a forward such as timm's
    ``BatchNormAct2d`` updates ``num_batches_tracked`` in place, which would otherwise
    change the real model while tracing.
    """

    proxy_buffer_attributes = True

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_notrace_functions())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, dict) and dataclasses.is_dataclass(a) and not isinstance(a, type):
            # transformers' ``ModelOutput`` is a dict and a dataclass: torch.fx would turn
            # it into a plain dict, which its caller cannot index (``outputs[0]``). It is
            # built again by its class, as torch.fx does for other dataclasses.
            fields = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a)}
            return self.create_node("call_function", type(a), (), fields)
        return super().create_arg(a)


#: Random functions: called on no traced value, they run once while tracing and a graph
#: would hold that one draw (wav2vec2's LayerDrop, ``torch.rand([]) < layerdrop``).
_RANDOM: frozenset[Any] = frozenset(
    {
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.bernoulli,
        torch.multinomial,
        torch.normal,
        torch.poisson,
    }
)


class _HostRandom(torch.overrides.TorchFunctionMode):
    """Refuses a random draw that would run once at trace time instead of in the graph."""

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _RANDOM and not any(
            isinstance(v, fx.Proxy) for v in pytree.tree_leaves((args, kwargs))
        ):
            raise TraceError(
                f"its forward draws random numbers ({getattr(func, '__name__', func)}) "
                "that a traced graph would fix once"
            )
        return func(*args, **kwargs)


def _notrace_functions() -> tuple[Callable[..., Any], ...]:
    """Functions timm marks as untraceable (shape asserts, resampling), when timm is loaded."""
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is None:
        return ()
    return tuple(f for f in timm_fx.get_notrace_functions() if callable(f))


def trace_module(
    module: nn.Module,
    training: bool | None = None,
    concrete_args: dict[str, Any] | None = None,
    recorder: Recorder | None = None,
) -> TracedBlock:
    """Trace ``module``'s own forward (children as leaves) without touching ``module``.

    Python attributes such as ``self.training`` are read at trace time, so the shadow copy
    carries the requested mode (default: the module's own). ``concrete_args`` (optional
    arguments recorded as None or a constant) are specialised, with torch.fx's guards that
    fail loudly on other values. ``recorder`` logs what the forward reads (see
    :mod:`dpatch.analysis._shadow`).
    """
    cls = type(module)
    decorated = decorators_of(cls)
    if decorated:
        # A graph holds one call's worth of what a decorator does (renaming arguments,
        # converting outputs); the source-level rewrite keeps the decorator instead.
        raise TraceError(f"its forward is decorated (@{decorated[0]})")
    # the forward as its source writes it, with no wrapper a base class adds
    root_cls, _ = plain_subclass(watcher_class(cls), {"forward": written_forward(cls)})
    shadow = shadow_of(module, recorder=recorder, training=training, cls=root_cls)
    with _HostRandom():
        graph = LeafTracer().trace(shadow.module, concrete_args=concrete_args)
    if concrete_args:
        _restore_arg_names(graph, set(concrete_args))
    _resolve_annotations(graph, type(module))
    reads = shadow.recorder.read_training
    return TracedBlock(graph, shadow.added(), reads, dict(concrete_args or {}))


def _resolve_annotations(graph: fx.Graph, cls: type[nn.Module]) -> None:
    """Turn string annotations (a module written under ``from __future__ import
    annotations``) into the types they name, so generated code carries real types that
    TorchScript can resolve; an annotation that does not resolve is dropped (TorchScript
    then assumes a Tensor, eager code never reads it)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder" and isinstance(n.type, str)]
    if not placeholders:
        return
    try:
        hints = typing.get_type_hints(written_forward(cls))
    except Exception:  # an annotation naming something not importable here
        hints = {}
    for n in placeholders:
        n.type = hints.get(str(n.target).lstrip("*"))


def _restore_arg_names(graph: fx.Graph, names: set[str]) -> None:
    """torch.fx renames specialised arguments (``mask`` -> ``mask_1``); a rewritten forward
    must keep the original keyword names, so they are put back where nothing clashes."""
    used = {n.name for n in graph.nodes}
    for n in graph.nodes:
        if n.op != "placeholder" or not isinstance(n.target, str):
            continue
        base = n.target.rsplit("_", 1)[0]
        if n.target.endswith("_1") and base in names and base not in used:
            n.target = base
            n.name = base
            used.add(base)
    graph.lint()


def concrete_candidates(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Recorded arguments that are None or plain constants: specialisable when tracing fails."""
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
    except (TypeError, ValueError):
        return {}
    return {
        k: v
        for k, v in bound.arguments.items()
        if v is None or isinstance(v, bool | int | float | str)
    }


def bind_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Positional values for a traced graph's placeholders from a recorded call."""
    sig = inspect.signature(module.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    values: list[Any] = []
    for name, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"forward takes *{name}; dpatch traces fixed signatures only")
        values.append(bound.arguments[name])
    return values


class _ConstInterpreter(fx.Interpreter):
    """An Interpreter that also knows the tensor constants the tracer lifted."""

    def __init__(self, module: nn.Module, traced: TracedBlock, known: dict[int, Any]) -> None:
        super().__init__(module, garbage_collect_values=False, graph=traced.graph)
        self.consts = traced.consts
        self.known = known

    def fetch_attr(self, target: str) -> Any:
        if target in self.consts:
            return to_meta(self.consts[target])
        return super().fetch_attr(target)

    def call_module(self, target: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        # A child the probe saw run exactly once gets the same inputs here: its recorded
        # output stands in, so interpreting a stage does not run the network under it again.
        known = self.known.get(id(self.fetch_attr(target)))
        if known is not None:
            return to_meta(known)
        return super().call_module(target, args, kwargs)


def run_graph_meta(
    block: nn.Module, traced: TracedBlock, call: Call, known: dict[int, Any] | None = None
) -> dict[fx.Node, Any]:
    """Values of every node of ``traced`` on meta inputs, ``block``'s state swapped to meta.

    ``known`` maps id(child) to the output it gave for these inputs (children the probe saw
    run once); those are not run again.
    """
    args, kwargs = call
    values = [to_meta(v) for v in bind_inputs(block, args, kwargs)]
    interp = _ConstInterpreter(block, traced, known or {})
    with meta_execution(block):
        interp.run(*values)
    return interp.env


def _with_env(
    mod: nn.Module, traced: TracedBlock, call: Call, known: dict[int, Any]
) -> TracedBlock:
    if not any(add_operands(n) is not None for n in traced.graph.nodes):
        return traced  # nothing to classify: no need to run it
    return replace(traced, env=run_graph_meta(mod, traced, call, known))


def trace_and_run(
    mod: nn.Module,
    call: Call,
    known: dict[int, Any] | None = None,
    recorder: Recorder | None = None,
    *,
    specialise: bool = False,
) -> TracedBlock:
    """Trace ``mod`` and run the graph on its recorded inputs. With ``specialise``, its
    None/constant arguments are specialised (``if mask is not None:`` needs that): the
    graph then holds for those values only, under torch.fx's guards. ``recorder`` logs
    what the forward reads.

    Raises:
        TraceError: the trace or its run failed (or, with ``specialise``, there is no
            argument to specialise); the message says why.
    """
    known = known or {}
    concrete = concrete_candidates(mod, *call) if specialise else {}
    if specialise and not concrete:
        raise TraceError("no None or constant argument to specialise")
    traced: TracedBlock | None = None
    try:
        traced = trace_module(mod, concrete_args=concrete or None, recorder=recorder)
        return _with_env(mod, traced, call, known)
    except Exception as exc:
        stage = "could not trace" if traced is None else "traced graph does not run"
        raise TraceError(f"{stage}: {first_line(exc, typed=True)}") from exc


# --------------------------------------------------------------------------- trace keys
def config_key(mod: nn.Module, call: Call) -> Hashable | None:
    """What a trace of ``mod`` depends on, as far as can be told before tracing: its class,
    plain attributes, the structure of every module under it (container lengths and keys
    included), and which recorded arguments are None or constants. None when the module
    holds something a trace could capture by value (a tensor attribute). What the forward
    reads of the modules under it is checked after tracing (:class:`Reads`)."""
    args, kwargs = call
    try:
        attrs = tuple((k, freeze(v)) for k, v in mod.__dict__.items() if k not in MODULE_INTERNALS)
        arguments = tuple(
            (k, "tensor" if isinstance(v, Tensor) else freeze(v))
            for k, v in [*enumerate(args), *kwargs.items()]
        )
    except TypeError:
        return None
    return (type(mod), attrs, structure(mod), arguments)
