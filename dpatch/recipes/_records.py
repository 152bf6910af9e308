"""The records of a recipe: its source, its rates per model size, its time schedule, and
what resolving it for one model gives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpatch.errors import InvalidValueError
from dpatch.schedule import PER, SCHEDULES, check_rate
from dpatch.scheduler import check_config, needs_total_steps
from dpatch.settings import MODES, SCALINGS, TIES

__all__ = ["ModelShape", "Recipe", "ResolvedRecipe", "SizeRate", "Source", "TimeSchedule"]


_SIZE_ALIASES = {
    "tiny": "t",
    "small": "s",
    "base": "b",
    "large": "l",
    "xlarge": "xl",
    "x-large": "xl",
    "huge": "h",
    "giant": "g",
}
_SIZE_PREFIXES = ("vit-", "vit_", "convnext-", "convnext_", "swin-", "swin_", "resnet-", "resnet")


def _size_key(size: str) -> str:
    key = str(size).strip().lower()
    for prefix in _SIZE_PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            key = key[len(prefix) :]
            break
    return _SIZE_ALIASES.get(key, key)


@dataclass(frozen=True)
class Source:
    """Where a recipe comes from: the paper and the file that holds the numbers."""

    paper: str
    url: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"paper": self.paper, "url": self.url, "detail": self.detail}


@dataclass(frozen=True)
class SizeRate:
    """The rate of one model size, and how to recognise that size in a model.

    Attributes:
        size: the short name users pass as ``size=`` (``"S"``, ``"B"``, ``"50"``, ...).
        max_rate: the recipe's rate for this size.
        blocks: residual blocks (dpatch schedule steps with ``per="block"``); None: any.
        width: channels of the first residual block (ViT embed dim, ConvNeXt/Swin stage-1
            dim); None: any.
    """

    size: str
    max_rate: float
    blocks: int | None = None
    width: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "max_rate": self.max_rate,
            "blocks": self.blocks,
            "width": self.width,
        }


@dataclass(frozen=True)
class TimeSchedule:
    """The rate over training time, as ``DropPathScheduler`` arguments.

    Attributes:
        kind: a scheduler kind (``"constant"``, ``"early"``, ``"late"``, ``"exp-ramp"``, ...).
        shape: ``"early"`` only: ``"constant"`` or ``"linear"``.
        cutoff_epochs: ``"early"``/``"late"``: the epoch where the phase switches ...
        epochs: ... out of this many; the scheduler gets the fraction of ``total_steps``.
    """

    kind: str = "constant"
    shape: str = "constant"
    cutoff_epochs: int | None = None
    epochs: int | None = None

    @property
    def cutoff_fraction(self) -> float | None:
        """The cutoff as a share of training (``cutoff_epochs / epochs``)."""
        if self.cutoff_epochs is None or self.epochs is None:
            return None
        return self.cutoff_epochs / self.epochs

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``DropPathScheduler`` (add ``total_steps=`` for a cutoff)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "early":
            out["shape"] = self.shape
        if self.cutoff_fraction is not None:
            out["cutoff_fraction"] = self.cutoff_fraction
        return out

    def describe(self) -> str:
        """One line for tables: ``early (linear decay to 0), epochs 0-50 of 300``."""
        if self.kind == "early":
            how = "linear decay to 0" if self.shape == "linear" else "constant"
            return f"early ({how}), first {self.cutoff_epochs} of {self.epochs} epochs, then 0"
        if self.kind == "late":
            return f"late: 0 for the first {self.cutoff_epochs} of {self.epochs} epochs, then on"
        if self.kind == "exp-ramp":
            return "exp-ramp: 2^(t/T) - 1 from 0 to 1 over the run (T = total steps)"
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "shape": self.shape,
            "cutoff_epochs": self.cutoff_epochs,
            "epochs": self.epochs,
            "cutoff_fraction": self.cutoff_fraction,
            "describe": self.describe(),
        }


@dataclass(frozen=True)
class Recipe:
    """A published stochastic-depth setting.

    Attributes:
        name: registry key (``dpatch recipes``, ``--recipe``).
        title: what was trained, on what (one line).
        schedule: per-layer schedule kind (``linear``, ``uniform``, ``huang``).
        source: paper and repository file.
        max_rate: the rate when it does not depend on the size (else None).
        sizes: the rate per size, when it does.
        per, mode, scaling, skip, tie: as in ``inject``.
        time: the rate over training time.
        notes: caveats, and where a number differs from what one might expect.
    """

    name: str
    title: str
    schedule: str
    source: Source
    max_rate: float | None = None
    sizes: tuple[SizeRate, ...] = ()
    per: str = "block"
    mode: str = "row"
    scaling: str = "inverted"
    skip: bool = False
    tie: str = "branch"
    time: TimeSchedule = field(default_factory=TimeSchedule)
    notes: str = ""

    def __post_init__(self) -> None:
        # A recipe is checked where it is written: a typo in the registry fails on import,
        # a user's own Recipe fails where it is built.
        where = f"recipe {self.name!r}"
        if (self.max_rate is None) == (not self.sizes):
            raise InvalidValueError(f"{where}: give either max_rate or sizes, not both or none")
        # "custom" needs a list of rates per block, which no size-free recipe can hold.
        schedules = tuple(k for k in SCHEDULES if k != "custom")
        for label, value, choices in (
            ("schedule", self.schedule, schedules),
            ("per", self.per, PER),
            ("mode", self.mode, MODES),
            ("scaling", self.scaling, SCALINGS),
            ("tie", self.tie, TIES),
        ):
            if value not in choices:
                raise InvalidValueError(
                    f"{where}: unknown {label} {value!r}; choose one of: {', '.join(choices)}"
                )
        rates = [self.max_rate] if self.max_rate is not None else [s.max_rate for s in self.sizes]
        for rate in rates:
            check_rate(rate, f"{where} rate")
        keys = [_size_key(s.size) for s in self.sizes]
        if len(set(keys)) != len(keys):
            raise InvalidValueError(f"{where}: sizes repeat ({self.size_names})")
        kwargs = self.time.scheduler_kwargs()
        # a schedule over the whole run is checked against a stand-in length when the
        # recipe names none
        total = self.time.epochs or (100 if needs_total_steps(kwargs) else None)
        check_config(**kwargs, total_steps=total)

    @property
    def sized(self) -> bool:
        """True when the rate depends on the model size."""
        return bool(self.sizes)

    def rate_for(self, size: str | None) -> float:
        """The rate for ``size`` (``None`` for a recipe without sizes).

        Raises:
            InvalidValueError: an unknown size, or none given where one is needed.
        """
        if self.max_rate is not None:
            return self.max_rate
        if size is None:
            raise InvalidValueError(
                f"recipe {self.name!r} depends on the model size; pass size= (CLI --size), "
                f"one of: {self.size_names}"
            )
        return self.size_rate(size).max_rate

    @property
    def size_names(self) -> str:
        """The sizes, comma-separated (for messages and listings)."""
        return ", ".join(s.size for s in self.sizes)

    def size_rate(self, size: str) -> SizeRate:
        """The entry of ``size`` (case-insensitive; ``base``, ``ViT-B``, ``ResNet-50`` work).

        Raises:
            InvalidValueError: an unknown size (the message lists the recipe's sizes).
        """
        key = _size_key(size)
        for s in self.sizes:
            if _size_key(s.size) == key:
                return s
        raise InvalidValueError(
            f"unknown size {size!r} for recipe {self.name!r}; choose one of: {self.size_names}"
        )

    @property
    def rates_text(self) -> str:
        """``S 0.05, B 0.2, L 0.45, H 0.6`` or ``0.1``."""
        if not self.sizes:
            return f"{self.max_rate:g}"
        return ", ".join(f"{s.size} {s.max_rate:g}" for s in self.sizes)

    def summary(self) -> dict[str, str]:
        """The columns of a recipe listing (``dpatch recipes``), as text."""
        how = f"{self.schedule}, per {self.per}, {self.mode}"
        if self.scaling != "inverted":
            how += f", {self.scaling} scaling"
        if self.skip:
            how += ", skip"
        return {
            "name": self.name,
            "title": self.title,
            "rates": self.rates_text,
            "schedule": how,
            "time": self.time.describe(),
            "source": f"{self.source.paper} - {self.source.url}",
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``dpatch recipes --json``)."""
        return {
            "name": self.name,
            "title": self.title,
            "schedule": self.schedule,
            "per": self.per,
            "mode": self.mode,
            "scaling": self.scaling,
            "skip": self.skip,
            "tie": self.tie,
            "max_rate": self.max_rate,
            "sizes": [s.to_dict() for s in self.sizes],
            "time": self.time.to_dict(),
            "source": self.source.to_dict(),
            "notes": self.notes,
        }


@dataclass(frozen=True)
class ModelShape:
    """What size detection reads from a model: residual blocks and the first one's width."""

    blocks: int
    width: int | None

    def describe(self) -> str:
        width = "unknown width" if self.width is None else f"width {self.width}"
        return f"{self.blocks} residual blocks, {width}"


@dataclass(frozen=True)
class ResolvedRecipe:
    """A recipe applied to a size: the arguments of ``inject``/``retune`` and the scheduler.

    ``inject(model, **r.inject_kwargs)`` then
    ``DropPathScheduler(model, **r.scheduler_kwargs, total_steps=n)`` reproduce it.

    Attributes:
        recipe: the recipe.
        size: the size used (None for a recipe without sizes).
        size_from: ``"argument"`` (given), ``"model"`` (detected) or ``""`` (no sizes).
        max_rate: the rate for that size.
        shape: what detection read from the model, when it did.
    """

    recipe: Recipe
    size: str | None
    size_from: str
    max_rate: float
    shape: ModelShape | None = None

    @property
    def inject_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``dpatch.inject`` / ``dpatch.retune`` (a fresh dict)."""
        r = self.recipe
        return {
            "max_rate": self.max_rate,
            "schedule": r.schedule,
            "per": r.per,
            "mode": r.mode,
            "scaling": r.scaling,
            "skip": r.skip,
            "tie": r.tie,
        }

    @property
    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``DropPathScheduler`` (a fresh dict); a cutoff comes as
        ``cutoff_fraction``, so add ``total_steps=``."""
        return self.recipe.time.scheduler_kwargs()

    @property
    def needs_total_steps(self) -> bool:
        """True when the scheduler needs ``total_steps`` (a cutoff given as a fraction, a
        ramp over the whole run)."""
        return needs_total_steps(self.scheduler_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, for reports and manifests."""
        return {
            "recipe": self.recipe.name,
            "title": self.recipe.title,
            "size": self.size,
            "size_from": self.size_from,
            "model_shape": None
            if self.shape is None
            else {"blocks": self.shape.blocks, "width": self.shape.width},
            "inject": self.inject_kwargs,
            "scheduler": self.scheduler_kwargs,
            "needs_total_steps": self.needs_total_steps,
            "time": self.recipe.time.describe(),
            "source": self.recipe.source.to_dict(),
            "notes": self.recipe.notes,
        }
