"""Hugging Face transformers as a zoo: ``hf:ORG/NAME`` (a hub model), ``hf:PATH`` (a
``save_pretrained`` directory) and ``hf:ClassName`` (a transformers model class with its
default config); rebuilding a saved model from the class and config in its manifest; the
native rates of ``config.drop_path_rate``.

transformers is an optional dependency (``pip install 'dpatch[hf]'``): it is imported here
only, and only when an ``hf:`` spec or a transformers model needs it.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from dpatch.errors import (
    DownloadError,
    InvalidValueError,
    ManifestError,
    ModelNotFoundError,
    WeightsError,
    first_line,
)
from dpatch.marks import block_meta
from dpatch.models._native import build_light, slot_rates
from dpatch.models._spec import ModelEntry, ModelSpec

__all__ = [
    "TASKS",
    "build_hf",
    "hf_class_spec",
    "hf_entries",
    "hf_native_rates",
    "hf_rebuild",
    "hf_rebuild_info",
    "hf_slot_rates",
    "parse_hf",
    "quiet",
]

#: ``task=`` values and the Auto class each builds; ``auto`` builds the class the config's
#: ``architectures`` names (what the checkpoint was saved as), else ``AutoModel``.
TASKS: dict[str, str] = {
    "auto": "",
    "base": "AutoModel",
    "image-classification": "AutoModelForImageClassification",
    "video-classification": "AutoModelForVideoClassification",
    "semantic-segmentation": "AutoModelForSemanticSegmentation",
    "depth-estimation": "AutoModelForDepthEstimation",
    "object-detection": "AutoModelForObjectDetection",
    "backbone": "AutoBackbone",
}
#: The mappings ``dpatch list`` shows, by task.
_LISTED = {
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "video-classification": "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES",
    "semantic-segmentation": "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
    "depth-estimation": "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES",
}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def require() -> ModuleType:
    """The transformers module.

    Raises:
        ModelNotFoundError: transformers is not installed.
    """
    try:
        import transformers
    except ImportError as exc:
        raise ModelNotFoundError(
            "hf: specs need Hugging Face transformers, which is not installed; "
            "pip install 'dpatch[hf]'"
        ) from exc
    return transformers


def _model_class(tf: ModuleType, name: str) -> Any:
    cls = getattr(tf, name, None) if name.isidentifier() else None
    return cls if isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel) else None


# --------------------------------------------------------------------------- specs
def parse_hf(rest: str, kwargs: dict[str, Any]) -> ModelSpec:
    """The spec of ``hf:REST``: a directory, a hub name or a model class (in that order).

    Raises:
        ModelNotFoundError: transformers is missing, a directory without ``config.json``,
            or a name that is none of the three.
        InvalidValueError: an unknown ``task``.
    """
    tf = require()
    task = kwargs.get("task", "auto")
    if task not in TASKS:
        raise InvalidValueError(f"task {task!r} is unknown; choose one of: {', '.join(TASKS)}")
    path = Path(rest).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"directory {rest!r} holds no config.json; save a model there with "
                "model.save_pretrained(dir), or name a hub model (hf:ORG/NAME)"
            )
        return ModelSpec("transformers", rest, kwargs)
    if path.exists():
        raise ModelNotFoundError(
            f"hf:{rest} is a file; hf: takes a save_pretrained directory, a hub name "
            "ORG/NAME or a transformers model class"
        )
    if _HUB_NAME.match(rest):
        return ModelSpec("transformers", rest, kwargs)
    if rest.startswith(("/", ".", "~")) or os.sep in rest:
        raise ModelNotFoundError(f"directory {rest!r} does not exist (hf:{rest})")
    if _model_class(tf, rest) is not None:
        if task != "auto":
            raise InvalidValueError(
                f"task={task!r} applies to hub names and directories; hf:{rest} is a class"
            )
        return ModelSpec("transformers", rest, kwargs)
    classes = [n for n in dir(tf) if n.endswith(("Model", "ForImageClassification"))]
    close = difflib.get_close_matches(rest, classes, n=3, cutoff=0.7)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelNotFoundError(
        f"hf:{rest} is not a local directory, a hub name ORG/NAME or a transformers model "
        f"class{hint}"
    )


# --------------------------------------------------------------------------- building
def build_hf(spec: ModelSpec, pretrained: bool) -> nn.Module:
    """Build an ``hf:`` spec: random weights from the config, unless ``pretrained`` or a
    directory that holds weights.

    Raises:
        DownloadError: the config or weights of a hub name could not be fetched.
        ModelNotFoundError: no such hub model, or no model of ``task`` for its config.
        InvalidValueError: a config override the config does not have.
        WeightsError: ``pretrained`` for a directory without weights.
    """
    tf = require()
    overrides = dict(spec.kwargs)
    task = str(overrides.pop("task", "auto"))
    cls = _model_class(tf, spec.name)
    if cls is not None and not Path(spec.name).is_dir():
        if pretrained:
            raise InvalidValueError(
                f"hf:{spec.name} names a class, which has no pretrained weights; use a hub "
                "name (hf:ORG/NAME) or a save_pretrained directory"
            )
        _check_overrides(cls.config_class(), overrides, spec)
        try:
            config = cls.config_class(**overrides)
        except _config_errors() as exc:
            raise InvalidValueError(_rejected(spec, exc)) from exc
        return cls(config)
    path = Path(spec.name).expanduser()
    local = path.is_dir()
    source = str(path) if local else spec.name
    config = _load_config(tf, spec, source, overrides)
    auto = _task_class(tf, config, task, spec)
    has_weights = local and any((path / f).is_file() for f in _WEIGHT_FILES)
    if pretrained and local and not has_weights:
        raise WeightsError(
            f"directory {spec.name!r} holds no weights ({', '.join(_WEIGHT_FILES[::2])}); "
            "drop --pretrained to build it with random weights"
        )
    if pretrained or has_weights:
        try:
            with _quiet(tf):
                return auto.from_pretrained(source, config=config)
        except OSError as exc:
            raise DownloadError(_fetch_message(spec, exc, "weights")) from exc
        except (ValueError, RuntimeError) as exc:  # mismatched sizes, damaged files
            raise WeightsError(
                f"the weights of hf:{spec.name} do not load into {auto.__name__} "
                f"({first_line(exc, 160)}); check task= and the config overrides"
            ) from exc
    if auto.__name__.startswith("Auto"):
        return auto.from_config(config)
    return auto(config)


def quiet() -> Any:
    """A context in which transformers shows no progress bars (loading, writing shards)."""
    return _quiet(require())


@contextmanager
def _quiet(tf: ModuleType) -> Iterator[None]:
    """No progress bars from transformers (the library never prints); put back after."""
    logging = tf.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _check_overrides(config: Any, overrides: Mapping[str, Any], spec: ModelSpec) -> None:
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise InvalidValueError(
            f"{type(config).__name__} (hf:{spec.name}) has no {', '.join(map(repr, unknown))}; "
            "config overrides must name attributes of the model's config"
        )


def _load_config(tf: ModuleType, spec: ModelSpec, source: str, overrides: dict[str, Any]) -> Any:
    try:
        config, unused = tf.AutoConfig.from_pretrained(
            source, return_unused_kwargs=True, **overrides
        )
    except OSError as exc:
        if "not a valid model identifier" in str(exc) or "does not appear" in str(exc):
            raise ModelNotFoundError(
                f"the Hugging Face hub has no model {spec.name!r} (or it is gated: log in "
                "with `hf auth login`); check the name"
            ) from exc
        raise DownloadError(_fetch_message(spec, exc, "config")) from exc
    except _config_errors() as exc:
        if not isinstance(exc, ValueError):  # a strict config's validation error
            raise InvalidValueError(_rejected(spec, exc)) from exc
        # unknown model_type, or code that must come from the hub
        raise ModelNotFoundError(
            f"transformers {tf.__version__} cannot build hf:{spec.name} ({first_line(exc, 160)}); "
            "dpatch does not run code from the hub"
        ) from exc
    if unused:
        _check_overrides(config, unused, spec)
    return config


def _config_errors() -> tuple[type[Exception], ...]:
    """What a config constructor raises for a bad value: transformers 5 configs are strict
    dataclasses (huggingface_hub's validation error is a plain Exception)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: configs do not validate
        return (TypeError, ValueError)
    return (TypeError, ValueError, StrictDataclassError)


def _rejected(spec: ModelSpec, exc: BaseException) -> str:
    return (
        f"transformers rejects the config overrides of hf:{spec.name} ({first_line(exc, 160)}); "
        "pass values of the config's types (rates can be set with dpatch inject/retune)"
    )


def _task_class(tf: ModuleType, config: Any, task: str, spec: ModelSpec) -> Any:
    if task == "auto":
        for arch in getattr(config, "architectures", None) or []:
            cls = _model_class(tf, str(arch))
            if cls is not None:
                return cls
        return tf.AutoModel
    auto = getattr(tf, TASKS[task])
    if type(config) not in auto._model_mapping:
        raise ModelNotFoundError(
            f"transformers has no {task} model for {type(config).__name__} (hf:{spec.name}); "
            "pass another task, e.g. task='base'"
        )
    return auto


def _fetch_message(spec: ModelSpec, exc: BaseException, what: str) -> str:
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (
        f"cannot fetch the {what} of hf:{spec.name}: not in the local Hugging Face cache and "
        f"the hub cannot be reached offline{offline}; pass a local save_pretrained directory "
        f"(hf:PATH) instead ({first_line(exc, 160)})"
    )


# --------------------------------------------------------------------------- saving
def _orig_class(model: nn.Module) -> type:
    meta = block_meta(model)
    return meta.orig_cls if meta is not None else type(model)


def hf_class_spec(model: nn.Module) -> ModelSpec | None:
    """``hf:ClassName`` for a transformers model built outside dpatch."""
    if getattr(model, "config", None) is None:
        return None
    return ModelSpec("transformers", _orig_class(model).__name__)


def hf_rebuild_info(model: nn.Module) -> dict[str, Any]:
    """The class name and full config (JSON) that rebuild ``model`` without a download."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return {}
    return {
        "class": _orig_class(model).__name__,
        "config": json.loads(config.to_json_string(use_diff=False)),
    }


def hf_rebuild(entry: Mapping[str, Any]) -> nn.Module:
    """The model a manifest's class and config describe (random weights).

    Raises:
        ManifestError: the class is not in this transformers, or the config does not load.
    """
    tf = require()
    name = str(entry.get("class") or "")
    cls = _model_class(tf, name)
    if cls is None:
        raise ManifestError(
            f"the manifest's model class {name!r} is not in transformers {tf.__version__}; "
            "build the model yourself and pass it: dpatch.load(path, model=...)"
        )
    try:
        config = cls.config_class.from_dict(dict(entry["config"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise ManifestError(
            f"the manifest's {name} config does not load ({first_line(exc, 160)}); pass the "
            "model: dpatch.load(path, model=...)"
        ) from exc
    model: nn.Module = cls(config)
    return model


# --------------------------------------------------------------------------- listing
def hf_entries() -> list[ModelEntry]:
    """The transformers vision model classes, by task, each as ``hf:ClassName``."""
    tf = require()
    from transformers.models.auto import configuration_auto, modeling_auto

    out: list[ModelEntry] = []
    native: dict[str, bool] = {}
    for task, mapping in _LISTED.items():
        for model_type, names in getattr(modeling_auto, mapping).items():
            if model_type not in native:
                config_cls = getattr(tf, configuration_auto.CONFIG_MAPPING_NAMES[model_type], None)
                native[model_type] = config_cls is not None and _has_drop_path_rate(config_cls)
            for name in [names] if isinstance(names, str) else names:
                if hasattr(tf, name):
                    out.append(ModelEntry(f"hf:{name}", native[model_type], task))
    return out


def _has_drop_path_rate(config_cls: Any) -> bool:
    # transformers 5 configs are dataclasses (a class attribute per field); older ones
    # take it as an __init__ argument.
    if hasattr(config_cls, "drop_path_rate"):
        return True
    return "drop_path_rate" in inspect.signature(config_cls.__init__).parameters


# --------------------------------------------------------------------------- native rates
def hf_slot_rates(model: nn.Module) -> dict[str, float]:
    """Qualified name -> rate of every stochastic-depth module of a transformers model: its
    own ``*DropPath`` classes (recognised by :mod:`dpatch.analysis._slots` by behaviour) and the
    ``nn.Identity`` slots it builds at rate 0."""
    return slot_rates(model)


def _set_drop_path_rate(config: Any, rate: float) -> None:
    """``config.drop_path_rate = rate``. CvT's is a list, one per stage: it is scaled so its
    largest entry is ``rate`` (all stages at ``rate`` when it is all zeros)."""
    current = config.drop_path_rate
    value: Any = rate
    if isinstance(current, list | tuple):
        top = max(current, default=0.0)
        value = [rate * v / top for v in current] if top > 0 else [rate] * len(current)
    # LeViT's and TimeSformer's strict configs annotate drop_path_rate as an int and reject
    # 0.3, though their models read it as a float: the value is set past the validator.
    object.__setattr__(config, "drop_path_rate", value)


def hf_native_rates(model: nn.Module, max_rate: float) -> dict[str, float]:
    """The rates ``type(model)(config with drop_path_rate=max_rate)`` builds, by slot.

    Raises:
        InvalidValueError: the config has no ``drop_path_rate``, or it reaches no DropPath
            module.
    """
    cls = _orig_class(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "drop_path_rate"):
        raise InvalidValueError(
            f"transformers {cls.__name__} has no drop_path_rate in its config, so it has no "
            "native schedule; use --schedule linear"
        )
    ref_config = copy.deepcopy(config)
    _set_drop_path_rate(ref_config, max_rate)
    rates = hf_slot_rates(build_light(lambda: cls(ref_config)))
    if max_rate > 0 and not any(r > 0 for r in rates.values()):
        raise InvalidValueError(
            f"transformers {cls.__name__} puts config.drop_path_rate in no DropPath module "
            "(it leaves it unused, or keeps it elsewhere as LeViT does); use --schedule "
            "uniform or linear"
        )
    return rates
