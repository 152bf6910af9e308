"""The record every patching operation returns: :class:`PatchReport`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dpatch.analysis import ExampleInputs, Site, Unreached
from dpatch.marks import schedule_mark
from dpatch.models import LayerDrop
from dpatch.schedule import expected_depth

__all__ = ["Change", "LayerDropChange", "PatchReport", "Skipped", "block_rates"]


@dataclass(frozen=True)
class Skipped:
    """A part of the model dpatch could not handle, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Change:
    """One setting of one site that an operation changed.

    Attributes:
        site: the site's name (``Site.name``).
        setting: ``rate``, ``mode``, ``scaling``, ``skip`` or ``fused``.
        before: its value before.
        after: its value after.
    """

    site: str
    setting: str
    before: Any
    after: Any


@dataclass(frozen=True)
class LayerDropChange:
    """A model's own LayerDrop rate that an operation changed.

    Attributes:
        layers: the layer list it drops layers of.
        attr: where its rate is set (``config.layerdrop``, ...; see ``LayerDrop.attr``).
        before: its rate before.
        after: its rate after.
    """

    layers: str
    attr: str
    before: float
    after: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "attr": self.attr,
            "before": self.before,
            "after": self.after,
        }


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
        changes: every setting the operation changed, site by site (``changed`` names
            the sites).
        example: the input the model was probed with, and where it came from.
        recipe: the published recipe the arguments came from (``ResolvedRecipe.to_dict``),
            with its time schedule for ``DropPathScheduler``.
        unreached: modules holding parameters that the probe's input never reached: their
            residual branches, if any, were not looked for (pass inputs that reach them).
        previous: the schedule the model had before this operation (``cosine (per
            branch)``; "" when it had none): ``retune`` keeps it unless told.
        layerdrop: the model's own LayerDrop (layer lists its code drops layers of in
            training), after the operation.
        layerdrop_changes: the LayerDrop rates the operation changed (``inject`` turns off
            LayerDrop on layers that carry its sites; ``retune(layerdrop=)``).
        notes: what a user should know besides the sites (LayerDrop turned off or set, a
            config's layerdrop that no forward reads).
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
    changes: tuple[Change, ...] = ()
    example: ExampleInputs | None = field(default=None, compare=False, repr=False)
    recipe: dict[str, Any] | None = field(default=None, compare=False)
    unreached: tuple[Unreached, ...] = ()
    previous: str = ""
    layerdrop: tuple[LayerDrop, ...] = ()
    layerdrop_changes: tuple[LayerDropChange, ...] = ()
    notes: tuple[str, ...] = ()

    @classmethod
    def current(
        cls,
        sites: Sequence[Site],
        skipped: Sequence[Skipped] = (),
        model: nn.Module | None = None,
        example: ExampleInputs | None = None,
        **extra: Any,
    ) -> PatchReport:
        """A report of the sites as they are: one step per block, its rate the mean of its
        sites' (a pruned site counts as always dropped: depth 0). Labelled with the
        schedule ``model`` was last patched with (a file's manifest, ``inject``, ``retune``),
        else ``"current"``."""
        steps = block_rates(sites)
        defaults: dict[str, Any] = {
            "max_rate": max((s.rate for s in sites), default=0.0),
            "min_rate": min((s.rate for s in sites), default=0.0),
            "mode": sites[0].mode if sites else "row",
            "scaling": sites[0].scaling if sites else "inverted",
            "skip": any(s.skip for s in sites),
            "schedule": "current",
        }
        mark = schedule_mark(model) if model is not None else None
        if mark is not None:
            defaults.update(
                schedule=mark.schedule, per=mark.per, max_rate=mark.max_rate, min_rate=mark.min_rate
            )
        return cls(
            sites=tuple(sites),
            skipped=tuple(skipped),
            rates=tuple(steps),
            expected_depth=expected_depth(steps),
            model=model,
            example=example,
            **{**defaults, **extra},
        )

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
            "changes": [
                {"site": c.site, "setting": c.setting, "before": c.before, "after": c.after}
                for c in self.changes
            ],
            "inputs": self.example.to_dict() if self.example is not None else None,
            "recipe": self.recipe,
            "unreached": [u.to_dict() for u in self.unreached],
            "previous": self.previous,
            "layerdrop": [r.to_dict() for r in self.layerdrop],
            "layerdrop_changes": [c.to_dict() for c in self.layerdrop_changes],
            "notes": list(self.notes),
        }

    def changed_settings(self) -> dict[str, int]:
        """How many sites each setting changed on, e.g. ``{"rate": 15}``."""
        counts: dict[str, int] = {}
        for c in self.changes:
            counts[c.setting] = counts.get(c.setting, 0) + 1
        return counts


def block_rates(sites: Sequence[Site]) -> list[float]:
    """One rate per block: the mean of its sites' rates, a pruned site counting as always
    dropped (rate 1: it adds nothing to the expected depth)."""
    by_block: dict[int, list[float]] = {}
    for s in sites:
        by_block.setdefault(s.block, []).append(1.0 if s.pruned else s.rate)
    return [sum(r) / len(r) for _, r in sorted(by_block.items())]
