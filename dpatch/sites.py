"""Finding residual sites: native DropPath slots and residual additions found by tracing.

Read-only: nothing here changes the model (hooks are added and removed, traced copies are
shallow copies). The public result is a list of frozen :class:`Site`; :func:`analyze`
returns the richer internal :class:`Analysis` that :mod:`dpatch.patch` and
:mod:`dpatch.rewrite` use.

How a site is found:

1. *Probe*: one forward pass with every parameter and buffer swapped for a ``meta`` tensor
   (:func:`on_meta`), so it costs no compute and changes no state. Forward
   pre-hooks record which modules run, in which order, and with which inputs.
2. *Trace*: each module that ran and has children is traced on its own with torch.fx, all
   its children kept as leaves, so the graph is exactly that module's own forward code.
3. *Interpret*: the graph runs on the recorded meta inputs to learn every value's shape.
4. *Classify*: an addition ``a + b`` of two same-shaped activations is residual when one
   operand (the branch) holds learned computation that the other (the shortcut) lacks and
   both grow from one activation (``x + f(x)``, ``proj(x) + f(x)``), or the shortcut is a
   tensor handed in as an argument (Hugging Face ``ViTOutput``-style). A native slot
   (timm/torchvision/dpatch DropPath, a slot-named ``nn.Identity`` or ``None``) on one
   operand marks it as the branch. When a model has native slots, they alone define its
   sites: the model author chose where stochastic depth belongs.
"""

from __future__ import annotations

import inspect
import operator
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from dpatch.droppath import DropPath
from dpatch.errors import InvalidValueError, TraceError

__all__ = ["SLOT_ATTRS", "Site", "find_sites", "is_slot_module"]

#: Attribute names timm and torchvision give their stochastic-depth slots.
SLOT_ATTRS: tuple[str, ...] = (
    "drop_path",
    "drop_path1",
    "drop_path2",
    "drop_path3",
    "attn_drop_path",
    "mlp_drop_path",
    "mhsa_drop_path",
    "mhca_drop_path",
    "stochastic_depth",
)

#: Marker a rewritten block's class carries (see :mod:`dpatch.rewrite`).
PATCH_ATTR = "_dpatch_patch"

_PROBE_BATCH = 2
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
class Site:
    """One residual branch and the stochastic depth on it.

    Attributes:
        path: qualified name of the module whose forward adds the branch ("" for the root).
        branch: name of the branch inside that module: its slot attribute (``drop_path1``)
            or, for a slot nested deeper, the slot's path relative to ``path``.
        block: 0-based depth index of the owning block in forward execution order.
        kind: ``"native"`` (a timm/torchvision/dpatch slot the model author placed) or
            ``"graph"`` (a residual addition found by tracing).
        rate: current drop probability.
        mode: ``"row"`` or ``"batch"``.
        scaling: ``"inverted"``, ``"expected"`` or ``"none"``.
        slot: qualified name of the module that applies the drop (may not exist yet on an
            unpatched model: a ``None`` slot or a graph site).
        fused: the residual addition runs through dpatch's fused ``drop_add``.
        skip: compute-skipping is on for this site.
        origin: for native sites, the model's own slot this site came from (a slot one
            module shared by two branches is the origin of both); "" for graph sites.
    """

    path: str
    branch: str
    block: int
    kind: str
    rate: float
    mode: str = "row"
    scaling: str = "inverted"
    slot: str = ""
    fused: bool = False
    skip: bool = False
    origin: str = ""

    @property
    def name(self) -> str:
        """``path.branch``, the site's unique name in the model."""
        return qualify(self.path, self.branch)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (used by manifests and ``--json`` output)."""
        return {
            "path": self.path,
            "branch": self.branch,
            "block": self.block,
            "kind": self.kind,
            "rate": self.rate,
            "mode": self.mode,
            "scaling": self.scaling,
            "slot": self.slot,
            "fused": self.fused,
            "skip": self.skip,
            "origin": self.origin,
        }


# --------------------------------------------------------------------------- slots
def _slot_types() -> tuple[type, ...]:
    """DropPath-like classes of the libraries that are loaded (no import is forced)."""
    types: list[type] = [DropPath]
    timm_drop = sys.modules.get("timm.layers.drop")
    if timm_drop is not None:
        types.append(timm_drop.DropPath)
    tv_sd = sys.modules.get("torchvision.ops.stochastic_depth")
    if tv_sd is not None:
        types.append(tv_sd.StochasticDepth)
    return tuple(types)


def is_slot_module(module: object, attr: str | None = None) -> bool:
    """True for a DropPath-like module, or an ``nn.Identity`` stored under a slot name."""
    if isinstance(module, _slot_types()):
        return True
    return isinstance(module, nn.Identity) and attr is not None and attr in SLOT_ATTRS


def slot_settings(module: object) -> tuple[float, str, str]:
    """(rate, mode, scaling) of a slot module; an Identity or None slot is rate 0."""
    if isinstance(module, DropPath):
        return module.drop_prob, module.mode, module.scaling
    tv_sd = sys.modules.get("torchvision.ops.stochastic_depth")
    if tv_sd is not None and isinstance(module, tv_sd.StochasticDepth):
        return float(module.p), str(module.mode), "inverted"
    timm_drop = sys.modules.get("timm.layers.drop")
    if timm_drop is not None and isinstance(module, timm_drop.DropPath):
        scaling = "inverted" if getattr(module, "scale_by_keep", True) else "none"
        return float(module.drop_prob), "row", scaling
    return 0.0, "row", "inverted"


# --------------------------------------------------------------------------- tracing
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


def _notrace_functions() -> tuple[Callable[..., Any], ...]:
    """Functions timm marks as untraceable (shape asserts, resampling), when timm is loaded."""
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is None:
        return ()
    return tuple(f for f in timm_fx.get_notrace_functions() if callable(f))


def _training_watcher(cls: type) -> type:
    """A subclass of ``cls`` whose ``training`` attribute records that it was read."""

    def get(self: nn.Module) -> bool:
        self.__dict__["_dpatch_read_training"] = True
        return bool(self.__dict__["training"])

    def set_(self: nn.Module, value: bool) -> None:
        self.__dict__["training"] = value

    return type(
        cls.__name__, (cls,), {"training": property(get, set_), "__module__": cls.__module__}
    )


def trace_module(
    module: nn.Module,
    training: bool | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> fx.Graph:
    """Trace ``module``'s own forward (children as leaves) without touching ``module``.

    The tracer runs the forward on a shallow copy: Python attributes such as
    ``self.training`` are read at trace time, so the copy carries the requested mode and
    records whether the forward read it (``graph._dpatch_reads_training``); attributes the
    tracer adds (tensor constants) land on the copy and are returned in
    ``graph._dpatch_consts``. ``concrete_args`` (optional arguments recorded as None or a
    constant) are specialised, with torch.fx's guards that fail loudly on other values.
    """
    shadow: nn.Module = object.__new__(_training_watcher(type(module)))
    shadow.__dict__ = dict(module.__dict__)
    if training is not None:
        shadow.__dict__["training"] = training
    before = set(shadow.__dict__)
    graph = LeafTracer().trace(shadow, concrete_args=concrete_args)
    if concrete_args:
        _restore_arg_names(graph, set(concrete_args))
    graph._dpatch_concrete = dict(concrete_args or {})  # type: ignore[attr-defined]
    reads = bool(shadow.__dict__.pop("_dpatch_read_training", False))
    graph._dpatch_reads_training = reads  # type: ignore[attr-defined]
    graph._dpatch_consts = {  # type: ignore[attr-defined]
        k: v for k, v in shadow.__dict__.items() if k not in before
    }
    return graph


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


# --------------------------------------------------------------------------- probing
@dataclass
class Probe:
    """What one meta-device forward pass saw."""

    order: dict[int, int] = field(default_factory=dict)  # id(module) -> first-call index
    calls: dict[int, int] = field(default_factory=dict)  # id(module) -> number of calls
    inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    outputs: dict[int, Any] = field(default_factory=dict)  # id(module) -> first output
    error: str | None = None


def default_example_input(model: nn.Module, batch: int = _PROBE_BATCH) -> Tensor:
    """An input of the size the model expects: timm's ``pretrained_cfg``, torchvision ViT's
    ``image_size``, else 3x224x224."""
    size: Sequence[int] = (3, 224, 224)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), list | tuple):
        size = tuple(int(s) for s in cfg["input_size"])
    elif isinstance(getattr(model, "image_size", None), int):
        size = (3, int(model.image_size), int(model.image_size))  # type: ignore[arg-type]
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(img_size, list | tuple) and len(img_size) == 2 and img_size[0]:
        size = (size[0], int(img_size[0]), int(img_size[1]))
    return torch.empty((batch, *size), device="meta")


def to_meta(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value if value.is_meta else torch.empty_like(value, device="meta")
    if isinstance(value, list | tuple):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


# Meta kernels of common layers are slow Python decompositions (batch norm ~4 ms, linear
# ~1 ms, attention ~2.5 ms per call); on meta inputs the probe answers them from shapes.
_F = torch.nn.functional
_SHAPE_PRESERVING: frozenset[Any] = frozenset(
    {
        torch.batch_norm, _F.batch_norm, _F.layer_norm, torch.layer_norm, _F.group_norm,
        torch.group_norm, _F.instance_norm, torch.instance_norm, _F.rms_norm,
        _F.gelu, _F.relu, _F.relu6, _F.silu, _F.mish, _F.hardswish, _F.hardsigmoid,
        _F.leaky_relu, _F.elu, _F.selu, _F.celu, _F.softplus, _F.dropout, _F.dropout1d,
        _F.dropout2d, _F.softmax, _F.log_softmax, torch.sigmoid, torch.tanh, torch.relu,
        torch.softmax, torch.dropout,
    }
)  # fmt: skip


def _fast_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _fast_sdpa(q: Tensor, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_SHAPE_RULES: dict[Any, Callable[..., Tensor]] = {
    _F.linear: _fast_linear,
    _F.scaled_dot_product_attention: _fast_sdpa,
}


class MetaMode(torch.overrides.TorchFunctionMode):
    """Meta-device evaluation: factories default to meta; slow layers are answered by shape
    alone (the values of meta tensors do not exist, only their shapes matter)."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if args and isinstance(args[0], Tensor) and args[0].is_meta:
            if func in _SHAPE_PRESERVING:
                return torch.empty_like(args[0])
            rule = _SHAPE_RULES.get(func)
            if rule is not None:
                return rule(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def swapped_state(module: nn.Module, make: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Temporarily replace every parameter and buffer of ``module`` by ``make(tensor)``.

    Each distinct tensor is replaced once, so modules shared between parents (CoaT, tied
    weights) stay shared; everything is put back on exit, whatever happens inside. In-place
    updates during the call (BatchNorm statistics) land on the replacements.
    """
    made: dict[int, Tensor] = {}
    saved: list[tuple[dict[str, Any], str, Tensor]] = []
    # Some forwards cache values on the module (ConViT's ``rel_indices``): plain
    # attributes are put back too.
    attrs = [(m, dict(m.__dict__)) for m in module.modules()]
    try:
        for m in module.modules():
            stores: tuple[dict[str, Any], ...] = (m._parameters, m._buffers)
            for store in stores:
                for key, t in list(store.items()):
                    if t is None:
                        continue
                    if id(t) not in made:
                        new: Tensor = make(t)
                        if isinstance(t, nn.Parameter):
                            new = nn.Parameter(new, requires_grad=t.requires_grad)
                        made[id(t)] = new
                    saved.append((store, key, t))
                    store[key] = made[id(t)]
        yield
    finally:
        for store, key, t in reversed(saved):
            store[key] = t
        for m, before in attrs:
            current = m.__dict__
            for key in [k for k in current if k not in before]:
                del current[key]
            for key, value in before.items():
                if current.get(key) is not value:
                    current[key] = value


def on_meta(module: nn.Module) -> Any:
    """``swapped_state`` with empty meta tensors: runs cost nothing and change nothing."""
    return swapped_state(module, lambda t: torch.empty_like(t, device="meta"))


def probe(model: nn.Module, example_inputs: Sequence[Any] | None = None) -> Probe:
    """Run ``model`` once, recording call order and each module's inputs.

    The pass runs on the meta device (free). A model whose forward needs real values
    (data-dependent control flow, ``.item()``) runs once more on random inputs on its own
    device, under ``no_grad`` and with copies of its buffers, so nothing of it changes.
    """
    inputs = (
        tuple(to_meta(v) for v in example_inputs)
        if example_inputs
        else (default_example_input(model),)
    )
    result = _probe_once(model, inputs, meta=True)
    if result.error is None:
        return result
    device = next((t.device for t in model.parameters() if not t.is_meta), None)
    if device is None:
        return result
    real = _probe_once(model, tuple(_materialise(v, device) for v in inputs), meta=False)
    return real if real.error is None else result


def _materialise(value: Any, device: torch.device) -> Any:
    """A random real tensor shaped like a meta one (integers: zeros)."""
    if isinstance(value, Tensor):
        if value.is_floating_point():
            return torch.randn(value.shape, dtype=value.dtype, device=device)
        return torch.zeros(value.shape, dtype=value.dtype, device=device)
    if isinstance(value, list | tuple):
        return type(value)(_materialise(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _materialise(v, device) for k, v in value.items()}
    return value


def _probe_once(model: nn.Module, inputs: tuple[Any, ...], *, meta: bool) -> Probe:
    result = Probe()

    def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key = id(mod)
        result.calls[key] = result.calls.get(key, 0) + 1
        if key not in result.order:
            result.order[key] = len(result.order)
            result.inputs[key] = (args, dict(kwargs))

    def post_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        result.outputs.setdefault(id(mod), output)

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(post_hook) for m in model.modules()]
    try:
        if meta:
            with torch.no_grad(), on_meta(model), torch.device("meta"), MetaMode():
                model(*inputs)
        else:
            with torch.no_grad(), swapped_state(model, _clone_buffer):
                model(*inputs)
    except Exception as exc:  # any model code can fail here; the caller reports it
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        for h in handles:
            h.remove()
    return result


class _ConstInterpreter(fx.Interpreter):
    """An Interpreter that also finds the tensor constants the tracer lifted (``trace_module``)."""

    def __init__(
        self, module: nn.Module, graph: fx.Graph, known: dict[int, Any] | None = None
    ) -> None:
        super().__init__(module, garbage_collect_values=False, graph=graph)
        self.consts: dict[str, Any] = getattr(graph, "_dpatch_consts", {})
        self.known = known or {}

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


def _clone_buffer(t: Tensor) -> Tensor:
    return t if isinstance(t, nn.Parameter) else t.clone()


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


def run_graph_meta(
    block: nn.Module,
    graph: fx.Graph,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    known: dict[int, Any] | None = None,
) -> dict[fx.Node, Any]:
    """Values of every node of ``graph`` on meta inputs, ``block``'s state swapped to meta.

    ``known`` maps id(child) to the output it gave for these inputs (children the probe saw
    run once); those are not run again.
    """
    values = [to_meta(v) for v in bind_inputs(block, args, kwargs)]
    interp = _ConstInterpreter(block, graph, known)
    with torch.no_grad(), on_meta(block), torch.device("meta"), MetaMode():
        interp.run(*values)
    return interp.env


# --------------------------------------------------------------------------- classification
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__", "__radd__")
INPLACE_ADDS: tuple[Any, ...] = (operator.iadd, "add_", "__iadd__")


@dataclass(frozen=True)
class AddOperands:
    """``out = first + alpha * second`` as an addition node reads."""

    first: fx.Node
    second: fx.Node
    alpha: float


def add_operands(node: fx.Node) -> AddOperands | None:
    """The tensor operands of an addition node, or None if ``node`` is not one."""
    if (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    ):
        pass
    else:
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


class _Ancestry:
    """Memoised ancestor sets (each node included in its own set)."""

    def __init__(self) -> None:
        self._memo: dict[fx.Node, frozenset[fx.Node]] = {}

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
            stack.extend(n.all_input_nodes)
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


def _is_tensor(value: Any) -> bool:
    return isinstance(value, Tensor)


@dataclass
class ResidualAdd:
    """A residual addition in one block's traced graph (internal)."""

    node: fx.Node
    shortcut: fx.Node
    branch: fx.Node
    alpha: float  # multiplies the branch (``torch.add(x, b, alpha=)``)
    slot_node: fx.Node | None = None  # call_module of a native slot on the branch


def find_residual_adds(
    block: nn.Module,
    graph: fx.Graph,
    env: dict[fx.Node, Any],
    slot_nodes: Sequence[fx.Node],
) -> list[ResidualAdd]:
    """Residual additions of one block's graph, in execution order."""
    anc = _Ancestry()
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
        if not _has_activation(anc_a, env) or not _has_activation(anc_b, env):
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
        shortcut, branch = (a, b) if cost_b > cost_a else (b, a)
        if branch is a and ops.alpha != 1.0:
            continue  # ``branch + alpha * shortcut``: a scaled shortcut is not a residual
        # The nearest values both operands grow from must include an activation tensor:
        # ``x`` in ``x + f(x)``. Res2Net's ``f(split[0]) + split[1]`` meet only at the
        # tuple ``split``, so that addition mixes two channel groups, not a residual.
        common = anc_a & anc_b
        frontier = [n for n in common if not any(u in common for u in n.users)]
        shares_source = any(_is_tensor(env.get(n)) and n.op != "get_attr" for n in frontier)
        fed_in = shortcut.op == "placeholder" and _is_tensor(env.get(shortcut))
        if not (shares_source or fed_in):
            continue
        found.append(ResidualAdd(node, shortcut, branch, ops.alpha if branch is b else 1.0))
    return found


def _has_activation(nodes: Iterable[fx.Node], env: dict[fx.Node, Any]) -> bool:
    """True when ``nodes`` include a tensor input of the block (not only parameters)."""
    for n in nodes:
        if n.op != "placeholder":
            continue
        value = env.get(n)
        if _is_tensor(value):
            return True
        if isinstance(value, list | tuple) and any(_is_tensor(v) for v in value):
            return True
    return False


# --------------------------------------------------------------------------- analysis
@dataclass
class BlockSites:
    """Residual sites of one module's own forward (internal)."""

    path: str
    module: nn.Module
    order: int
    graph: fx.Graph | None
    env: dict[fx.Node, Any]
    adds: list[ResidualAdd]
    slot_attrs: list[str]  # per add: the attribute that holds (or will hold) its DropPath
    kinds: list[str]  # per add: "native" or "graph"
    origins: list[str]  # per add: the model's own slot attribute, "" for graph sites
    patched: bool = False  # already rewritten by dpatch


@dataclass
class LooseSlot:
    """A native slot that is called but not on a traced residual add (internal)."""

    slot_path: str
    owner_path: str
    order: int


@dataclass
class Analysis:
    """Everything :func:`analyze` learned about a model (internal)."""

    model: nn.Module
    blocks: list[BlockSites]
    loose: list[LooseSlot]
    skipped: list[tuple[str, str]]  # (path, reason)
    ignored_graph_sites: int
    probe_error: str | None
    example_inputs: tuple[Any, ...] | None
    inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]]  # id(module) -> recorded call

    def sites(self) -> list[Site]:
        return _build_sites(self)


def _candidates(model: nn.Module, probe_result: Probe) -> Iterator[tuple[str, nn.Module]]:
    for path, mod in model.named_modules():
        if id(mod) not in probe_result.order:
            continue
        if not any(True for _ in mod.children()):
            continue
        if isinstance(mod, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            continue
        if type(mod).__module__.startswith(("torch.nn.", "torch.ao.nn.")):
            continue  # PyTorch's own layers (MultiheadAttention, Transformer*) are leaves
        yield path, mod


def _child_name(path: str, child_path: str) -> str:
    return child_path[len(path) + 1 :] if path else child_path


def analyze(model: nn.Module, example_inputs: Sequence[Any] | None = None) -> Analysis:
    """Probe, trace and classify ``model`` (internal; :func:`find_sites` is the public form).

    Raises:
        InvalidValueError: the model has lazy modules that were never run.
    """
    lazy = next(
        (n for n, p in model.named_parameters() if isinstance(p, nn.UninitializedParameter)),
        None,
    )
    if lazy is not None:
        raise InvalidValueError(
            f"parameter {lazy!r} is uninitialized (a lazy module); run one forward pass to "
            "materialize the model before patching it"
        )
    pr = probe(model, example_inputs)
    skipped: list[tuple[str, str]] = []
    if pr.error is not None:
        skipped.append(("", f"forward on the meta device failed ({pr.error})"))
    slot_paths_called = {
        n
        for n, m in model.named_modules()
        if id(m) in pr.order and is_slot_module(m, n.rsplit(".", 1)[-1])
    }

    blocks: list[BlockSites] = []
    covered_slots: set[str] = set()
    traced_slots: set[str] = set()  # slots a traced forward calls (residual or not)
    none_loose: list[LooseSlot] = []  # ``None`` slots of blocks that cannot be traced
    idle_none_slots: set[str] = set()  # ``None`` slots of traced blocks, on no residual
    # Blocks of one configuration (the 12 blocks of a ViT) share one trace and its analysis.
    traces: dict[Hashable, tuple[fx.Graph, dict[fx.Node, Any]] | Exception] = {}
    once = {k: v for k, v in pr.outputs.items() if pr.calls.get(k) == 1}
    residuals: dict[tuple[int, str], list[ResidualAdd]] = {}
    sources: dict[type, str | None] = {}
    for path, mod in _candidates(model, pr):
        patch_meta = mod.__dict__.get("_dpatch_meta")
        if patch_meta is not None:
            blocks.append(_patched_block(path, mod, pr.order[id(mod)], patch_meta))
            covered_slots.update(qualify(path, a) for a in blocks[-1].slot_attrs)
            continue
        args, kwargs = pr.inputs[id(mod)]
        key = _config_key(mod, args, kwargs)
        cached = traces.get(key) if key is not None else None
        try:
            if cached is None:
                try:
                    cached = _trace_and_run(mod, args, kwargs, once)
                except Exception as exc:
                    cached = exc
                if key is not None:
                    traces[key] = cached
            if isinstance(cached, Exception):
                raise cached
            graph, env = cached
        except Exception as exc:
            if _has_own_add_source(mod, sources):
                skipped.append((path, _one_line(exc)))
            # timm's ``drop_path = None`` slots still work unfused: the forward calls them
            # once they hold a module.
            none_loose += [
                LooseSlot(qualify(path, a), path, pr.order[id(mod)])
                for a in _referenced_none_slots(mod, sources)
            ]
            continue
        slot_nodes = [
            n
            for n in graph.nodes
            if n.op == "call_module"
            and is_slot_module(mod.get_submodule(str(n.target)), str(n.target).rsplit(".", 1)[-1])
        ]
        traced_slots.update(qualify(path, str(n.target)) for n in slot_nodes)
        adds_key = (id(graph), "adds")
        if adds_key not in residuals:
            residuals[adds_key] = find_residual_adds(mod, graph, env, slot_nodes)
        adds = residuals[adds_key]
        attrs, kinds, origins = _assign_slots(mod, adds)
        idle_none_slots.update(
            qualify(path, a) for a in _referenced_none_slots(mod, sources) if a not in attrs
        )
        if not adds:
            continue
        blk = BlockSites(path, mod, pr.order[id(mod)], graph, env, adds, attrs, kinds, origins)
        blocks.append(blk)
        for add in adds:
            if add.slot_node is not None:
                q = str(add.slot_node.target)
                covered_slots.add(qualify(path, q))

    # A slot seen in a traced forward but on no residual addition is not a site (timm's
    # RDNet drops features it concatenates); one never seen in a trace (inside a leaf
    # nn.Sequential, or in a block that cannot be traced) is taken at its word.
    not_residual = sorted((traced_slots - covered_slots) | idle_none_slots)
    loose = [
        LooseSlot(s, _owner_of(s, blocks, model), pr.order[id(model.get_submodule(s))])
        for s in sorted(
            slot_paths_called - covered_slots - traced_slots,
            key=lambda s: pr.order[id(model.get_submodule(s))],
        )
    ]
    loose = sorted(loose + none_loose, key=lambda s: s.order)
    has_native = bool(loose) or any(k == "native" for b in blocks for k in b.kinds)
    ignored = 0
    if has_native:
        # Trace failures cannot hide sites here: native slots are found by the probe.
        skipped = [(p, r) for p, r in skipped if p == "" and r.startswith("forward on the meta")]
        kept: list[BlockSites] = []
        for b in blocks:
            keep_idx = [i for i, k in enumerate(b.kinds) if k == "native"]
            ignored += len(b.kinds) - len(keep_idx)
            if not keep_idx:
                continue
            b.adds = [b.adds[i] for i in keep_idx] if b.adds else []
            b.slot_attrs = [b.slot_attrs[i] for i in keep_idx]
            b.kinds = [b.kinds[i] for i in keep_idx]
            b.origins = [b.origins[i] for i in keep_idx]
            kept.append(b)
        blocks = kept
    skipped += [
        (
            s,
            "slot is not added to a residual branch; left alone"
            + (
                " (empty, and this block's forward does not use it)" if s in idle_none_slots else ""
            ),
        )
        for s in not_residual
    ]
    return Analysis(
        model=model,
        blocks=blocks,
        loose=loose,
        skipped=skipped,
        ignored_graph_sites=ignored,
        probe_error=pr.error,
        example_inputs=tuple(example_inputs) if example_inputs else None,
        inputs=pr.inputs,
    )


def _trace_and_run(
    mod: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    known: dict[int, Any] | None = None,
) -> tuple[fx.Graph, dict[fx.Node, Any]]:
    """Trace ``mod`` and run the graph on its recorded inputs; if either fails, try again
    with its None/constant arguments specialised (``if mask is not None:`` needs that).

    Raises:
        TraceError: neither attempt worked; the message says why.
    """
    graph: fx.Graph | None = None
    try:
        graph = trace_module(mod)
        if not any(add_operands(n) is not None for n in graph.nodes):
            return graph, {}
        return graph, run_graph_meta(mod, graph, args, kwargs, known)
    except Exception as first:
        concrete = concrete_candidates(mod, args, kwargs)
        stage = "could not trace" if graph is None else "traced graph does not run"
        if not concrete:
            raise TraceError(f"{stage}: {_one_line(first)}") from first
        try:
            graph = trace_module(mod, concrete_args=concrete)
            if not any(add_operands(n) is not None for n in graph.nodes):
                return graph, {}
            return graph, run_graph_meta(mod, graph, args, kwargs, known)
        except Exception:
            raise TraceError(f"{stage}: {_one_line(first)}") from first


def _one_line(exc: BaseException) -> str:
    head = "" if isinstance(exc, TraceError) else f"{type(exc).__name__}: "
    text = f"{head}{exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _forward_source(mod: nn.Module, memo: dict[type, str | None]) -> str | None:
    cls = type(mod)
    if cls not in memo:
        try:
            memo[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            memo[cls] = None
    return memo[cls]


def _has_own_add_source(mod: nn.Module, memo: dict[type, str | None]) -> bool:
    """Whether an untraceable module's forward source could hold an addition (for reports)."""
    src = _forward_source(mod, memo)
    return src is None or "+" in src or "add" in src


_MODULE_INTERNALS = frozenset(
    {
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
    }
)
_PLAIN = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for a configuration value; raises TypeError for tensors and
    other values a trace could capture (tensor constants)."""
    if isinstance(value, _PLAIN):
        return (type(value).__name__, value)
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((_freeze(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, Tensor):
        raise TypeError("tensor attribute")
    if callable(value) or isinstance(value, type):
        return ("id", id(value))
    raise TypeError(type(value).__name__)


def _config_key(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable | None:
    """What a trace of ``mod`` depends on: its class, plain attributes, children's classes,
    parameter and buffer names, and which recorded arguments are None or constants. None
    when the module holds something a trace could capture by value (a tensor attribute)."""
    try:
        attrs = tuple(
            (k, _freeze(v)) for k, v in mod.__dict__.items() if k not in _MODULE_INTERNALS
        )
        call = tuple(
            (k, _freeze(v) if not isinstance(v, Tensor) else "tensor")
            for k, v in zip(range(len(args)), args, strict=True)
        ) + tuple(
            (k, _freeze(v) if not isinstance(v, Tensor) else "tensor") for k, v in kwargs.items()
        )
    except TypeError:
        return None
    children = tuple((k, type(v)) for k, v in mod._modules.items())
    return (
        type(mod),
        attrs,
        children,
        tuple(mod._parameters),
        tuple(mod._buffers),
        call,
    )


def _referenced_none_slots(mod: nn.Module, memo: dict[type, str | None]) -> list[str]:
    """Slot attributes holding None that the module's forward source reads (timm ResNet)."""
    names = [a for a in SLOT_ATTRS if a in mod.__dict__ and mod.__dict__[a] is None]
    if not names:
        return []
    src = _forward_source(mod, memo)
    return [a for a in names if src is not None and f"self.{a}" in src]


def _owner_of(slot_path: str, blocks: Sequence[BlockSites], model: nn.Module) -> str:
    """The module a loose slot belongs to: its parent, unless it sits in an nn.Sequential."""
    parts = slot_path.split(".")
    parent = ".".join(parts[:-1])
    owner = parent
    while owner:
        mod = model.get_submodule(owner)
        if not isinstance(mod, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            break
        owner = ".".join(owner.split(".")[:-1])
    return owner


def _assign_slots(
    mod: nn.Module, adds: Sequence[ResidualAdd]
) -> tuple[list[str], list[str], list[str]]:
    """The slot attribute (existing or new), kind and origin of each residual add."""
    attrs: list[str] = []
    kinds: list[str] = []
    origins: list[str] = []
    taken: set[str] = set()
    none_slots = [a for a in SLOT_ATTRS if a in mod.__dict__ and mod.__dict__[a] is None]
    unslotted = [a for a in adds if a.slot_node is None]
    for add in adds:
        if add.slot_node is not None:
            base = str(add.slot_node.target)
            name = base
            k = 1
            while name in taken:  # one module shared by two branches (torchvision Swin)
                name = f"{base}_{k}"
                k += 1
            attrs.append(name)
            kinds.append("native")
            origins.append(base)
        elif len(none_slots) == 1 and len(unslotted) == 1:
            name = none_slots[0]  # timm ResNet keeps ``drop_path = None`` at rate 0
            attrs.append(name)
            kinds.append("native")
            origins.append(name)
        else:
            name = _free_name(mod, taken, len(unslotted))
            attrs.append(name)
            kinds.append("graph")
            origins.append("")
        taken.add(name)
    return attrs, kinds, origins


def _free_name(mod: nn.Module, taken: set[str], count: int) -> str:
    """``drop_path`` for a lone graph site, else ``drop_path1``, ``drop_path2``, ..."""
    names = ["drop_path"] if count == 1 else []
    names += [f"drop_path{i}" for i in range(1, 1000)]
    for name in names:
        if name not in taken and not hasattr(mod, name):
            return name
    raise RuntimeError("no free attribute name for a DropPath slot")  # pragma: no cover


def _patched_block(path: str, mod: nn.Module, order: int, meta: Any) -> BlockSites:
    return BlockSites(
        path=path,
        module=mod,
        order=order,
        graph=None,
        env={},
        adds=[],
        slot_attrs=list(meta.slot_attrs),
        kinds=list(meta.kinds),
        origins=list(meta.origins),
        patched=True,
    )


def _build_sites(an: Analysis) -> list[Site]:
    """Public sites, numbered by block in forward order."""
    # (path, branch, slot, kind, first-call order, fused, origin)
    entries: list[tuple[str, str, str, str, int, bool, str]] = []
    for b in an.blocks:
        for attr, kind, origin in zip(b.slot_attrs, b.kinds, b.origins, strict=True):
            entries.append(
                (
                    b.path,
                    attr,
                    qualify(b.path, attr),
                    kind,
                    b.order,
                    True,
                    qualify(b.path, origin) if origin else "",
                )
            )
    for s in an.loose:
        rel = _child_name(s.owner_path, s.slot_path)
        entries.append((s.owner_path, rel, s.slot_path, "native", s.order, False, s.slot_path))
    owners = sorted({(e[4], e[0]) for e in entries})
    owner_paths = [p for _, p in owners]
    group: dict[str, str] = {}
    for p in owner_paths:
        outer = [q for q in owner_paths if q and p.startswith(q + ".")]
        group[p] = min(outer, key=len) if outer else p
    order_of = {p: o for o, p in owners}
    heads = sorted({group[p] for p in owner_paths}, key=lambda p: order_of[p])
    block_index = {h: i for i, h in enumerate(heads)}

    model = an.model
    sites: list[Site] = []
    for path, branch, slot, kind, _order, fused, origin in entries:
        module = _get_or_none(model, slot)
        if module is None and origin and not _is_rewritten(model, path):
            # A shared slot in a block that could not be rewritten: both branches use
            # the model's one module.
            slot, module = origin, _get_or_none(model, origin)
        rate, mode, scaling = slot_settings(module)
        skip = isinstance(module, DropPath) and module.skip and fused
        is_fused = fused and _is_rewritten(model, path)
        sites.append(
            Site(
                path=path,
                branch=branch,
                block=block_index[group[path]],
                kind=kind,
                rate=rate,
                mode=mode,
                scaling=scaling,
                slot=slot,
                fused=is_fused,
                skip=skip,
                origin=origin,
            )
        )
    # Stable: by block, then by the order the entries were found (graph order in a block).
    return sorted(sites, key=lambda s: s.block)


def qualify(path: str, name: str) -> str:
    """``path.name``, or ``name`` for the root module (path "")."""
    return f"{path}.{name}" if path else name


def _get_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _is_rewritten(model: nn.Module, path: str) -> bool:
    mod = _get_or_none(model, path)
    return mod is not None and "_dpatch_meta" in mod.__dict__


def find_sites(model: nn.Module, example_inputs: Sequence[Any] | None = None) -> list[Site]:
    """Every residual site of ``model`` with its current rate, in forward order. Read-only.

    Args:
        model: any ``nn.Module``.
        example_inputs: positional inputs for one forward pass (shapes only matter: they
            run on the meta device). Default: one image batch of the model's input size.
    """
    return analyze(model, example_inputs).sites()
