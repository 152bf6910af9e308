"""What one patch asks for, resolved: defaults, then a published recipe, then the caller's
:class:`~dpatch.settings.Settings`; and the rate each site gets from its schedule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from dpatch.analysis import Site
from dpatch.errors import InvalidValueError
from dpatch.marks import ScheduleMark
from dpatch.schedule import schedule_rates
from dpatch.settings import DEFAULTS, Settings

__all__ = ["Request", "resolve", "site_rates"]


@dataclass(frozen=True)
class Request:
    """A patch's settings after defaults and recipe: ``max_rate``, ``schedule``,
    ``min_rate`` and ``per`` are set; ``mode``, ``scaling``, ``skip`` and ``seed`` are None
    where each site keeps its own (``retune``).

    Attributes:
        settings: the resolved settings.
        recipe: the resolved recipe (``ResolvedRecipe.to_dict``), when one was used.
    """

    settings: Settings
    recipe: dict[str, Any] | None = None

    @property
    def max_rate(self) -> float:
        return float(self.settings.max_rate or 0.0)

    @property
    def min_rate(self) -> float:
        return float(self.settings.min_rate or 0.0)

    @property
    def schedule(self) -> str:
        return str(self.settings.schedule)

    @property
    def per(self) -> str:
        return str(self.settings.per)


def resolve(
    given: Settings,
    model: nn.Module,
    recipe: str | None,
    size: str | None,
    example_inputs: Sequence[Any] | None,
    *,
    keep: Sequence[str] = (),
    kept: ScheduleMark | None = None,
) -> Request:
    """Defaults (those in ``keep``: not given, so each site keeps its own), then the
    schedule the model has (``kept``: ``retune`` keeps its kind and ``per``), then the
    recipe's settings, then ``given``.

    Raises:
        InvalidValueError: an unknown recipe or size, ``size`` without a recipe,
            settings that do not go together once merged, or new rates for a kept
            ``custom`` schedule given as ``max_rate``/``min_rate`` (no meaning for it).
    """
    base = DEFAULTS.without(keep)
    if kept is not None and recipe is None:
        base = _keeping(given, kept).over(base)
    resolved = None
    if recipe is not None:
        from dpatch.recipes import resolve_recipe

        resolved = resolve_recipe(recipe, model, size, example_inputs=example_inputs)
        base = Settings.of(resolved.inject_kwargs).over(base)
    elif size is not None:
        raise InvalidValueError(f"size={size!r} needs recipe= (a recipe's model size)")
    return Request(given.over(base), resolved.to_dict() if resolved is not None else None)


def _keeping(given: Settings, kept: ScheduleMark) -> Settings:
    """What ``retune`` keeps of the model's schedule: its kind and ``per``; its first rate
    and, for ``custom``, its rates, unless the call names another schedule."""
    if given.schedule is not None:
        return Settings(per=kept.per)
    if kept.schedule == "custom" and given.rates is None:
        if given.max_rate is not None or given.min_rate is not None:
            raise InvalidValueError(
                "the model's schedule is 'custom' (one rate per step): max_rate/min_rate "
                "have no meaning for it; pass schedule= (CLI --schedule KIND) or rates="
            )
        return Settings(schedule="custom", per=kept.per, rates=kept.rates)
    min_rate = kept.min_rate if kept.schedule in ("linear", "cosine") else None
    if min_rate is not None and given.max_rate is not None and min_rate > given.max_rate:
        min_rate = None  # a lower deepest rate than the kept first one: start from 0
    return Settings(schedule=kept.schedule, per=kept.per, min_rate=min_rate)


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
        steps = schedule_rates(req.schedule, depth, req.max_rate, req.min_rate, req.settings.rates)
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
