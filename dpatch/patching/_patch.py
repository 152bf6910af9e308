"""``inject``, ``retune``, ``strip`` and ``inspect``: sites + schedule -> changes -> report."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from dpatch.analysis import Analysis, Site, SlotSettings, analyze, qualify, site_list
from dpatch.errors import (
    DPatchError,
    InvalidValueError,
    NoResidualSitesError,
    NoSlotsError,
    UnanalysedError,
)
from dpatch.marks import ScheduleMark, block_meta, schedule_mark, set_schedule_mark
from dpatch.models import paused_layerdrop, restore_layerdrop
from dpatch.patching._apply import (
    apply_block,
    attach_rank_check,
    restore_slots,
    second_probe,
    set_slot,
    unpatch_to_redo,
)
from dpatch.patching._keep import SETTINGS, changes, common, current_seed
from dpatch.patching._layerdrop import (
    check_layerdrop,
    layerdrop_state,
    set_layerdrop_rates,
    turn_off_layerdrop,
)
from dpatch.patching._listed import configure_sites
from dpatch.patching._resolve import Request, resolve, site_rates
from dpatch.patching._results import PatchReport, Skipped, block_rates
from dpatch.patching._tie import tie_blocks, tied, untie
from dpatch.rewrite import RewriteCache, unpatch_block
from dpatch.schedule import expected_depth
from dpatch.settings import KEPT, Settings, check_choice

__all__ = ["STRIP_PRUNED", "apply_sites", "inject", "inspect", "retune", "strip"]


def _empty_error(an: Analysis, what: str) -> DPatchError:
    """ "No residual branch" only when every block that ran was analysed; else an error
    naming the blocks that could not be analysed."""
    ran_on = f"{an.example.describe()} [{an.example.source}]"
    if an.unanalysed:
        shown = "; ".join(f"{p or '(root)'}: {why}" for p, why in an.unanalysed[:3])
        more = f"; and {len(an.unanalysed) - 3} more" if len(an.unanalysed) > 3 else ""
        return UnanalysedError(
            f"{what} ran on {ran_on}, but {len(an.unanalysed)} of its blocks could not be "
            f"analysed, so its residual branches are unknown ({shown}{more}); a forward "
            "that branches on tensor values or that tracing cannot follow stays "
            "unanalysed: give inputs that take a traceable path (example_inputs=, "
            "--input-shape), or move the residual addition into a module of its own"
        )
    return NoResidualSitesError(
        f"{what} has no residual branch to put stochastic depth on (it ran on {ran_on})"
    )


def _analyze(model: nn.Module, example_inputs: Sequence[Any] | None, coverage: str) -> Analysis:
    """:func:`analyze` with the model's own LayerDrop paused: a model in training mode
    would skip layers at random in the probe, and those would go unanalysed."""
    with paused_layerdrop(model):
        return analyze(model, example_inputs, coverage)


def inspect(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    allow_empty: bool = True,
    coverage: str = "slots",
) -> PatchReport:
    """List every residual site of ``model`` with its current rate, and the model's own
    LayerDrop (``report.layerdrop``). Read-only.

    Raises:
        ProbeError: the model runs on no input; pass ``example_inputs``.
        NoResidualSitesError: no residual branch and ``allow_empty`` is False.
        UnanalysedError: no residual site found, and blocks that ran could not be
            analysed (whatever ``allow_empty`` says: "none" would be a guess).
    """
    an = _analyze(model, example_inputs, coverage)
    sites = site_list(an)
    if not sites and (an.unanalysed or not allow_empty):
        raise _empty_error(an, "the model")
    return PatchReport.current(
        sites,
        _skipped(an),
        model=model,
        example=an.example,
        unreached=an.unreached,
        **layerdrop_state(model),
    )


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
    tie: str | None = None,
    example_inputs: Sequence[Any] | None = None,
    allow_empty: bool = True,
    recipe: str | None = None,
    size: str | None = None,
    coverage: str = "slots",
    settings: Settings | None = None,
    keep_layerdrop: bool = False,
) -> PatchReport:
    """Put stochastic depth on every residual branch of ``model`` with a per-layer schedule.

    Idempotent: injecting into an injected model equals injecting once. An argument left at
    None takes the recipe's value, else its default (``dpatch.patching.DEFAULTS``).

    Args:
        model: any ``nn.Module`` (timm, torchvision, transformers, or your own).
        max_rate: rate of the deepest block (every block for ``uniform``); default 0.1.
        schedule: ``linear`` (default), ``uniform``, ``huang``, ``efficientnet``,
            ``cosine``, ``exponential`` (LayerSkip), ``custom`` (with ``rates``) or
            ``native`` (the model library's own rule).
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
        tie: ``"branch"`` (default: each branch its own decision, timm's rule) or
            ``"block"`` (one decision per sample, or per batch in batch mode, for every
            branch of a block, as LayerDrop and LayerSkip drop a layer; with ``skip``, the
            whole layer runs on the kept rows only; needs ``per="block"``).
        example_inputs: inputs for the meta-device probe (default: inferred).
        allow_empty: return an empty report instead of raising when the model ran and has
            no residual branch.
        recipe: a published recipe (``dpatch.recipes``) that sets the arguments left at
            None; its time schedule is reported for ``DropPathScheduler``.
        size: the model size for a recipe whose rate depends on it (default: read from
            the model).
        coverage: ``"slots"`` (default: when the model has native slots, they alone are
            its sites) or ``"all"`` (those plus every residual addition without a slot).
        keep_layerdrop: keep the model's own LayerDrop (``config.layerdrop``, ...) on
            layers that get sites; by default it is turned off there, with a note
            (``report.layerdrop_changes``), so rates never double; ``strip`` turns it back
            on.

    Raises:
        InvalidValueError: a bad rate, schedule, mode, scaling, ``per`` or recipe.
        ProbeError: the model runs on no input; pass ``example_inputs``.
        NoResidualSitesError: no residual branch and ``allow_empty`` is False.
        UnanalysedError: no residual site found, and blocks that ran could not be
            analysed (whatever ``allow_empty`` says: "none" would be a guess).
    """
    req = resolve(_given(settings, locals()), model, recipe, size, example_inputs)
    report = _patch(
        model,
        req,
        inplace=inplace,
        example_inputs=example_inputs,
        allow_empty=allow_empty,
        slots_only=False,
        coverage=coverage,
    )
    return turn_off_layerdrop(report, keep=keep_layerdrop)


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
    tie: str | None = None,
    example_inputs: Sequence[Any] | None = None,
    allow_empty: bool = False,
    recipe: str | None = None,
    size: str | None = None,
    coverage: str = "slots",
    analysis: Analysis | None = None,
    settings: Settings | None = None,
    layerdrop: float | None = None,
) -> PatchReport:
    """Change the rates of a model that already has slots (native or from ``inject``), or
    of its own LayerDrop.

    Same arguments as :func:`inject`, but ``mode``, ``scaling``, ``skip`` and ``seed`` left
    at None (and not set by the recipe) keep each site's own setting: a retune changes the
    rates and what its arguments name, nothing else (``report.changes`` lists what changed).

    Args:
        analysis: :func:`dpatch.analysis.analyze` of this same model from an earlier call
            (patching by dpatch and loading weights keep it valid): the model is not probed
            again, as for many checkpoints of one architecture (:mod:`dpatch.files`).
        layerdrop: the rate of the model's own LayerDrop (every layer list its code drops
            layers of: ``config.layerdrop``, ``encoder_layerdrop``, ... and the copy its
            forward reads); ``report.layerdrop_changes`` says what changed. Given alone, a
            model without DropPath slots is fine.

    Raises:
        NoSlotsError: the model has no slot at all (use ``inject`` to add them), and more
            than ``layerdrop`` was asked for.
        NoResidualSitesError: no residual branch at all, unless ``allow_empty``.
        InvalidValueError: ``layerdrop`` outside [0, 1), or given for a model without
            LayerDrop of its own.
    """
    given = _given(settings, locals())
    rate = None if layerdrop is None else check_layerdrop(model, layerdrop)
    kept = schedule_mark(model)
    req = resolve(given, model, recipe, size, example_inputs, keep=KEPT, kept=kept)
    report = _patch(
        model,
        req,
        inplace=inplace,
        example_inputs=example_inputs,
        allow_empty=allow_empty,
        slots_only=True,
        coverage=coverage,
        analysis=analysis,
        slotless_ok=rate is not None and not given.given() and recipe is None,
    )
    return report if rate is None else set_layerdrop_rates(report, rate)


def _given(settings: Settings | None, args: Mapping[str, Any]) -> Settings:
    """``settings=``, or the settings given as keyword arguments (not both)."""
    given = Settings.of(args)
    if settings is None:
        return given
    if given.given():
        raise InvalidValueError(f"pass settings= or {', '.join(given.given())}=, not both")
    return settings


def _patch(
    model: nn.Module,
    req: Request,
    *,
    inplace: bool,
    example_inputs: Sequence[Any] | None,
    allow_empty: bool,
    slots_only: bool,
    coverage: str,
    analysis: Analysis | None = None,
    slotless_ok: bool = False,
) -> PatchReport:
    """Patch (or retune: ``slots_only``) ``model``'s sites as ``req`` asks; ``slotless_ok``:
    a retune of a model without slots changes nothing and reports the sites as they are."""
    if analysis is not None and (not inplace or analysis.model is not model):
        raise InvalidValueError(
            "analysis= must come from analyze() of this same model, patched in place (inplace=True)"
        )
    if not inplace:
        model = copy.deepcopy(model)
    want = req.settings
    if unpatch_to_redo(model, skip=bool(want.skip), coverage=coverage):
        analysis = None  # blocks went back to their classes: their traces are needed

    an = analysis if analysis is not None else _analyze(model, example_inputs, coverage)
    before = {s.name: s for s in site_list(an)}
    slotless = slots_only and not any(s.kind == "native" or s.fused for s in before.values())
    if slotless_ok and slotless:
        return PatchReport.current(
            list(before.values()),
            _skipped(an),
            model=model,
            example=an.example,
            unreached=an.unreached,
            **layerdrop_state(model),
        )
    if not before and (an.unanalysed or not allow_empty):
        raise _empty_error(an, "the model")
    if before and slotless:
        raise NoSlotsError(
            "the model has no DropPath slot to retune; use inject to add stochastic depth"
        )
    sites = list(before.values())
    site_rate, steps = site_rates(model, req, sites)
    per_site = {
        s.name: SlotSettings(
            site_rate[s.name],
            s.mode if want.mode is None else want.mode,
            s.scaling if want.scaling is None else want.scaling,
            current_seed(model, s, i) if want.seed is None else want.seed + i,
            s.skip if want.skip is None else want.skip,
        )
        for i, s in enumerate(sites)
    }

    skipped = list(_skipped(an))
    # New rewrites get the skipping form only when skip was asked for; blocks rewritten
    # earlier keep their form, and each site its own setting.
    rewrite_skip = bool(want.skip)
    earlier = tied(model)
    tie = want.tie if want.tie is not None else ("block" if earlier is not None else None)
    tie_skip = bool(want.skip) if want.skip is not None else bool(earlier and earlier.skip)
    probe_rows = rewrite_skip or (tie == "block" and tie_skip)
    skip_inputs = second_probe(model, an) if probe_rows else None
    if isinstance(skip_inputs, str):
        skipped += [
            Skipped(n, f"skip unavailable: {skip_inputs}") for n, s in per_site.items() if s.skip
        ]
        per_site = {n: dataclasses.replace(s, skip=False) for n, s in per_site.items()}
        rewrite_skip, skip_inputs = False, None
    cache = RewriteCache()
    for b in an.blocks:
        skipped += apply_block(b, per_site, rewrite_skip, skip_inputs, cache, an)
    site_of_slot = {s.slot: s.name for s in sites}
    for loose in an.loose:
        wanted = per_site[site_of_slot[loose.slot_path]]
        set_slot(model, loose.slot_path, dataclasses.replace(wanted, skip=False))
        if wanted.skip and want.skip is not None:
            why = (
                "skip needs a traced block; this slot masks"
                if loose.residual
                else "not on a residual addition (it drops the whole value it is given); masks"
            )
            skipped.append(Skipped(loose.slot_path, why))

    if tie == "block" or earlier is not None:
        notes, whole = tie_blocks(
            model, an, site_list(an), skip=tie_skip, skip_inputs=skip_inputs, block=tie == "block"
        )
        # a tied block that skips as a whole: its branches' own "skip unavailable" is moot
        skipped = [s for s in skipped if s.path not in whole] + notes
    after = tuple(site_list(an))
    attach_rank_check(model, after)
    previous = schedule_mark(model)
    rates = req.settings.rates if req.schedule == "custom" and req.settings.rates else steps
    mark = ScheduleMark(req.schedule, req.per, req.max_rate, req.min_rate, tuple(rates))
    set_schedule_mark(model, mark)
    changed = tuple(
        s.name
        for s in after
        if s.name not in before or _site_settings(before[s.name]) != _site_settings(s)
    )
    return PatchReport(
        sites=after,
        skipped=tuple(skipped),
        changed=changed,
        schedule=req.schedule,
        per=req.per,
        max_rate=req.max_rate,
        min_rate=req.min_rate,
        mode=want.mode if want.mode is not None else common((s.mode for s in after), "row"),
        scaling=(
            want.scaling
            if want.scaling is not None
            else common((s.scaling for s in after), "inverted")
        ),
        skip=want.skip if want.skip is not None else any(s.skip for s in after),
        rates=tuple(steps),
        expected_depth=_expected_depth(after, steps),
        model=model,
        example=an.example,
        recipe=req.recipe,
        changes=changes(before, after),
        unreached=an.unreached,
        previous=previous.describe() if previous is not None else "",
        **layerdrop_state(model),
    )


def _expected_depth(sites: Sequence[Site], steps: Sequence[float]) -> float:
    """``sum(1 - p)`` over the steps; a pruned site never runs, so it counts as depth 0."""
    if any(s.pruned for s in sites):
        return expected_depth(block_rates(sites))
    return expected_depth(steps)


def _site_settings(s: Site) -> tuple[Any, ...]:
    return tuple(getattr(s, field) for field in SETTINGS)


#: What :func:`strip` does with a block whose branches were pruned.
STRIP_PRUNED: tuple[str, ...] = ("error", "keep", "restore")


def strip(model: nn.Module, *, pruned: str = "error") -> int:
    """Undo dpatch: rewritten blocks get their original class and slots back, replaced slot
    modules their original module, and a LayerDrop ``inject`` turned off its rate. Returns
    the number of modules restored.

    Args:
        pruned: a block with pruned branches: ``"error"`` (raise, naming them: stripping
            would run those branches again, and a pruned file left their weights out),
            ``"keep"`` (leave such blocks as they are), or ``"restore"`` (bring the
            branches back, with whatever weights they hold).

    Raises:
        InvalidValueError: pruned blocks and ``pruned="error"``, or an unknown choice.
    """
    check_choice(pruned, "pruned", STRIP_PRUNED)
    blocks = [(n, m, block_meta(m)) for n, m in model.named_modules() if block_meta(m)]
    with_pruned = [qualify(n, a) for n, _, meta in blocks if meta for a in meta.pruned]
    if with_pruned and pruned == "error":
        raise InvalidValueError(
            f"the model has pruned branches ({', '.join(with_pruned[:3])}"
            f"{', ...' if len(with_pruned) > 3 else ''}); strip would run them again, with "
            "weights a pruned file does not hold: pass pruned='keep' to leave those blocks "
            "pruned, or pruned='restore'"
        )
    untie(model)
    restored = 0
    for _, mod, meta in blocks:
        if meta is not None and meta.pruned and pruned == "keep":
            continue
        unpatch_block(mod)
        restored += 1
    if not any(block_meta(m) for m in model.modules()):
        set_schedule_mark(model, None)  # nothing of the patch is left to label
    return restored + restore_slots(model) + restore_layerdrop(model)


def apply_sites(
    model: nn.Module,
    sites: Sequence[Mapping[str, Any]],
    *,
    skip: bool = False,
    seed: int = 0,
    example_inputs: Sequence[Any] | None = None,
    schedule: ScheduleMark | None = None,
) -> PatchReport:
    """Patch ``model`` so each site has exactly the settings listed (a manifest's ``sites``;
    ``schedule``: the manifest's schedule, which the model then carries).

    Raises:
        ManifestError: a listed site does not exist in the model, or the model has sites
            the list does not mention.
    """
    tie = "block" if any(d.get("tie") == "block" for d in sites) else "branch"
    # The model's own LayerDrop is the manifest's to set (dpatch.load), not inject's.
    report = inject(
        model, 0.0, schedule="uniform", skip=skip, seed=seed, example_inputs=example_inputs,
        tie=tie, keep_layerdrop=True,
    )  # fmt: skip
    return configure_sites(model, report, sites, seed=seed, schedule=schedule)
