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
from dpatch._request import DEFAULTS, Request, check_arguments, site_rates
from dpatch._slots import SlotSettings
from dpatch.droppath import DropPath
from dpatch.errors import InvalidValueError, ManifestError, NoResidualSitesError, NoSlotsError
from dpatch.results import PatchReport, Skipped, block_rates
from dpatch.rewrite import RewriteCache, unpatch_block
from dpatch.schedule import PER, check_rate, expected_depth
from dpatch.sites import Analysis, Site, analyze, qualify, site_list

__all__ = [
    "DEFAULTS",
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
    sites = site_list(an)
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
    req = Request.of(
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
    req = Request.of(
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


def _patch(
    model: nn.Module,
    req: Request,
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
    before = {s.name: s for s in site_list(an)}
    if not before and not allow_empty:
        raise _empty_error(an, "the model")
    if before and slots_only and not any(s.kind == "native" or s.fused for s in before.values()):
        raise NoSlotsError(
            "the model has no DropPath slot to retune; use inject to add stochastic depth"
        )
    sites = list(before.values())
    site_rate, steps = site_rates(model, req, sites)
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

    after = tuple(site_list(an))
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
        return check_rate(d.get("rate"), f"rate of site {name}", allow_one=True)
    except InvalidValueError as exc:
        raise ManifestError(f"manifest: {exc}") from exc
