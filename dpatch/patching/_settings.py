"""What a patch asks for: defaults, then a published recipe, then the caller's arguments,
validated before any work; and the rate each site gets from its schedule."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from dpatch.analysis import Site
from dpatch.droppath import MODES, SCALINGS
from dpatch.errors import InvalidValueError
from dpatch.schedule import PER, SCHEDULES, schedule_rates

__all__ = ["DEFAULTS", "KEPT", "Request", "check_arguments", "site_rates"]


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return str(value)


#: What ``retune`` keeps, site by site, unless given (or set by a recipe).
KEPT: tuple[str, ...] = ("mode", "scaling", "skip", "seed")

#: What ``inject``/``retune`` use for an argument neither given nor set by a recipe.
DEFAULTS: dict[str, Any] = {
    "max_rate": 0.1,
    "schedule": "linear",
    "min_rate": 0.0,
    "rates": None,
    "mode": "row",
    "scaling": "inverted",
    "per": "block",
    "skip": False,
    "seed": 0,
}


@dataclasses.dataclass(frozen=True)
class Request:
    """What a patch asks for (the arguments of ``inject``/``retune``, after the recipe);
    None in ``mode``, ``scaling``, ``skip`` or ``seed`` keeps each site's own setting."""

    max_rate: float
    schedule: str
    min_rate: float
    rates: Sequence[float] | None
    mode: str | None
    scaling: str | None
    per: str
    skip: bool | None
    seed: int | None
    recipe: dict[str, Any] | None = None  # the resolved recipe (``ResolvedRecipe.to_dict``)

    @classmethod
    def of(
        cls,
        model: nn.Module,
        given: dict[str, Any],
        recipe: str | None,
        size: str | None,
        example_inputs: Sequence[Any] | None,
        *,
        keep: Sequence[str] = (),
    ) -> Request:
        """Defaults (those in ``keep``: None), then the recipe, then what the caller gave
        (not None); validated."""
        args: dict[str, Any] = {k: None if k in keep else v for k, v in DEFAULTS.items()}
        resolved = None
        if recipe is not None:
            from dpatch.recipes import resolve_recipe

            resolved = resolve_recipe(recipe, model, size, example_inputs=example_inputs)
            args.update(resolved.inject_kwargs)
        elif size is not None:
            raise InvalidValueError(f"size={size!r} needs recipe= (a recipe's model size)")
        args.update({k: v for k, v in given.items() if v is not None})
        req = cls(**args, recipe=resolved.to_dict() if resolved is not None else None)
        req.validate()
        return req

    def validate(self) -> None:
        """Check every argument before any work is done (custom rates: once the depth is
        known)."""
        check_choice(self.schedule, "schedule", (*SCHEDULES, "native"))
        if self.mode is not None:
            check_choice(self.mode, "mode", MODES)
        if self.scaling is not None:
            check_choice(self.scaling, "scaling", SCALINGS)
        check_choice(self.per, "per", PER)
        if self.schedule == "custom":
            return
        if self.schedule == "native" and self.min_rate:
            raise InvalidValueError(
                f"min_rate={self.min_rate!r} has no meaning for schedule 'native' (the "
                "library's own rule sets every rate); leave it at 0"
            )
        schedule = "uniform" if self.schedule == "native" else self.schedule
        schedule_rates(schedule, 1, self.max_rate, self.min_rate)


def check_arguments(
    max_rate: float | None = None,
    schedule: str | None = None,
    min_rate: float | None = None,
    mode: str | None = None,
    scaling: str | None = None,
    per: str | None = None,
) -> None:
    """Raise :class:`InvalidValueError` for an argument ``inject``/``retune`` would reject,
    without a model (so a caller can fail before slow work); None means "not given"."""
    given = {
        "max_rate": max_rate,
        "schedule": schedule,
        "min_rate": min_rate,
        "mode": mode,
        "scaling": scaling,
        "per": per,
    }
    Request(**{**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}).validate()


def site_rates(
    model: nn.Module, req: Request, sites: Sequence[Site]
) -> tuple[dict[str, float], list[float]]:
    """Each site's rate and each schedule step's rate."""
    if req.per == "block":
        step_of = {s.name: s.block for s in sites}
        depth = len({s.block for s in sites})
    else:
        step_of = {s.name: i for i, s in enumerate(sites)}
        depth = len(sites)
    if req.schedule != "native":
        steps = schedule_rates(req.schedule, depth, req.max_rate, req.min_rate, req.rates)
        return {s.name: steps[step_of[s.name]] for s in sites}, steps
    from dpatch.models import native_rates

    by_slot = native_rates(model, req.max_rate)
    rate = {s.name: by_slot[s.origin or s.slot] for s in sites if (s.origin or s.slot) in by_slot}
    # A residual addition without a slot (coverage="all") takes its block's rate.
    block_rate: dict[int, float] = {}
    for s in sites:
        if s.name in rate:
            block_rate[s.block] = max(block_rate.get(s.block, 0.0), rate[s.name])
    rate.update({s.name: block_rate.get(s.block, 0.0) for s in sites if s.name not in rate})
    steps = [0.0] * depth
    for s in sites:
        steps[step_of[s.name]] = max(steps[step_of[s.name]], rate[s.name])
    return rate, steps
