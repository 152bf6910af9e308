"""Model specs: ``timm:NAME``, ``tv:NAME`` / ``torchvision:NAME`` (every torchvision builder:
classification, detection, segmentation, video, optical flow, quantization), ``hf:ORG/NAME`` /
``hf:PATH`` / ``hf:ClassName`` (Hugging Face transformers, :mod:`dpatch.models._hf`),
``hf-hub:ORG/NAME`` (timm weights on the hub), ``package.module:factory`` and bare ``NAME``
(timm first, then torchvision).

Also: listing names, and what a saved file needs to rebuild its model. timm, torchvision and
transformers are imported only when a spec needs them; ``native_rates`` picks the model's
library here and reads its rates with :mod:`dpatch.models._native` or :mod:`dpatch.models._hf`.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from dpatch.errors import DownloadError, InvalidValueError, ModelNotFoundError, first_line
from dpatch.models._native import (
    library_of,
    timm_native_rates,
    tv_build_kwargs,
    tv_identify,
    tv_native_rates,
)
from dpatch.models._spec import ModelEntry, ModelSpec, model_spec, set_model_spec

__all__ = [
    "create_model",
    "list_models",
    "native_rates",
    "parse_spec",
    "rebuild",
    "rebuild_info",
    "spec_of",
    "transformers_quiet",
]

_SCHEMES = {
    "timm": "timm",
    "tv": "torchvision",
    "torchvision": "torchvision",
    "hf-hub": "hf-hub",
    "hf": "transformers",
    "transformers": "transformers",
}


# --------------------------------------------------------------------------- names
def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def _tv_names() -> list[str]:
    """Every torchvision builder (classification, detection, segmentation, video, optical
    flow, quantization)."""
    import torchvision

    return list(torchvision.models.list_models())


def _tv_task(name: str) -> str:
    import torchvision

    parts = torchvision.models.get_model_builder(name).__module__.split(".")
    return parts[2] if len(parts) > 3 else "classification"


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
        if source == "transformers":
            from dpatch.models._hf import parse_hf

            return parse_hf(rest, dict(kwargs)), None
        return ModelSpec(source, rest, dict(kwargs)), None
    if sep:
        module, _, factory = text.partition(":")
        if not module or not factory.isidentifier():
            raise ModelNotFoundError(
                f"model spec {text!r} is neither timm:/tv:/hf:/hf-hub: nor package.module:factory"
            )
        return ModelSpec("python", text, dict(kwargs)), None
    if _is_timm(text):
        return ModelSpec("timm", text, dict(kwargs)), f"resolved {text!r} to timm:{text}"
    if text in _tv_names():
        return ModelSpec("torchvision", text, dict(kwargs)), f"resolved {text!r} to tv:{text}"
    names = _timm_names() + [f"tv:{n}" for n in _tv_names()]
    raise ModelNotFoundError(f"unknown model {text!r}{_suggest(text, names)}")


# --------------------------------------------------------------------------- building
def create_model(spec: str | ModelSpec, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build the model a spec names (random init unless ``pretrained``).

    Raises:
        ModelNotFoundError: unknown name or unimportable factory.
        DownloadError: ``pretrained`` (or ``hf-hub:``, or an ``hf:`` hub name) needs a
            download that failed.
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
                spec.name, **{**tv_build_kwargs(spec.name, pretrained), **kw}
            )
        except OSError as exc:
            raise DownloadError(_download_message(spec, exc)) from exc
    if spec.source == "transformers":
        from dpatch.models._hf import build_hf

        return build_hf(spec, pretrained)
    factory = _import_factory(spec.name)
    if pretrained:
        kw.setdefault("pretrained", True)
    return factory(**kw)


def _download_message(spec: ModelSpec, exc: BaseException) -> str:
    reason = first_line(exc, 160)
    return (
        f"could not download {spec.text} ({reason}); check the network, "
        "or build it without --pretrained and pass --weights FILE"
    )


def _import_factory(text: str) -> Callable[..., Any]:
    """The callable a ``package.module:factory`` or ``path/file.py:factory`` spec names."""
    module_name, _, attr = text.partition(":")
    if module_name.endswith(".py"):
        module = _load_file(module_name, text)
    else:
        module = _import(module_name, text)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelNotFoundError(f"{module_name!r} has no callable {attr!r} (model spec {text!r})")
    return factory


def _import(module_name: str, text: str) -> ModuleType:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelNotFoundError(
            f"cannot import {module_name!r} for model spec {text!r} ({exc}); run from the "
            "folder that holds it, install it, or name its file (path/to/file.py:factory)"
        ) from exc
    finally:
        if added:
            sys.path.remove(cwd)


def _load_file(file_name: str, text: str) -> ModuleType:
    """A Python file as a module, registered under its stem (so its classes pickle) unless
    another module holds that name."""
    path = Path(file_name).expanduser().resolve()
    if not path.is_file():
        raise ModelNotFoundError(f"model file {file_name!r} does not exist (model spec {text!r})")
    name = path.stem if path.stem.isidentifier() else "dpatch_model_file"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    if loaded is not None:
        name = f"dpatch_model_file_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelNotFoundError(f"cannot load {file_name!r} as Python (model spec {text!r})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ModelNotFoundError(
            f"{file_name!r} fails to run (model spec {text!r}): {first_line(exc, typed=True)}"
        ) from exc
    return module


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The spec a model was built from: recorded by :func:`create_model`, timm's
    ``pretrained_cfg['architecture']`` (without constructor kwargs), or the class of a
    transformers model (``hf:ViTForImageClassification``; its config goes in a saved file's
    manifest, see :func:`rebuild_info`)."""
    spec = model_spec(model)
    if spec is not None:
        return spec
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return ModelSpec("timm", str(cfg["architecture"]))
    if library_of(model) == "transformers":
        from dpatch.models._hf import hf_class_spec

        return hf_class_spec(model)
    return None


def native_rates(model: nn.Module, max_rate: float) -> dict[str, float]:
    """Per-slot rates (qualified slot name -> rate) the model's own library would give it
    for ``max_rate``: timm ``create_model(..., drop_path_rate=)``, torchvision
    ``stochastic_depth_prob=``, transformers ``from_config(config with drop_path_rate=)``.

    Raises:
        InvalidValueError: the model's library has no such argument for this model, or the
            model's origin is unknown.
    """
    spec = spec_of(model)
    lib = spec.source if spec is not None else library_of(model)
    if lib == "timm" and spec is not None:
        return timm_native_rates(spec.name, max_rate, dict(spec.kwargs))
    if lib == "torchvision":
        name = spec.name if spec is not None else tv_identify(model)
        kw = dict(spec.kwargs) if spec is not None else {}
        kw.pop("stochastic_depth_prob", None)
        return tv_native_rates(name, max_rate, kw)
    if lib == "transformers" or library_of(model) == "transformers":
        from dpatch.models._hf import hf_native_rates

        return hf_native_rates(model, max_rate)
    raise InvalidValueError(
        "schedule 'native' needs a timm, torchvision or transformers model whose library sets "
        "drop-path rates; use linear, uniform, huang, efficientnet, cosine, exponential or custom"
    )


def rebuild_info(model: nn.Module) -> dict[str, Any]:
    """What a saved file needs besides its spec to rebuild ``model`` offline and exactly:
    for a transformers model its class and full config (``{"class", "config"}``); else
    nothing."""
    if library_of(model) != "transformers" or "transformers" not in sys.modules:
        return {}
    from dpatch.models._hf import hf_rebuild_info

    return hf_rebuild_info(model)


def rebuild(entry: Mapping[str, Any]) -> nn.Module:
    """The model a manifest's ``model`` entry describes (spec, kwargs, and for transformers
    models their class and config: no download needed).

    Raises:
        ModelNotFoundError, DownloadError: see :func:`create_model`.
        ManifestError: a transformers class or config this transformers cannot rebuild.
    """
    if entry.get("config") is not None:
        from dpatch.models._hf import hf_rebuild

        model = hf_rebuild(entry)
        # Recorded as it was, without checking it: a directory may be gone, a hub name
        # offline; the config made both unnecessary.
        name = str(entry["spec"]).partition(":")[2]
        set_model_spec(model, ModelSpec("transformers", name, dict(entry.get("kwargs") or {})))
        return model
    return create_model(str(entry["spec"]), **dict(entry.get("kwargs") or {}))


# --------------------------------------------------------------------------- listing
def _module_mentions(module_name: str, word: str, memo: dict[str, bool]) -> bool:
    if module_name not in memo:
        try:
            mod = importlib.import_module(module_name)
            memo[module_name] = word in inspect.getsource(mod)
        except (ImportError, OSError, TypeError):
            memo[module_name] = False
    return memo[module_name]


def _hf_installed() -> bool:
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["transformers"] is None
        return False


def list_models(pattern: str | None = None, source: str | None = None) -> list[ModelEntry]:
    """timm models, every torchvision builder and the transformers vision model classes
    (when transformers is installed) matching ``pattern``: an fnmatch glob (``vit_small*``),
    or a bare word (no ``*?[``), which matches anywhere in the name.

    ``native`` is true when the model's library takes a drop-path argument (timm
    ``drop_path_rate``, torchvision ``stochastic_depth_prob``, transformers
    ``config.drop_path_rate``).
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

        for name in _tv_names():
            if fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(f"tv:{name}", pat):
                builder = torchvision.models.get_model_builder(name)
                native = _module_mentions(builder.__module__, "stochastic_depth_prob", memo)
                out.append(ModelEntry(f"tv:{name}", native, _tv_task(name)))
    if source in ("hf", "transformers") or (source is None and _hf_installed()):
        from dpatch.models._hf import hf_entries

        # class names are CamelCase: 'convnext*' finds hf:ConvNextForImageClassification
        low = pat.lower()
        out += [
            e
            for e in hf_entries()
            if fnmatch.fnmatchcase(e.spec[3:].lower(), low)
            or fnmatch.fnmatchcase(e.spec.lower(), low)
        ]
    return out


def transformers_quiet() -> Any:
    """A context in which transformers shows no progress bars (imports transformers)."""
    from dpatch.models._hf import quiet

    return quiet()
