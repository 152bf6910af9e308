"""The records of where a model comes from (:class:`ModelSpec`) and of a listed name
(:class:`ModelEntry`): plain data the zoos (:mod:`._zoo`, :mod:`._hf`) share, and the mark
a built model keeps of its spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ModelEntry", "ModelSpec", "model_spec", "set_model_spec"]

_MODEL_SPEC = "_dpatch_spec"

_PREFIXES = {"timm": "timm", "torchvision": "tv", "hf-hub": "hf-hub", "transformers": "hf"}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from.

    Attributes:
        source: ``timm``, ``torchvision``, ``transformers``, ``hf-hub`` (timm weights on the
            hub) or ``python``.
        name: the model name (``ORG/NAME`` for hf-hub; a hub name, a directory or a model
            class for transformers; ``module:factory`` for python).
        kwargs: constructor keyword arguments (JSON-serialisable values); for transformers,
            config overrides and ``task``.
    """

    source: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def text(self) -> str:
        """Canonical spec string, e.g. ``timm:resnet50``."""
        prefix = _PREFIXES.get(self.source)
        return f"{prefix}:{self.name}" if prefix else self.name


@dataclass(frozen=True)
class ModelEntry:
    """A name ``dpatch list`` shows, and whether its library gives it native slots.

    Attributes:
        spec: the spec that builds it (``tv:r3d_18``).
        native: its library sets drop-path rates (timm ``drop_path_rate``, torchvision
            ``stochastic_depth_prob``, transformers ``config.drop_path_rate``).
        task: what it does (``classification``, ``detection``, ``video``, ...).
    """

    spec: str
    native: bool
    task: str = "classification"


def model_spec(model: nn.Module) -> ModelSpec | None:
    """The spec :func:`create_model` built ``model`` from, or None."""
    return model.__dict__.get(_MODEL_SPEC)


def set_model_spec(model: nn.Module, spec: ModelSpec) -> None:
    object.__setattr__(model, _MODEL_SPEC, spec)
