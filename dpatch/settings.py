"""What a run asks for: one validated record, :class:`Settings`, and every choice and default
the library and the command line share (modes, scalings, coverages, prune orders, model
sources, verify's finding codes, the output names of many-checkpoint runs).

The command line, ``inject``/``retune``, the framework callbacks and many-checkpoint runs
all build one :class:`Settings` and hand it down; it is checked once, where it is built, so
a bad value fails before any model is loaded. No torch import: the command line builds it
(and reports a bad value) before the slow imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from dpatch.errors import InvalidValueError
from dpatch.schedule import PER, SCHEDULES, check_rate, schedule_rates

__all__ = [
    "COVERAGES",
    "DEFAULTS",
    "DEFAULT_TEMPLATE",
    "FINDING_CODES",
    "KEPT",
    "KERNEL_SETTINGS",
    "LAYER_METRICS",
    "METRICS",
    "MODES",
    "PRUNE_BY",
    "SCALINGS",
    "SETTING_NAMES",
    "SOURCES",
    "TIES",
    "Settings",
    "check_choice",
]

#: Drop per sample (``row``) or for the whole batch (``batch``).
MODES: tuple[str, ...] = ("row", "batch")
#: How kept branches are scaled: ``inverted`` (timm), ``expected`` (Huang), ``none``.
SCALINGS: tuple[str, ...] = ("inverted", "expected", "none")
#: What one drop decision covers: each ``branch`` on its own (timm), or the whole ``block``
#: (LayerDrop, LayerSkip).
TIES: tuple[str, ...] = ("branch", "block")
#: Which residual additions are sites: a model's native slots only when it has any
#: (``"slots"``), or those plus every addition without a slot (``"all"``).
COVERAGES: tuple[str, ...] = ("slots", "all")


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else an error naming it and the choices."""
    if value not in choices:
        raise InvalidValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return str(value)


@dataclass(frozen=True)
class Settings:
    """What ``inject``/``retune`` ask for; a field left None is not given.

    A field not given takes the recipe's value, else :data:`DEFAULTS`; for ``retune``,
    ``mode``, ``scaling``, ``skip`` and ``seed`` not given keep each site's own setting
    (:data:`KEPT`). Every given value is checked when the record is built.

    Attributes:
        max_rate: rate of the deepest block (every block for ``uniform``), in [0, 1).
        schedule: a per-layer schedule (:data:`dpatch.schedule.SCHEDULES`) or ``native``.
        min_rate: rate of the first block for ``linear``/``cosine``.
        rates: per-step rates for ``custom``, each in [0, 1].
        mode: ``row`` (per sample) or ``batch`` (whole batch).
        scaling: ``inverted``, ``expected`` or ``none``.
        per: what one schedule step covers: ``block`` or ``branch``.
        skip: compute dropped branches only where kept.
        seed: base seed of batch mode's host generators (one per site).
        tie: ``branch`` (each branch its own decision, timm) or ``block`` (one decision
            per sample for every branch of a block, LayerDrop/LayerSkip; with ``skip``, the
            whole layer runs on the kept rows only). ``block`` needs ``per="block"``.

    Raises:
        InvalidValueError: a value out of range or not among its choices (the message names
            it), or a combination that has no meaning (``min_rate`` with ``native``,
            ``rates`` with another schedule than ``custom``).
    """

    max_rate: float | None = None
    schedule: str | None = None
    min_rate: float | None = None
    rates: tuple[float, ...] | None = None
    mode: str | None = None
    scaling: str | None = None
    per: str | None = None
    skip: bool | None = None
    seed: int | None = None
    tie: str | None = None

    def __post_init__(self) -> None:
        if self.max_rate is not None:
            object.__setattr__(self, "max_rate", check_rate(self.max_rate, "max_rate"))
        if self.min_rate is not None:
            object.__setattr__(self, "min_rate", check_rate(self.min_rate, "min_rate"))
        if self.rates is not None:
            if isinstance(self.rates, str) or not isinstance(self.rates, Sequence):
                raise InvalidValueError(f"rates must be a list of numbers, but got {self.rates!r}")
            rates = tuple(
                check_rate(r, f"rates[{i}]", allow_one=True) for i, r in enumerate(self.rates)
            )
            object.__setattr__(self, "rates", rates)
        if self.schedule is not None:
            check_choice(self.schedule, "schedule", (*SCHEDULES, "native"))
        if self.mode is not None:
            check_choice(self.mode, "mode", MODES)
        if self.scaling is not None:
            check_choice(self.scaling, "scaling", SCALINGS)
        if self.per is not None:
            check_choice(self.per, "per", PER)
        if self.tie is not None:
            check_choice(self.tie, "tie", TIES)
        if self.skip is not None and not isinstance(self.skip, bool):
            raise InvalidValueError(f"skip must be True or False, but got {self.skip!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise InvalidValueError(f"seed must be an integer, but got {self.seed!r}")
        self._check_combination()

    def _check_combination(self) -> None:
        if self.schedule == "native" and self.min_rate:
            raise InvalidValueError(
                f"min_rate={self.min_rate!r} has no meaning for schedule 'native' (the "
                "library's own rule sets every rate); leave it at 0"
            )
        if self.tie == "block" and self.per == "branch":
            raise InvalidValueError(
                "tie='block' draws one decision per block, so its branches share one rate: "
                "it needs per='block' (CLI --per block)"
            )
        if self.rates is not None and self.schedule not in (None, "custom"):
            raise InvalidValueError(
                f"rates are for schedule 'custom', but the schedule is {self.schedule!r}; "
                "pass schedule='custom' (CLI --schedule custom)"
            )
        if self.schedule not in (None, "custom", "native") and self.max_rate is not None:
            # max_rate >= min_rate and the like: what the schedule itself checks
            schedule_rates(self.schedule, 1, self.max_rate, self.min_rate or 0.0)

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Settings:
        """The settings named in ``values`` (a function's ``locals()``, a recipe's keyword
        arguments); other keys are ignored."""
        return cls(**{name: values[name] for name in SETTING_NAMES if name in values})

    def given(self) -> dict[str, Any]:
        """The fields that were given (not None)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def over(self, base: Settings) -> Settings:
        """These settings where given, ``base``'s elsewhere."""
        return dataclasses.replace(base, **self.given())

    def without(self, names: Sequence[str]) -> Settings:
        """The same settings with ``names`` not given (``retune`` keeps those per site)."""
        return dataclasses.replace(self, **dict.fromkeys(names))


#: The names of :class:`Settings`' fields, in order (``inject``/``retune`` take them as
#: keyword arguments of the same names).
SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Settings))

#: What ``inject``/``retune`` use for a setting neither given nor set by a recipe.
DEFAULTS = Settings(
    max_rate=0.1,
    schedule="linear",
    min_rate=0.0,
    rates=None,
    mode="row",
    scaling="inverted",
    per="block",
    skip=False,
    seed=0,
    tie="branch",
)

#: What :func:`dpatch.sensitivity` measures: ``loss`` (the model with one branch removed,
#: per branch), ``angular`` (Gromov et al.'s angular distance of a layer's input and
#: output) or ``bi`` (ShortGPT's Block Influence, ``1 - cos``), one score per layer.
LAYER_METRICS: tuple[str, ...] = ("angular", "bi")
METRICS: tuple[str, ...] = ("loss", *LAYER_METRICS)

#: How ``prune(count=N)`` chooses: highest rate first, deepest first, every other block
#: (fairseq), least sensitive first (a :func:`dpatch.sensitivity` result), or whole layers
#: by their angular distance or Block Influence, lowest first.
PRUNE_BY: tuple[str, ...] = ("rate", "depth", "every-other", "sensitivity", "angular", "bi")

#: Libraries ``list_models`` can list (``--source``; ``tv`` is short for torchvision,
#: ``hf`` for transformers).
SOURCES: tuple[str, ...] = ("timm", "tv", "torchvision", "hf", "transformers")

#: What each code of a ``verify`` finding means (``ignore=``, ``--ignore`` take these).
FINDING_CODES: dict[str, str] = {
    "rate": "the realised drop share does not fit the slot's rate",
    "scale": "kept branches are not scaled as the slot's scaling says",
    "mask": "rows were dropped only in part (a mask finer than a sample)",
    "mode": "whole batches dropped where samples should be, or the other way round",
    "eval": "eval output is not the model without stochastic depth",
    "never-called": "a slot with a rate above 0 never runs in training",
    "not-residual": "a slot runs on something that is not a residual branch",
    "declared": "the model's settings differ from the declared ones",
    "schedule": "the rates do not follow a schedule (one rate per stage inside a ramp)",
    "unmeasured": "a measurement could not be made",
    "layerdrop": "the model's own LayerDrop skips layers at another rate than it claims",
}

#: Values of the ``DPATCH_KERNELS`` environment variable: unset/``""``/``"1"`` the Triton
#: kernels on CUDA, ``"0"`` never, ``"interpret"`` also CPU tensors in Triton's interpreter.
KERNEL_SETTINGS: tuple[str, ...] = ("", "0", "1", "interpret")

#: The name of each output of a many-checkpoint run inside ``-o DIR`` (``{stem}``,
#: ``{name}``, ``{parent}``, ``{index}``).
DEFAULT_TEMPLATE = "{stem}-dp.safetensors"

#: What ``retune`` keeps, site by site, unless given (or set by a recipe).
KEPT: tuple[str, ...] = ("mode", "scaling", "skip", "seed", "tie")
