"""``inject``, ``retune``, ``strip`` and ``inspect``: sites + schedule -> changes -> report."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from dpatch.droppath import MODES, SCALINGS, DropPath
from dpatch.errors import InvalidValueError, NoResidualSitesError, TraceError
from dpatch.rewrite import block_meta, rewrite_block, unpatch_block
from dpatch.schedule import SCHEDULES, expected_depth, schedule_rates
from dpatch.sites import (
    Analysis,
    BlockSites,
    Site,
    analyze,
    default_example_input,
    probe,
    qualify,
    run_graph_meta,
)

__all__ = ["PatchReport", "Skipped", "inject", "inspect", "retune", "strip"]

PER: tuple[str, ...] = ("block", "branch")


@dataclass(frozen=True)
class Skipped:
    """A part of the model dpatch could not handle, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class PatchReport:
    """What ``inject``/``retune``/``inspect`` found and did.

    Attributes:
        sites: every residual site after the operation, in forward order.
        skipped: blocks (or features such as skipping) that could not be applied, with why.
        changed: names (``Site.name``) of sites whose settings the operation changed.
        schedule: the schedule kind used (``"current"`` for ``inspect``).
        per: ``"block"`` or ``"branch"``: what one schedule step covers.
        rates: the rate of each schedule step.
        expected_depth: ``sum(1 - p)`` over the steps (Huang et al. 2016).
        model: the patched model (a copy when ``inplace=False``).
    """

    sites: tuple[Site, ...]
    skipped: tuple[Skipped, ...] = ()
    changed: tuple[str, ...] = ()
    schedule: str = "current"
    per: str = "block"
    max_rate: float = 0.0
    min_rate: float = 0.0
    mode: str = "row"
    scaling: str = "inverted"
    skip: bool = False
    rates: tuple[float, ...] = ()
    expected_depth: float = 0.0
    model: nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def depth(self) -> int:
        """Number of schedule steps (blocks, or branches with ``per="branch"``)."""
        return len(self.rates)

    @property
    def blocks(self) -> int:
        """Number of distinct blocks that own a site."""
        return len({s.block for s in self.sites})

    @property
    def mean_rate(self) -> float:
        """Mean drop rate over sites (0 for a model without sites)."""
        return sum(s.rate for s in self.sites) / len(self.sites) if self.sites else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, for ``--json`` output and manifests."""
        return {
            "schedule": self.schedule,
            "per": self.per,
            "max_rate": self.max_rate,
            "min_rate": self.min_rate,
            "mode": self.mode,
            "scaling": self.scaling,
            "skip": self.skip,
            "summary": {
                "sites": len(self.sites),
                "blocks": self.blocks,
                "depth": self.depth,
                "expected_depth": round(self.expected_depth, 6),
                "mean_rate": round(self.mean_rate, 6),
            },
            "rates": list(self.rates),
            "sites": [s.to_dict() for s in self.sites],
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "changed": list(self.changed),
        }


def _check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return str(value)


def inspect(model: nn.Module, example_inputs: Sequence[Any] | None = None) -> PatchReport:
    """List every residual site of ``model`` with its current rate. Read-only."""
    an = analyze(model, example_inputs)
    sites = tuple(an.sites())
    steps = _block_rates(sites)
    return PatchReport(
        sites=sites,
        skipped=_skipped(an),
        schedule="current",
        rates=tuple(steps),
        max_rate=max((s.rate for s in sites), default=0.0),
        min_rate=min((s.rate for s in sites), default=0.0),
        mode=sites[0].mode if sites else "row",
        scaling=sites[0].scaling if sites else "inverted",
        skip=any(s.skip for s in sites),
        expected_depth=expected_depth(steps),
        model=model,
    )


def _block_rates(sites: Sequence[Site]) -> list[float]:
    by_block: dict[int, list[float]] = {}
    for s in sites:
        by_block.setdefault(s.block, []).append(s.rate)
    return [sum(r) / len(r) for _, r in sorted(by_block.items())]


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
    return _apply(
        model,
        max_rate=max_rate,
        schedule=schedule,
        min_rate=min_rate,
        rates=rates,
        mode=mode,
        scaling=scaling,
        per=per,
        inplace=inplace,
        skip=skip,
        seed=seed,
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
    mode: str = "row",
    scaling: str = "inverted",
    per: str = "block",
    inplace: bool = True,
    *,
    skip: bool = False,
    seed: int = 0,
    example_inputs: Sequence[Any] | None = None,
) -> PatchReport:
    """Change the rates of a model that already has slots (native or from ``inject``).

    Same arguments as :func:`inject`. Raises ``NoResidualSitesError`` when the model has
    no slot at all (use ``inject`` to add them).
    """
    return _apply(
        model,
        max_rate=max_rate,
        schedule=schedule,
        min_rate=min_rate,
        rates=rates,
        mode=mode,
        scaling=scaling,
        per=per,
        inplace=inplace,
        skip=skip,
        seed=seed,
        example_inputs=example_inputs,
        allow_empty=False,
        slots_only=True,
    )


def _validate(
    max_rate: float, min_rate: float, schedule: str, mode: str, scaling: str, per: str
) -> None:
    _check_choice(schedule, "schedule", (*SCHEDULES, "native"))
    _check_choice(mode, "mode", MODES)
    _check_choice(scaling, "scaling", SCALINGS)
    _check_choice(per, "per", PER)
    # Rates are checked before any work is done (custom rates: once the depth is known).
    if schedule == "custom":
        return
    if schedule == "native" and min_rate:
        raise InvalidValueError(
            f"min_rate={min_rate!r} has no meaning for schedule 'native' (the library's own "
            "rule sets every rate); leave it at 0"
        )
    schedule_rates("uniform" if schedule == "native" else schedule, 1, max_rate, min_rate)


def _apply(
    model: nn.Module,
    *,
    max_rate: float,
    schedule: str,
    min_rate: float,
    rates: Sequence[float] | None,
    mode: str,
    scaling: str,
    per: str,
    inplace: bool,
    skip: bool,
    seed: int,
    example_inputs: Sequence[Any] | None,
    allow_empty: bool,
    slots_only: bool,
) -> PatchReport:
    _validate(max_rate, min_rate, schedule, mode, scaling, per)
    if not inplace:
        model = copy.deepcopy(model)
    if skip:
        _unpatch_without_skip(model)

    an = analyze(model, example_inputs)
    before = {s.name: s for s in an.sites()}
    if slots_only and not any(s.kind == "native" or s.fused for s in before.values()):
        raise NoResidualSitesError(
            "the model has no DropPath slot to retune; use inject to add stochastic depth"
        )
    if not before and not allow_empty:
        raise NoResidualSitesError(
            "the model has no residual branch to put stochastic depth on"
            + (f" (probe: {an.probe_error})" if an.probe_error else "")
        )
    sites = list(before.values())

    # Rates per schedule step, then per site.
    if per == "block":
        step_of = {s.name: s.block for s in sites}
        depth = len({s.block for s in sites})
    else:
        step_of = {s.name: i for i, s in enumerate(sites)}
        depth = len(sites)
    if schedule == "native":
        from dpatch.zoo import native_rates

        by_slot = native_rates(model, max_rate)
        site_rate = {s.name: by_slot.get(s.origin or s.slot, 0.0) for s in sites}
        steps = [0.0] * depth
        for s in sites:
            steps[step_of[s.name]] = max(steps[step_of[s.name]], site_rate[s.name])
    else:
        steps = schedule_rates(schedule, depth, max_rate, min_rate, rates)
        site_rate = {s.name: steps[step_of[s.name]] for s in sites}

    skipped = list(_skipped(an))
    settings = {s.name: (site_rate[s.name], mode, scaling, seed + i) for i, s in enumerate(sites)}
    skip_inputs = _second_probe(model, an) if skip else None
    class_cache: dict[Any, Any] = {}
    for b in an.blocks:
        skipped += _apply_block(b, settings, skip, skip_inputs, class_cache, an)
    site_of_slot = {s.slot: s.name for s in sites}
    for loose in an.loose:
        rate, m, sc, sd = settings[site_of_slot[loose.slot_path]]
        _set_slot(model, loose.slot_path, rate, m, sc, sd, skip=False)
        if skip:
            skipped.append(Skipped(loose.slot_path, "skip needs a traced block; this slot masks"))

    after = tuple(an.sites())
    changed = tuple(
        s.name for s in after if s.name not in before or _settings(before[s.name]) != _settings(s)
    )
    return PatchReport(
        sites=after,
        skipped=tuple(skipped),
        changed=changed,
        schedule=schedule,
        per=per,
        max_rate=float(max_rate),
        min_rate=float(min_rate),
        mode=mode,
        scaling=scaling,
        skip=skip,
        rates=tuple(steps),
        expected_depth=expected_depth(steps),
        model=model,
    )


def _settings(s: Site) -> tuple[Any, ...]:
    return (s.rate, s.mode, s.scaling, s.skip, s.fused)


def _unpatch_without_skip(model: nn.Module) -> None:
    """Blocks rewritten without the skipping form are restored so they can be redone."""
    for mod in model.modules():
        meta = block_meta(mod)
        if (
            meta is not None
            and not any(meta.skippable)
            and any(r == "skip not requested" for r in meta.skip_reasons)
        ):
            unpatch_block(mod)


def _second_probe(model: nn.Module, an: Analysis) -> dict[int, Any]:
    """Block inputs at batch 3, to tell batched tensors from shared ones (skip planning)."""
    if an.example_inputs:
        inputs = tuple(_grow_batch(v) for v in an.example_inputs)
    else:
        inputs = (default_example_input(model, batch=3),)
    return probe(model, inputs).inputs


def _grow_batch(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return torch.empty((value.shape[0] + 1, *value.shape[1:]), dtype=value.dtype, device="meta")
    return value


def _make_slot(rate: float, mode: str, scaling: str, seed: int, skip: bool) -> DropPath:
    return DropPath(
        rate, mode=mode, scaling=scaling, skip=skip, seed=seed if mode == "batch" else None
    )


def _configure(dp: DropPath, rate: float, mode: str, scaling: str, seed: int, skip: bool) -> None:
    dp.drop_prob = rate
    dp.mode = mode
    dp.scaling = scaling
    dp.skip = skip
    new_seed = seed if mode == "batch" else None
    if new_seed != dp.seed:
        dp.seed = new_seed
        dp._generator = None


def _set_slot(
    model: nn.Module, path: str, rate: float, mode: str, scaling: str, seed: int, *, skip: bool
) -> None:
    """Give a slot module (replacing a timm/torchvision/Identity slot) these settings."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)  # "" is the model itself
    current = getattr(parent, attr)
    if isinstance(current, DropPath):
        _configure(current, rate, mode, scaling, seed, skip)
        return
    dp = _make_slot(rate, mode, scaling, seed, skip)
    dp.train(parent.training if current is None else current.training)
    object.__setattr__(dp, "_dpatch_original", current)
    if current is None:
        del parent.__dict__[attr]  # timm's ``drop_path = None``
    setattr(parent, attr, dp)


def _apply_block(
    b: BlockSites,
    settings: dict[str, tuple[float, str, str, int]],
    skip: bool,
    skip_inputs: dict[int, Any] | None,
    class_cache: dict[Any, Any],
    an: Analysis,
) -> list[Skipped]:
    """Rewrite (or update) one block; fall back to slot replacement when it cannot be."""
    mod = b.module
    names = [qualify(b.path, a) for a in b.slot_attrs]
    meta = block_meta(mod)
    notes: list[Skipped] = []
    if meta is not None:  # rewritten earlier: only settings change
        for attr, name, can in zip(meta.slot_attrs, names, meta.skippable, strict=True):
            rate, m, sc, sd = settings[name]
            _configure(getattr(mod, attr), rate, m, sc, sd, skip and can)
        if skip:
            notes += [
                Skipped(n, f"skip unavailable: {r}")
                for n, can, r in zip(names, meta.skippable, meta.skip_reasons, strict=True)
                if not can
            ]
        return notes

    slots: dict[str, DropPath] = {}
    for attr, name in zip(b.slot_attrs, names, strict=True):
        rate, m, sc, sd = settings[name]
        existing = mod._modules.get(attr)
        dp = existing if isinstance(existing, DropPath) else _make_slot(rate, m, sc, sd, False)
        _configure(dp, rate, m, sc, sd, False)
        dp.train(mod.training)
        slots[attr] = dp
    env_alt = None
    if skip and skip_inputs is not None and id(mod) in skip_inputs and b.graph is not None:
        args, kwargs = skip_inputs[id(mod)]
        try:
            env_alt = run_graph_meta(mod, b.graph, args, kwargs)
        except Exception:
            env_alt = None
    try:
        new_meta = rewrite_block(
            b,
            slots,
            skip=skip,
            env_alt=env_alt,
            class_cache=class_cache,
            validate_inputs=_recorded_inputs(an, mod),
        )
    except (TraceError, fx.proxy.TraceError, RuntimeError, TypeError, ValueError) as exc:
        return _fallback(b, names, settings, str(exc), skip)
    for attr, can, reason, name in zip(
        new_meta.slot_attrs, new_meta.skippable, new_meta.skip_reasons, names, strict=True
    ):
        slots[attr].skip = skip and can
        if skip and not can:
            notes.append(Skipped(name, f"skip unavailable: {reason}"))
    return notes


def _recorded_inputs(an: Analysis, mod: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    return an.inputs.get(id(mod))


def _fallback(
    b: BlockSites,
    names: list[str],
    settings: dict[str, tuple[float, str, str, int]],
    why: str,
    skip: bool,
) -> list[Skipped]:
    """A block that cannot be rewritten keeps its forward: native slots are swapped in place
    (unfused), graph sites are reported as skipped."""
    notes: list[Skipped] = []
    mod = b.module
    for attr, kind, origin, name in zip(b.slot_attrs, b.kinds, b.origins, names, strict=True):
        if kind == "native" and attr != origin:  # second use of a shared slot
            notes.append(Skipped(name, f"shares {origin} (block could not be rewritten: {why})"))
            continue
        if kind != "native" or (attr not in mod._modules and mod.__dict__.get(attr, 0) is not None):
            notes.append(Skipped(name, f"not patched: {why}"))
            continue
        rate, m, sc, sd = settings[name]
        _set_slot(mod, attr, rate, m, sc, sd, skip=False)  # also fills a ``None`` slot
        notes.append(Skipped(name, f"unfused (block could not be rewritten: {why})"))
    if skip:
        notes += [Skipped(n, "skip needs a rewritten block; this site masks") for n in names]
    return notes


def strip(model: nn.Module) -> int:
    """Undo dpatch: rewritten blocks get their original class and slots back, replaced slot
    modules their original module. Returns the number of modules restored."""
    restored = 0
    for mod in list(model.modules()):
        if block_meta(mod) is not None:
            unpatch_block(mod)
            restored += 1
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if isinstance(child, DropPath) and "_dpatch_original" in child.__dict__:
                original = child.__dict__["_dpatch_original"]
                del parent._modules[attr]
                if original is None:
                    object.__setattr__(parent, attr, None)
                else:
                    setattr(parent, attr, original)
                restored += 1
    return restored


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
    from dpatch.errors import ManifestError

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
            _configure(
                dp,
                _rate_of(d, name),
                str(d.get("mode", "row")),
                str(d.get("scaling", "inverted")),
                seed + i,
                dp.skip and bool(d.get("skip", False)),
            )
            site = dataclasses.replace(
                site, rate=dp.drop_prob, mode=dp.mode, scaling=dp.scaling, skip=dp.skip
            )
        updated.append(site)
    steps = _block_rates(updated)
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
    from dpatch.errors import ManifestError
    from dpatch.schedule import check_rate

    try:
        return check_rate(d.get("rate"), f"rate of site {name}")
    except InvalidValueError as exc:
        raise ManifestError(f"manifest: {exc}") from exc
