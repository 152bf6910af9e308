"""``inject``, ``retune``, ``strip`` and ``inspect``: sites + schedule -> changes -> report."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from dpatch._apply import (
    apply_block,
    restore_slots,
    second_probe,
    set_slot,
    unpatch_without_skip,
)
from dpatch._listed import configure_sites, module_or_none
from dpatch._marks import block_meta
from dpatch._slots import SlotSettings
from dpatch.droppath import MODES, SCALINGS, DropPath
from dpatch.errors import InvalidValueError, NoResidualSitesError, NoSlotsError
from dpatch.results import Change, PatchReport, Skipped
from dpatch.rewrite import RewriteCache, unpatch_block
from dpatch.schedule import SCHEDULES, expected_depth, schedule_rates
from dpatch.sites import Analysis, Site, analyze

__all__ = [
    "PER",
    "SETTINGS",
    "PatchReport",
    "Skipped",
    "apply_sites",
    "check_arguments",
    "configure_sites",
    "inject",
    "inspect",
    "retune",
    "strip",
]

#: What one schedule step covers.
PER: tuple[str, ...] = ("block", "branch")

#: The per-site settings a patch sets and a report compares (``PatchReport.changes``).
SETTINGS: tuple[str, ...] = ("rate", "mode", "scaling", "skip", "fused")


def _check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return str(value)


def _empty_error(an: Analysis, what: str) -> NoResidualSitesError:
    return NoResidualSitesError(
        f"{what} has no residual branch to put stochastic depth on"
        + (f" (probe: {an.probe_error})" if an.probe_error else "")
    )


def inspect(
    model: nn.Module, example_inputs: Sequence[Any] | None = None, *, allow_empty: bool = True
) -> PatchReport:
    """List every residual site of ``model`` with its current rate. Read-only.

    Raises:
        NoResidualSitesError: no residual branch and ``allow_empty`` is False.
    """
    an = analyze(model, example_inputs)
    sites = an.sites()
    if not sites and not allow_empty:
        raise _empty_error(an, "the model")
    return PatchReport.current(sites, _skipped(an), model=model)


def _skipped(an: Analysis) -> tuple[Skipped, ...]:
    out = [Skipped(p, r) for p, r in an.skipped]
    if an.ignored_graph_sites:
        out.append(
            Skipped(
                "",
                f"{an.ignored_graph_sites} residual addition(s) without a slot left alone: "
                "the model has native DropPath slots, which define its sites",
            )
        )
    return tuple(out)


def inject(
    model: nn.Module,
    max_rate: float = 0.1,
    schedule: str = "linear",
    min_rate: float = 0.0,
    rates: Sequence[float] | None = None,
    mode: str = "row",
    scaling: str = "inverted",
    per: str = "block",
    inplace: bool = True,
    *,
    skip: bool = False,
    seed: int = 0,
    example_inputs: Sequence[Any] | None = None,
    allow_empty: bool = True,
) -> PatchReport:
    """Put stochastic depth on every residual branch of ``model`` with a per-layer schedule.

    Idempotent: injecting into an injected model equals injecting once.

    Args:
        model: any ``nn.Module`` (timm, torchvision, or your own).
        max_rate: rate of the deepest block (every block for ``uniform``).
        schedule: ``linear``, ``uniform``, ``huang``, ``efficientnet``, ``cosine``,
            ``custom`` (with ``rates``) or ``native`` (the model library's own rule).
        min_rate: rate of the first block for ``linear``/``cosine``.
        rates: per-step rates for ``custom``.
        mode: ``row`` (per sample) or ``batch`` (whole batch).
        scaling: ``inverted``, ``expected`` or ``none``.
        per: ``block`` (branches of a block share a step, timm's rule) or ``branch``.
        inplace: patch ``model`` itself; else a deep copy (``report.model``).
        skip: compute dropped branches only where kept (training speed-up; see README).
        seed: base seed of the host generators batch mode draws from (one per site), so
            all DDP ranks drop the same blocks.
        example_inputs: inputs for the meta-device probe (default: an image batch).
        allow_empty: return an empty report instead of raising when there is no site.

    Raises:
        InvalidValueError: a bad rate, schedule, mode, scaling or ``per``.
        NoResidualSitesError: no residual branch and ``allow_empty`` is False.
    """
    return _patch(
        model,
        _Request(max_rate, schedule, min_rate, rates, mode, scaling, per, skip, seed),
        inplace=inplace,
        example_inputs=example_inputs,
        allow_empty=allow_empty,
        slots_only=False,
    )


def retune(
    model: nn.Module,
    max_rate: float = 0.1,
    schedule: str = "linear",
    min_rate: float = 0.0,
    rates: Sequence[float] | None = None,
    mode: str | None = None,
    scaling: str | None = None,
    per: str = "block",
    inplace: bool = True,
    *,
    skip: bool | None = None,
    seed: int | None = None,
    example_inputs: Sequence[Any] | None = None,
    allow_empty: bool = False,
    analysis: Analysis | None = None,
) -> PatchReport:
    """Change the rates of a model that already has slots (native or from ``inject``).

    Same arguments as :func:`inject`, but ``mode``, ``scaling``, ``skip`` and ``seed``
    default to None, which keeps each site's own setting: a retune changes the rates and
    what its arguments name, nothing else (``report.changes`` lists what changed).

    Args:
        analysis: :func:`dpatch.sites.analyze` of this same model from an earlier call
            (patching by dpatch and loading weights keep it valid): the model is not probed
            again, as for many checkpoints of one architecture (:mod:`dpatch.batch`).

    Raises:
        NoResidualSitesError: the model has no slot at all (use ``inject`` to add them);
            with ``allow_empty``, a model without any residual branch gets an empty report.
    """
    return _patch(
        model,
        _Request(max_rate, schedule, min_rate, rates, mode, scaling, per, skip, seed),
        inplace=inplace,
        example_inputs=example_inputs,
        allow_empty=allow_empty,
        slots_only=True,
        analysis=analysis,
    )


@dataclasses.dataclass(frozen=True)
class _Request:
    """What a patch asks for (the arguments of ``inject``/``retune``); None in ``mode``,
    ``scaling``, ``skip`` or ``seed`` keeps each site's own setting."""

    max_rate: float
    schedule: str
    min_rate: float
    rates: Sequence[float] | None
    mode: str | None
    scaling: str | None
    per: str
    skip: bool | None
    seed: int | None

    def validate(self) -> None:
        """Check every argument before any work is done (custom rates: once the depth is
        known)."""
        _check_choice(self.schedule, "schedule", (*SCHEDULES, "native"))
        if self.mode is not None:
            _check_choice(self.mode, "mode", MODES)
        if self.scaling is not None:
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
    max_rate: float = 0.1,
    schedule: str = "linear",
    min_rate: float = 0.0,
    mode: str = "row",
    scaling: str = "inverted",
    per: str = "block",
) -> None:
    """Raise :class:`InvalidValueError` for an argument ``inject``/``retune`` would reject,
    without a model (so a caller can fail before slow work)."""
    _Request(max_rate, schedule, min_rate, None, mode, scaling, per, False, 0).validate()


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
    rate = {s.name: by_slot.get(s.origin or s.slot, 0.0) for s in sites}
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
    analysis: Analysis | None = None,
) -> PatchReport:
    req.validate()
    if analysis is not None and (not inplace or analysis.model is not model):
        raise InvalidValueError(
            "analysis= must come from analyze() of this same model, patched in place (inplace=True)"
        )
    if not inplace:
        model = copy.deepcopy(model)
    if req.skip and unpatch_without_skip(model):
        analysis = None  # blocks went back to their classes: their traces are needed

    an = analysis if analysis is not None else analyze(model, example_inputs)
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
        s.name: SlotSettings(
            site_rate[s.name],
            s.mode if req.mode is None else req.mode,
            s.scaling if req.scaling is None else req.scaling,
            _seed(model, s, i) if req.seed is None else req.seed + i,
            s.skip if req.skip is None else req.skip,
        )
        for i, s in enumerate(sites)
    }

    skipped = list(_skipped(an))
    # New rewrites get the skipping form only when skip was asked for; blocks rewritten
    # earlier keep their form, and each site its own setting.
    rewrite_skip = bool(req.skip)
    skip_inputs = second_probe(model, an) if rewrite_skip else None
    cache = RewriteCache()
    for b in an.blocks:
        skipped += apply_block(b, settings, rewrite_skip, skip_inputs, cache, an)
    site_of_slot = {s.slot: s.name for s in sites}
    for loose in an.loose:
        wanted = settings[site_of_slot[loose.slot_path]]
        set_slot(model, loose.slot_path, dataclasses.replace(wanted, skip=False))
        if wanted.skip and req.skip is not None:
            skipped.append(Skipped(loose.slot_path, "skip needs a traced block; this slot masks"))

    after = tuple(an.sites())
    changes = tuple(
        Change(s.name, field, getattr(before[s.name], field), getattr(s, field))
        for s in after
        if s.name in before
        for field in SETTINGS
        if getattr(before[s.name], field) != getattr(s, field)
    )
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
        mode=req.mode if req.mode is not None else _common((s.mode for s in after), "row"),
        scaling=(
            req.scaling
            if req.scaling is not None
            else _common((s.scaling for s in after), "inverted")
        ),
        skip=req.skip if req.skip is not None else any(s.skip for s in after),
        rates=tuple(steps),
        expected_depth=expected_depth(steps),
        model=model,
        changes=changes,
    )


def _seed(model: nn.Module, site: Site, index: int) -> int:
    """The batch-mode seed a site's slot has now (what ``inject``'s default gives if none)."""
    slot = module_or_none(model, site.slot)
    seed = slot.seed if isinstance(slot, DropPath) else None
    return index if seed is None else int(seed)


def _common(values: Iterable[str], default: str) -> str:
    """The one value every site has, ``"mixed"``, or ``default`` when there is no site."""
    distinct = set(values)
    if not distinct:
        return default
    return distinct.pop() if len(distinct) == 1 else "mixed"


def _settings(s: Site) -> tuple[Any, ...]:
    return tuple(getattr(s, field) for field in SETTINGS)


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
    report = inject(
        model, 0.0, schedule="uniform", skip=skip, seed=seed, example_inputs=example_inputs
    )
    return configure_sites(model, report, sites, seed=seed)
