"""Giving a patched model's sites the settings a list names (a manifest's ``sites``),
without probing the model again: what :func:`dpatch.patching.apply_sites` does after its
inject, and what many checkpoints of one architecture reuse (:mod:`dpatch.files`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from dpatch.analysis import Site, SlotSettings, qualify, slot_settings
from dpatch.droppath import DropPath
from dpatch.errors import InvalidValueError, ManifestError
from dpatch.marks import ScheduleMark, block_meta, set_schedule_mark
from dpatch.patching._apply import configure_slot
from dpatch.patching._results import PatchReport, block_rates
from dpatch.schedule import check_rate, expected_depth

__all__ = ["can_skip", "configure_sites", "module_or_none"]


def configure_sites(
    model: nn.Module,
    report: PatchReport,
    sites: Sequence[Mapping[str, Any]],
    *,
    seed: int = 0,
    schedule: ScheduleMark | None = None,
) -> PatchReport:
    """Give the sites of a model dpatch has patched (``report``: from :func:`inject` or
    :func:`apply_sites` on this model) exactly the listed settings, without probing the
    model again. Skipping is turned on only where the site's block has the skipping form.
    ``schedule``: the schedule the listed settings came from (a manifest's), which the
    model then carries (None: none, the rates are as listed).

    Raises:
        ManifestError: the listed sites and the report's differ.
    """
    wanted = {qualify(d["path"], d["branch"]): d for d in sites}
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
        dp = module_or_none(model, site.slot)
        if isinstance(dp, DropPath):
            configure_slot(
                dp,
                SlotSettings(
                    _rate_of(d, name),
                    str(d.get("mode", "row")),
                    str(d.get("scaling", "inverted")),
                    seed + i,
                    can_skip(model, site) and bool(d.get("skip", False)),
                ),
            )
            site = dataclasses.replace(
                site, rate=dp.drop_prob, mode=dp.mode, scaling=dp.scaling, skip=dp.skip
            )
        updated.append(site)
    steps = block_rates(updated)
    set_schedule_mark(model, schedule)
    labels: dict[str, Any] = {"schedule": "current"}
    if schedule is not None:
        labels = {"schedule": schedule.schedule, "per": schedule.per,
                  "max_rate": schedule.max_rate, "min_rate": schedule.min_rate}  # fmt: skip
    # The sites are known from the report: no second probe of the model.
    return dataclasses.replace(
        report,
        sites=tuple(updated),
        changed=(),
        changes=(),
        rates=tuple(steps),
        expected_depth=expected_depth(steps),
        skip=any(s.skip for s in updated),
        **labels,
    )


def disagreement(model: nn.Module, sites: Sequence[Site]) -> str:
    """'' when every listed site has the listed rate, mode, scaling and pruning in
    ``model``, else the first difference (a report from before a later ``retune``)."""
    for s in sites:
        owner = module_or_none(model, s.path)
        meta = block_meta(owner) if owner is not None else None
        pruned = meta is not None and any(p.attr == s.branch and p.pruned for p in meta.sites)
        if pruned != s.pruned:
            return f"{s.name} is {'' if pruned else 'not '}pruned in the model"
        if pruned:
            continue
        have = slot_settings(module_or_none(model, s.slot))
        for key, want, got in (
            ("rate", s.rate, have.rate),
            ("mode", s.mode, have.mode),
            ("scaling", s.scaling, have.scaling),
        ):
            if want != got:
                return f"{s.name}: {key} {want!r} in the report, {got!r} in the model"
    return ""


def module_or_none(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule at ``path``, or None where there is none (a graph site's slot before
    patching, timm's ``None`` slots)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def can_skip(model: nn.Module, site: Site) -> bool:
    """Whether the site's block was rewritten with the skipping form for this branch."""
    owner = module_or_none(model, site.path)
    meta = block_meta(owner) if owner is not None else None
    return meta is not None and any(p.attr == site.branch and p.skippable for p in meta.sites)


def _rate_of(d: Mapping[str, Any], name: str) -> float:
    try:
        return check_rate(d.get("rate"), f"rate of site {name}", allow_one=True)
    except InvalidValueError as exc:
        raise ManifestError(f"manifest: {exc}") from exc
