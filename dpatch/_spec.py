"""The records of where a model comes from (:class:`ModelSpec`) and of a listed name
(:class:`ModelEntry`): plain data that the zoos (:mod:`dpatch.zoo`, :mod:`dpatch._hf`) and
the marks (:mod:`dpatch._marks`) share without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelEntry", "ModelSpec"]

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
