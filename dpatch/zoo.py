"""Model specs: ``timm:NAME``, ``tv:NAME`` / ``torchvision:NAME``, ``hf-hub:ORG/NAME``,
``package.module:factory`` and bare ``NAME`` (timm first, then torchvision).

Also: listing names, and the native drop-path rates of a library's own recipe, read off the
same architecture built cheaply (large tensors on the meta device). timm and torchvision are
imported only when a spec needs them.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dpatch._marks import block_meta, model_spec, set_model_spec
from dpatch.errors import DownloadError, InvalidValueError, ModelNotFoundError

__all__ = [
    "SOURCES",
    "ModelEntry",
    "ModelSpec",
    "create_model",
    "list_models",
    "native_rates",
    "parse_spec",
    "spec_of",
]

#: Libraries ``list_models`` can list (``tv`` is short for torchvision).
SOURCES: tuple[str, ...] = ("timm", "tv", "torchvision")
_SCHEMES = {"timm": "timm", "tv": "torchvision", "torchvision": "torchvision", "hf-hub": "hf-hub"}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from.

    Attributes:
        source: ``timm``, ``torchvision``, ``hf-hub`` or ``python``.
        name: the model name (``ORG/NAME`` for hf-hub, ``module:factory`` for python).
        kwargs: constructor keyword arguments (JSON-serialisable values).
    """

    source: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def text(self) -> str:
        """Canonical spec string, e.g. ``timm:resnet50``."""
        prefix = {"timm": "timm", "torchvision": "tv", "hf-hub": "hf-hub"}.get(self.source)
        return f"{prefix}:{self.name}" if prefix else self.name


# --------------------------------------------------------------------------- names
def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def _tv_names(classification_only: bool = False) -> list[str]:
    import torchvision

    if classification_only:
        return list(torchvision.models.list_models(module=torchvision.models))
    return list(torchvision.models.list_models())


def _is_timm(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else "; run `dpatch list` to see names"


def parse_spec(text: str, **kwargs: Any) -> tuple[ModelSpec, str | None]:
    """Resolve a spec string. Returns the spec and a note when a bare name was resolved.

    Raises:
        ModelNotFoundError: no library has that name (the message suggests close ones).
    """
    if not isinstance(text, str) or not text.strip():
        raise ModelNotFoundError(f"model spec must be a non-empty name, but got {text!r}")
    text = text.strip()
    scheme, sep, rest = text.partition(":")
    if sep and scheme in _SCHEMES:
        source = _SCHEMES[scheme]
        if not rest:
            raise ModelNotFoundError(f"model spec {text!r} names no model after '{scheme}:'")
        if source == "timm" and not _is_timm(rest):
            raise ModelNotFoundError(f"timm has no model {rest!r}{_suggest(rest, _timm_names())}")
        if source == "torchvision" and rest not in _tv_names():
            raise ModelNotFoundError(
                f"torchvision has no model {rest!r}{_suggest(rest, _tv_names())}"
            )
        if source == "hf-hub" and "/" not in rest:
            raise ModelNotFoundError(f"hf-hub spec needs ORG/NAME, but got {rest!r}")
        return ModelSpec(source, rest, dict(kwargs)), None
    if sep:
        module, _, factory = text.partition(":")
        if not module or not factory.isidentifier():
            raise ModelNotFoundError(
                f"model spec {text!r} is neither timm:/tv:/hf-hub: nor package.module:factory"
            )
        return ModelSpec("python", text, dict(kwargs)), None
    if _is_timm(text):
        return ModelSpec("timm", text, dict(kwargs)), f"resolved {text!r} to timm:{text}"
    if text in _tv_names():
        return ModelSpec("torchvision", text, dict(kwargs)), f"resolved {text!r} to tv:{text}"
    names = _timm_names() + [f"tv:{n}" for n in _tv_names(classification_only=True)]
    raise ModelNotFoundError(f"unknown model {text!r}{_suggest(text, names)}")


# --------------------------------------------------------------------------- building
def create_model(spec: str | ModelSpec, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build the model a spec names (random init unless ``pretrained``).

    Raises:
        ModelNotFoundError: unknown name or unimportable factory.
        DownloadError: ``pretrained`` (or ``hf-hub:``) needs a download that failed.
    """
    if isinstance(spec, str):
        spec, _ = parse_spec(spec, **kwargs)
    elif kwargs:
        spec = ModelSpec(spec.source, spec.name, {**spec.kwargs, **kwargs})
    model = _build(spec, pretrained)
    if not isinstance(model, nn.Module):
        raise ModelNotFoundError(
            f"{spec.text} returned {type(model).__name__}, not a torch.nn.Module"
        )
    set_model_spec(model, spec)  # so save and schedule="native" know where it came from
    return model


def _build(spec: ModelSpec, pretrained: bool) -> Any:
    kw = dict(spec.kwargs)
    if spec.source in ("timm", "hf-hub"):
        import timm

        name = spec.name if spec.source == "timm" else f"hf-hub:{spec.name}"
        try:
            return timm.create_model(name, pretrained=pretrained, **kw)
        except OSError as exc:  # huggingface_hub and urllib errors are OSErrors
            raise DownloadError(_download_message(spec, exc)) from exc
    if spec.source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(
                spec.name, weights="DEFAULT" if pretrained else None, **kw
            )
        except OSError as exc:
            raise DownloadError(_download_message(spec, exc)) from exc
    factory = _import_factory(spec.name)
    if pretrained:
        kw.setdefault("pretrained", True)
    return factory(**kw)


def _download_message(spec: ModelSpec, exc: BaseException) -> str:
    reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return (
        f"could not download {spec.text} ({reason}); check the network, "
        "or build it without --pretrained and pass --weights FILE"
    )


def _import_factory(text: str) -> Callable[..., Any]:
    module_name, _, attr = text.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelNotFoundError(
            f"cannot import {module_name!r} for model spec {text!r} ({exc}); run from the "
            "folder that holds it or install it"
        ) from exc
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelNotFoundError(f"{module_name!r} has no callable {attr!r} (model spec {text!r})")
    return factory


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The spec a model was built from: recorded by :func:`create_model`, or timm's
    ``pretrained_cfg['architecture']`` (without constructor kwargs)."""
    spec = model_spec(model)
    if spec is not None:
        return spec
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return ModelSpec("timm", str(cfg["architecture"]))
    return None


# --------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class ModelEntry:
    """A name ``dpatch list`` shows, and whether its library gives it native slots."""

    spec: str
    native: bool


def _module_mentions(module_name: str, word: str, memo: dict[str, bool]) -> bool:
    if module_name not in memo:
        try:
            mod = importlib.import_module(module_name)
            memo[module_name] = word in inspect.getsource(mod)
        except (ImportError, OSError, TypeError):
            memo[module_name] = False
    return memo[module_name]


def list_models(pattern: str | None = None, source: str | None = None) -> list[ModelEntry]:
    """timm and torchvision classification models matching ``pattern``: an fnmatch glob
    (``vit_small*``), or a bare word (no ``*?[``), which matches anywhere in the name.

    ``native`` is true when the model's library module takes a drop-path argument
    (timm ``drop_path_rate``, torchvision ``stochastic_depth_prob``).
    """
    pat = pattern or "*"
    if not any(c in pat for c in "*?["):
        pat = f"*{pat}*"  # a search word, as people expect from a search
    out: list[ModelEntry] = []
    memo: dict[str, bool] = {}
    if source in (None, "timm"):
        from timm.models import model_entrypoint

        for name in _timm_names():
            if fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(f"timm:{name}", pat):
                module = model_entrypoint(name).__module__
                native = _module_mentions(module, "drop_path_rate", memo)
                out.append(ModelEntry(f"timm:{name}", native))
    if source in (None, "torchvision", "tv"):
        import torchvision

        for name in _tv_names(classification_only=True):
            if fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(f"tv:{name}", pat):
                builder = torchvision.models.get_model_builder(name)
                native = _module_mentions(builder.__module__, "stochastic_depth_prob", memo)
                out.append(ModelEntry(f"tv:{name}", native))
    return out


# --------------------------------------------------------------------------- native rates
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


def _library(model: nn.Module) -> str:
    meta = block_meta(model)
    mod = (meta.orig_cls if meta is not None else type(model)).__module__
    if mod.startswith("timm."):
        return "timm"
    if mod.startswith("torchvision."):
        return "torchvision"
    return "other"


def _tv_identify(model: nn.Module) -> str:
    """The torchvision builder name whose architecture matches ``model``'s parameters."""
    import torchvision

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cls_module = type(model).__module__
    for name in _tv_names():
        builder = torchvision.models.get_model_builder(name)
        if builder.__module__ != cls_module:
            continue
        ref = build_light(functools.partial(builder, weights=None))
        if {k: tuple(v.shape) for k, v in ref.state_dict().items()} == shapes:
            return name
    raise InvalidValueError(
        f"cannot tell which torchvision builder made this {type(model).__name__}; build it "
        "with dpatch (tv:NAME) to use schedule 'native'"
    )


def _slot_rates(ref: nn.Module) -> dict[str, float]:
    from dpatch.sites import is_slot_module, slot_settings

    return {
        name: slot_settings(mod).rate
        for name, mod in ref.named_modules()
        if name and is_slot_module(mod, name.rsplit(".", 1)[-1])
    }


def native_rates(model: nn.Module, max_rate: float) -> dict[str, float]:
    """Per-slot rates (qualified slot name -> rate) the model's own library would give it
    for ``max_rate``: timm ``create_model(..., drop_path_rate=)``, torchvision
    ``stochastic_depth_prob=``.

    Raises:
        InvalidValueError: the model's library has no such argument for this model, or the
            model's origin is unknown.
    """
    spec = spec_of(model)
    lib = spec.source if spec is not None else _library(model)
    if lib == "timm" and spec is not None:
        import timm

        kw = dict(spec.kwargs)
        kw.pop("drop_path_rate", None)
        try:
            ref = build_light(
                functools.partial(timm.create_model, spec.name, drop_path_rate=max_rate, **kw)
            )
        except TypeError as exc:
            raise InvalidValueError(
                f"timm model {spec.name!r} takes no drop_path_rate, so it has no native "
                "schedule; use --schedule linear (timm's usual rule)"
            ) from exc
        rates = _slot_rates(ref)
        if max_rate > 0 and not any(r > 0 for r in rates.values()):
            raise InvalidValueError(
                f"timm model {spec.name!r} ignores drop_path_rate; use --schedule linear"
            )
        return rates
    if lib == "torchvision":
        name = spec.name if spec is not None else _tv_identify(model)
        kw = dict(spec.kwargs) if spec is not None else {}
        kw.pop("stochastic_depth_prob", None)
        return _tv_native_rates(name, max_rate, kw)
    raise InvalidValueError(
        "schedule 'native' needs a timm or torchvision model whose library sets drop-path "
        "rates; use linear, uniform, huang, efficientnet, cosine or custom"
    )


def _tv_native_rates(name: str, max_rate: float, kw: dict[str, Any]) -> dict[str, float]:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    if "stochastic_depth_prob" not in inspect.getsource(sys.modules[builder.__module__]):
        raise InvalidValueError(
            f"torchvision model {name!r} takes no stochastic_depth_prob, so it has no native "
            "schedule; use --schedule linear"
        )
    try:
        ref = build_light(lambda: builder(weights=None, stochastic_depth_prob=max_rate, **kw))
        return _slot_rates(ref)
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
    ref = build_light(lambda: builder(weights=None, **kw))
    return {k: v * max_rate / default for k, v in _slot_rates(ref).items()}
