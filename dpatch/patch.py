"""``inject``, ``retune``, ``strip`` and ``inspect``: sites + schedule -> changes -> report."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from dpatch._apply import (
    apply_block,
    configure_slot,
    restore_slots,
    second_probe,
    set_slot,
    unpatch_to_redo,
)
from dpatch._marks import block_meta
from dpatch._slots import SlotSettings
from dpatch.droppath import MODES, SCALINGS, DropPath
from dpatch.errors import InvalidValueError, ManifestError, NoResidualSitesError, NoSlotsError
from dpatch.results import PatchReport, Skipped, block_rates
from dpatch.rewrite import RewriteCache, unpatch_block
from dpatch.schedule import PER, SCHEDULES, check_rate, expected_depth, schedule_rates
from dpatch.sites import Analysis, Site, analyze, qualify

__all__ = [
    "PER",
    "PatchReport",
    "Skipped",
    "apply_sites",
    "check_arguments",
    "inject",
    "inspect",
    "retune",
    "strip",
]


def _check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return str(value)


def _empty_error(an: Analysis, what: str) -> NoResidualSitesError:
    return NoResidualSitesError(
        f"{what} has no residual branch to put stochastic depth on (it ran on "
        f"{an.example.describe()} [{an.example.source}])"
    )


def inspect(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    allow_empty: bool = True,
    coverage: str = "slots",
) -> PatchReport:
    """List every residual site of ``model`` with its current rate. Read-only.

    Raises:
        ProbeError: the model runs on no input; pass ``example_inputs``.
        NoResidualSitesError: no residual branch and ``allow_empty`` is False.
    """
    an = analyze(model, example_inputs, coverage)
    sites = an.sites()
    if not sites and not allow_empty:
        raise _empty_error(an, "the model")
    return PatchReport.current(sites, _skipped(an), model=model, example=an.example)


def _skipped(an: Analysis) -> tuple[Skipped, ...]:
    out = [Skipped(p, r) for p, r in an.skipped]
    out += [
        Skipped(
            path,
            "residual addition without a slot left alone: the model's own DropPath slots "
            f"define its sites (coverage='all', --coverage all, adds it as {attr})",
        )
        for path, attr in an.unslotted
    ]
    return tuple(out)


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


def inject(
    model: nn.Module,
    max_rate: float | None = None,
    schedule: str | None = None,
    min_rate: float | None = None,
    rates: Sequence[float] | None = None,
    mode: str | None = None,
    scaling: str | None = None,
    per: str | None = None,
    inplace: bool = True,
    *,
    skip: bool | None = None,
    seed: int | None = None,
    example_inputs: Sequence[Any] | None = None,
    allow_empty: bool = True,
    recipe: str | None = None,
    size: str | None = None,
    coverage: str = "slots",
) -> PatchReport:
    """Put stochastic depth on every residual branch of ``model`` with a per-layer schedule.

    Idempotent: injecting into an injected model equals injecting once. An argument left at
    None takes the recipe's value, else its default (``dpatch.patch.DEFAULTS``).

    Args:
        model: any ``nn.Module`` (timm, torchvision, transformers, or your own).
        max_rate: rate of the deepest block (every block for ``uniform``); default 0.1.
        schedule: ``linear`` (default), ``uniform``, ``huang``, ``efficientnet``,
            ``cosine``, ``custom`` (with ``rates``) or ``native`` (the model library's own
            rule).
        min_rate: rate of the first block for ``linear``/``cosine``; default 0.
        rates: per-step rates for ``custom``.
        mode: ``row`` (per sample, default) or ``batch`` (whole batch).
        scaling: ``inverted`` (default), ``expected`` or ``none``.
        per: ``block`` (default: branches of a block share a step, timm's rule) or
            ``branch``.
        inplace: patch ``model`` itself; else a deep copy (``report.model``).
        skip: compute dropped branches only where kept (training speed-up; see README).
        seed: base seed of the host generators batch mode draws from (one per site), so
            all DDP ranks drop the same blocks; default 0.
        example_inputs: inputs for the meta-device probe (default: inferred).
        allow_empty: return an empty report instead of raising when the model ran and has
            no residual branch.
        recipe: a published recipe (``dpatch.recipes``) that sets the arguments left at
            None; its time schedule is reported for ``DropPathScheduler``.
        size: the model size for a recipe whose rate depends on it (default: read from
            the model).
        coverage: ``"slots"`` (default: when the model has native slots, they alone are
            its sites) or ``"all"`` (those plus every residual addition without a slot).

    Raises:
        InvalidValueError: a bad rate, schedule, mode, scaling, ``per`` or recipe.
        ProbeError: the model runs on no input; pass ``example_inputs``.
        NoResidualSitesError: no residual branch and ``allow_empty`` is False.
    """
    req = _Request.of(
        model,
        {
            "max_rate": max_rate,
            "schedule": schedule,
            "min_rate": min_rate,
            "rates": rates,
            "mode": mode,
            "scaling": scaling,
            "per": per,
            "skip": skip,
            "seed": seed,
        },
        recipe,
        size,
        example_inputs,
    )
    return _patch(
        model,
        req,
        inplace=inplace,
        example_inputs=example_inputs,
        allow_empty=allow_empty,
        slots_only=False,
        coverage=coverage,
    )


def retune(
    model: nn.Module,
    max_rate: float | None = None,
    schedule: str | None = None,
    min_rate: float | None = None,
    rates: Sequence[float] | None = None,
    mode: str | None = None,
    scaling: str | None = None,
    per: str | None = None,
    inplace: bool = True,
    *,
    skip: bool | None = None,
    seed: int | None = None,
    example_inputs: Sequence[Any] | None = None,
    allow_empty: bool = False,
    recipe: str | None = None,
    size: str | None = None,
    coverage: str = "slots",
) -> PatchReport:
    """Change the rates of a model that already has slots (native or from ``inject``).

    Same arguments as :func:`inject`.

    Raises:
        NoSlotsError: the model has no slot at all (use ``inject`` to add them).
        NoResidualSitesError: no residual branch at all, unless ``allow_empty``.
    """
    req = _Request.of(
        model,
        {
            "max_rate": max_rate,
            "schedule": schedule,
            "min_rate": min_rate,
            "rates": rates,
            "mode": mode,
            "scaling": scaling,
            "per": per,
            "skip": skip,
            "seed": seed,
        },
        recipe,
        size,
        example_inputs,
    )
    return _patch(
        model,
        req,
        inplace=inplace,
        example_inputs=example_inputs,
        allow_empty=allow_empty,
        slots_only=True,
        coverage=coverage,
    )


@dataclasses.dataclass(frozen=True)
class _Request:
    """What a patch asks for (the arguments of ``inject``/``retune``, after the recipe)."""

    max_rate: float
    schedule: str
    min_rate: float
    rates: Sequence[float] | None
    mode: str
    scaling: str
    per: str
    skip: bool
    seed: int
    recipe: dict[str, Any] | None = None  # the resolved recipe (``ResolvedRecipe.to_dict``)

    @classmethod
    def of(
        cls,
        model: nn.Module,
        given: dict[str, Any],
        recipe: str | None,
        size: str | None,
        example_inputs: Sequence[Any] | None,
    ) -> _Request:
        """Defaults, then the recipe, then what the caller gave (not None); validated."""
        args = dict(DEFAULTS)
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
        _check_choice(self.schedule, "schedule", (*SCHEDULES, "native"))
        _check_choice(self.mode, "mode", MODES)
        _check_choice(self.scaling, "scaling", SCALINGS)
        _check_choice(self.per, "per", PER)
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
    _Request(**{**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}).validate()


def _site_rates(
    model: nn.Module, req: _Request, sites: Sequence[Site]
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
    from dpatch.zoo import native_rates

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


def _patch(
    model: nn.Module,
    req: _Request,
    *,
    inplace: bool,
    example_inputs: Sequence[Any] | None,
    allow_empty: bool,
    slots_only: bool,
    coverage: str,
) -> PatchReport:
    if not inplace:
        model = copy.deepcopy(model)
    unpatch_to_redo(model, skip=req.skip, coverage=coverage)

    an = analyze(model, example_inputs, coverage)
    before = {s.name: s for s in an.sites()}
    if not before and not allow_empty:
        raise _empty_error(an, "the model")
    if before and slots_only and not any(s.kind == "native" or s.fused for s in before.values()):
        raise NoSlotsError(
            "the model has no DropPath slot to retune; use inject to add stochastic depth"
        )
    sites = list(before.values())
    site_rate, steps = _site_rates(model, req, sites)
    settings = {
        s.name: SlotSettings(site_rate[s.name], req.mode, req.scaling, req.seed + i)
        for i, s in enumerate(sites)
    }

    skipped = list(_skipped(an))
    skip_inputs = second_probe(model, an) if req.skip else None
    cache = RewriteCache()
    for b in an.blocks:
        skipped += apply_block(b, settings, req.skip, skip_inputs, cache, an)
    site_of_slot = {s.slot: s.name for s in sites}
    for loose in an.loose:
        set_slot(model, loose.slot_path, settings[site_of_slot[loose.slot_path]])
        if req.skip:
            why = (
                "skip needs a traced block; this slot masks"
                if loose.residual
                else "not on a residual addition (it drops the whole value it is given); masks"
            )
            skipped.append(Skipped(loose.slot_path, why))

    after = tuple(an.sites())
    changed = tuple(
        s.name for s in after if s.name not in before or _settings(before[s.name]) != _settings(s)
    )
    return PatchReport(
        sites=after,
        skipped=tuple(skipped),
        changed=changed,
        schedule=req.schedule,
        per=req.per,
        max_rate=float(req.max_rate),
        min_rate=float(req.min_rate),
        mode=req.mode,
        scaling=req.scaling,
        skip=req.skip,
        rates=tuple(steps),
        expected_depth=expected_depth(steps),
        model=model,
        example=an.example,
        recipe=req.recipe,
    )


def _settings(s: Site) -> tuple[Any, ...]:
    return (s.rate, s.mode, s.scaling, s.skip, s.fused)


def strip(model: nn.Module) -> int:
    """Undo dpatch: rewritten blocks get their original class and slots back, replaced slot
    modules their original module. Returns the number of modules restored."""
    restored = 0
    for mod in list(model.modules()):
        if block_meta(mod) is not None:
            unpatch_block(mod)
            restored += 1
    return restored + restore_slots(model)


def apply_sites(
    model: nn.Module,
    sites: Sequence[Mapping[str, Any]],
    *,
    skip: bool = False,
    seed: int = 0,
    example_inputs: Sequence[Any] | None = None,
) -> PatchReport:
    """Patch ``model`` so each site has exactly the settings listed (a manifest's ``sites``).

    Raises:
        ManifestError: a listed site does not exist in the model, or the model has sites
            the list does not mention.
    """
    wanted = {qualify(d["path"], d["branch"]): d for d in sites}
    report = inject(
        model, 0.0, schedule="uniform", skip=skip, seed=seed, example_inputs=example_inputs
    )
    have = {s.name: s for s in report.sites}
    missing = sorted(set(wanted) - set(have))
    extra = sorted(set(have) - set(wanted))
    if missing or extra:
        raise ManifestError(
            f"the file's sites do not fit the model: {len(missing)} listed but absent "
            f"(e.g. {', '.join(missing[:3]) or '-'}), {len(extra)} present but unlisted "
            f"(e.g. {', '.join(extra[:3]) or '-'}); was it made for another model or dpatch?"
        )
    updated = []
    for i, (name, site) in enumerate(have.items()):
        d = wanted[name]
        dp = model.get_submodule(site.slot)
        if isinstance(dp, DropPath):
            configure_slot(
                dp,
                SlotSettings(
                    _rate_of(d, name),
                    str(d.get("mode", "row")),
                    str(d.get("scaling", "inverted")),
                    seed + i,
                    dp.skip and bool(d.get("skip", False)),
                ),
            )
            site = dataclasses.replace(
                site, rate=dp.drop_prob, mode=dp.mode, scaling=dp.scaling, skip=dp.skip
            )
        updated.append(site)
    steps = block_rates(updated)
    # The sites are known from the inject above: no second probe of the model.
    return dataclasses.replace(
        report,
        sites=tuple(updated),
        changed=(),
        schedule="current",
        rates=tuple(steps),
        expected_depth=expected_depth(steps),
    )


def _rate_of(d: Mapping[str, Any], name: str) -> float:
    try:
        return check_rate(d.get("rate"), f"rate of site {name}")
    except InvalidValueError as exc:
        raise ManifestError(f"manifest: {exc}") from exc
