"""Native drop-path rates: the per-slot rates a model's own library would give it for a
``drop_path_rate`` (timm), ``stochastic_depth_prob`` (torchvision) or ``config.drop_path_rate``
(transformers), read off the same architecture built cheaply (large tensors on the meta
device): the timm and torchvision readers, and the light build every zoo uses.
:func:`dpatch.models.native_rates` picks the reader for a model (``schedule="native"``).
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dpatch.analysis import is_slot_module, slot_settings
from dpatch.errors import InvalidValueError
from dpatch.marks import block_meta

__all__ = [
    "build_light",
    "library_of",
    "slot_rates",
    "timm_native_rates",
    "tv_build_kwargs",
    "tv_identify",
    "tv_native_rates",
]


class _LightBuild(torch.overrides.TorchFunctionMode):
    """Build big tensors on the meta device and small ones on the CPU.

    Parameters (large) cost nothing and their random init is skipped; small tensors such
    as ``torch.linspace(0, rate, depth)`` stay real, so ``.item()``/``.tolist()`` during
    construction (timm, torchvision RegNet) still work.
    """

    _FACTORIES = frozenset(
        {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn}
    )

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in self._FACTORIES and kwargs.get("device") is None:
            shape = args[0] if len(args) == 1 and isinstance(args[0], list | tuple) else args
            numel = 1
            for d in shape:
                numel *= int(d) if isinstance(d, int) else 1
            if numel > 4096:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_light(fn: Callable[[], nn.Module]) -> nn.Module:
    """Call a model constructor cheaply (see ``_LightBuild``), falling back to a full build
    when the constructor needs the values of a tensor that went to the meta device (timm's
    Swin-V2 copies into a buffer: ``NotImplementedError``; ``.item()``: ``RuntimeError``).
    Anything else (a bad argument, a failed download) is the caller's to report."""
    try:
        with _LightBuild():
            return fn()
    except (NotImplementedError, RuntimeError):
        return fn()


def library_of(model: nn.Module) -> str:
    """``timm``, ``torchvision``, ``transformers`` or ``other``: whose class ``model`` is
    (the class before dpatch rewrote it)."""
    meta = block_meta(model)
    mod = (meta.orig_cls if meta is not None else type(model)).__module__
    for lib in ("timm", "torchvision", "transformers"):
        if mod.startswith(f"{lib}."):
            return lib
    return "other"


def slot_rates(ref: nn.Module) -> dict[str, float]:
    """Qualified name -> rate of every stochastic-depth slot of ``ref``."""
    return {
        name: slot_settings(mod).rate
        for name, mod in ref.named_modules()
        if name and is_slot_module(mod, name.rsplit(".", 1)[-1])
    }


def tv_build_kwargs(name: str, pretrained: bool) -> dict[str, Any]:
    """Keyword arguments that build torchvision model ``name`` with no download unless
    ``pretrained``: ``weights`` and, for detection and segmentation builders, a
    ``weights_backbone`` of None (their default is ImageNet weights)."""
    import torchvision

    kw: dict[str, Any] = {"weights": "DEFAULT" if pretrained else None}
    params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    if not pretrained and "weights_backbone" in params:
        kw["weights_backbone"] = None
    return kw


def timm_native_rates(name: str, max_rate: float, kw: dict[str, Any]) -> dict[str, float]:
    import timm

    kw.pop("drop_path_rate", None)
    try:
        ref = build_light(functools.partial(timm.create_model, name, drop_path_rate=max_rate, **kw))
    except TypeError as exc:
        raise InvalidValueError(
            f"timm model {name!r} takes no drop_path_rate, so it has no native "
            "schedule; use --schedule linear (timm's usual rule)"
        ) from exc
    rates = slot_rates(ref)
    if max_rate > 0 and not any(r > 0 for r in rates.values()):
        raise InvalidValueError(
            f"timm model {name!r} ignores drop_path_rate; use --schedule linear"
        )
    return rates


def tv_identify(model: nn.Module) -> str:
    """The torchvision builder name whose architecture matches ``model``'s parameters."""
    import torchvision

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cls_module = type(model).__module__
    for name in torchvision.models.list_models():
        builder = torchvision.models.get_model_builder(name)
        if builder.__module__ != cls_module:
            continue
        ref = build_light(functools.partial(builder, **tv_build_kwargs(name, False)))
        if {k: tuple(v.shape) for k, v in ref.state_dict().items()} == shapes:
            return name
    raise InvalidValueError(
        f"cannot tell which torchvision builder made this {type(model).__name__}; build it "
        "with dpatch (tv:NAME) to use schedule 'native'"
    )


def tv_native_rates(name: str, max_rate: float, kw: dict[str, Any]) -> dict[str, float]:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    if "stochastic_depth_prob" not in inspect.getsource(sys.modules[builder.__module__]):
        raise InvalidValueError(
            f"torchvision model {name!r} takes no stochastic_depth_prob, so it has no native "
            "schedule; use --schedule linear"
        )
    kw = {**tv_build_kwargs(name, False), **kw}
    try:
        ref = build_light(lambda: builder(stochastic_depth_prob=max_rate, **kw))
        return slot_rates(ref)
    except TypeError as exc:
        if "multiple values" not in str(exc):
            raise
    # Swin and MaxViT builders fix the rate themselves. Every torchvision rule is linear in
    # it (r*i/(N-1), r*i/N), so the builder's rates are scaled from its own default.
    match = re.search(r"stochastic_depth_prob=([0-9.]+)", inspect.getsource(builder))
    if match is None or float(match.group(1)) <= 0:
        raise InvalidValueError(
            f"cannot read the default stochastic_depth_prob of torchvision {name!r}; "
            "use --schedule linear"
        )
    default = float(match.group(1))
    ref = build_light(lambda: builder(**kw))
    return {k: v * max_rate / default for k, v in slot_rates(ref).items()}
