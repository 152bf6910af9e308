"""Running modules on the ``meta`` device: free forward passes that only compute shapes.

Every parameter and buffer is swapped for an empty meta tensor for the duration of a call
(:func:`swapped_state`), so nothing is computed, allocated or changed; slow meta kernels of
common layers are answered from shapes alone (:class:`MetaMode`). :func:`meta_execution` is
the one context manager every meta run goes through.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MetaMode", "materialise", "meta_execution", "swapped_state", "to_meta"]


def to_meta(value: Any) -> Any:
    """``value`` with every tensor replaced by an empty meta tensor of its shape and dtype;
    containers keep their type (named tuples, transformers' ``ModelOutput``)."""
    if isinstance(value, Tensor):
        return value if value.is_meta else torch.empty_like(value, device="meta")
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(to_meta(v) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        out = copy.copy(value)
        for k, v in value.items():
            out[k] = to_meta(v)
        return out
    return value


def materialise(value: Any, device: torch.device) -> Any:
    """A random real tensor shaped like a meta one (integers: zeros), recursively."""
    if isinstance(value, Tensor):
        if value.is_floating_point():
            return torch.randn(value.shape, dtype=value.dtype, device=device)
        return torch.zeros(value.shape, dtype=value.dtype, device=device)
    if isinstance(value, list | tuple):
        return type(value)(materialise(v, device) for v in value)
    if isinstance(value, dict):
        return {k: materialise(v, device) for k, v in value.items()}
    return value


# Meta kernels of common layers are slow Python decompositions (batch norm ~4 ms, linear
# ~1 ms, attention ~2.5 ms per call); on meta inputs they are answered from shapes.
_F = torch.nn.functional
# Answered from shapes, after the shape checks the real kernel would make: a probe on a
# wrong input must fail here as it would for real, or dpatch would infer a wrong input.
_ELEMENTWISE: frozenset[Any] = frozenset(
    {
        _F.gelu, _F.relu, _F.relu6, _F.silu, _F.mish, _F.hardswish, _F.hardsigmoid,
        _F.leaky_relu, _F.elu, _F.selu, _F.celu, _F.softplus, _F.dropout, _F.dropout1d,
        _F.dropout2d, _F.softmax, _F.log_softmax, torch.sigmoid, torch.tanh, torch.relu,
        torch.softmax, torch.dropout,
    }
)  # fmt: skip


def _same(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return torch.empty_like(x)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(what)


def _fast_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    _check(
        x.dim() >= 1 and x.shape[-1] == weight.shape[-1],
        f"mat1 and mat2 shapes cannot be multiplied ({tuple(x.shape)} and "
        f"{tuple(weight.shape[::-1])})",
    )
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _fast_layer_norm(x: Tensor, normalized_shape: Any, *args: Any, **kwargs: Any) -> Tensor:
    shape = tuple(normalized_shape)
    _check(
        tuple(x.shape[len(x.shape) - len(shape) :]) == shape,
        f"layer norm over {list(shape)} got an input of shape {list(x.shape)}",
    )
    return torch.empty_like(x)


def _channels(x: Tensor, n: int, what: str) -> None:
    _check(x.dim() >= 2 and x.shape[1] == n, f"{what} of {n} channels got input {list(x.shape)}")


def _fast_batch_norm(x: Tensor, running_mean: Tensor | None, *args: Any, **kwargs: Any) -> Tensor:
    weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
    ref = running_mean if running_mean is not None else weight
    if ref is not None:
        _channels(x, ref.shape[0], "batch norm")
    return torch.empty_like(x)


def _fast_group_norm(x: Tensor, num_groups: int, *args: Any, **kwargs: Any) -> Tensor:
    _check(x.dim() >= 2 and x.shape[1] % num_groups == 0, "group norm: channels % groups != 0")
    weight = kwargs.get("weight", args[0] if args else None)
    if weight is not None:
        _channels(x, weight.shape[0], "group norm")
    return torch.empty_like(x)


def _fast_sdpa(q: Tensor, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    _check(q.shape[-1] == k.shape[-1], "attention: query and key sizes differ")
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_SHAPE_RULES: dict[Any, Callable[..., Tensor]] = {
    **dict.fromkeys(_ELEMENTWISE, _same),
    _F.linear: _fast_linear,
    _F.layer_norm: _fast_layer_norm,
    torch.layer_norm: _fast_layer_norm,
    _F.batch_norm: _fast_batch_norm,
    torch.batch_norm: _fast_batch_norm,
    _F.group_norm: _fast_group_norm,
    torch.group_norm: _fast_group_norm,
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


def _meta_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, device="meta")


def _clone_buffer(t: Tensor) -> Tensor:
    return t if isinstance(t, nn.Parameter) else t.clone()


@contextmanager
def meta_execution(module: nn.Module) -> Iterator[None]:
    """Run ``module`` (or code that calls it) for shapes only: no gradients, its state on
    the meta device, new tensors created on meta, slow layers answered from shapes."""
    with torch.no_grad(), swapped_state(module, _meta_like), torch.device("meta"), MetaMode():
        yield


@contextmanager
def real_execution(module: nn.Module) -> Iterator[None]:
    """Run ``module`` for real without changing it: no gradients, copies of its buffers."""
    with torch.no_grad(), swapped_state(module, _clone_buffer):
        yield
