"""The judgements :mod:`dpatch.verify` makes from what it observed (binomial intervals,
kept-row scales, schedule shapes, declarations) and the records it returns. No model."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dpatch.analysis import Site, Unreached
from dpatch.verification._layerdrop import LayerDropCheck
from dpatch.verification._measured import Measured, wilson
from dpatch.verification._observe import Tally

__all__ = [
    "SCALE_TOLERANCE",
    "Finding",
    "Measured",
    "SiteCheck",
    "VerifyReport",
    "measure",
    "plateaus",
    "schedule_shape",
    "wilson",
]

#: Largest relative error of a kept row's scale (float rounding is far below it).
SCALE_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Finding:
    """One thing verify found.

    Attributes:
        code: what kind (a key of ``FINDING_CODES``).
        severity: ``"error"`` (the report is not ok) or ``"warning"``.
        where: the site or slot it concerns ("" for the whole model).
        message: one line saying what was expected and what was seen.
    """

    code: str
    severity: str
    where: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {
            "code": self.code,
            "severity": self.severity,
            "where": self.where,
            "message": self.message,
        }

    def line(self) -> str:
        """``[code] where: message``."""
        return f"[{self.code}] {self.where or '(model)'}: {self.message}"


def measure(tally: Tally, rate: float, mode: str, z: float) -> Measured:
    """Judge one slot's tally against its configured rate and mode."""
    problems: list[tuple[str, str]] = []
    if tally.path == "skip-row":
        n, k = tally.skip_rows, tally.skip_kept
        share = (n - k) / n if n else None
        if n and abs(k - tally.skip_target) > tally.skip_slack + 1e-9:
            problems.append(
                (
                    "rate",
                    f"skipping computed {k} of {n} rows; rate {rate:.4f} keeps "
                    f"{tally.skip_target:.1f} (within {tally.skip_slack:.1f})",
                )
            )
        unit, draws, dropped, low, high, exact = "row", n, n - k, share, share, True
    else:
        batch = mode == "batch" or tally.path == "skip-batch"
        unit = "batch" if batch else "row"
        draws = tally.call_draws if batch else tally.row_draws
        dropped = tally.call_dropped if batch else tally.row_dropped
        share = dropped / draws if draws else None
        low, high = wilson(dropped, draws, z) if draws else (None, None)
        exact = False
        if draws and low is not None and high is not None:
            bad = dropped > 0 if rate == 0 else not low <= rate <= high
            if bad:
                problems.append(
                    (
                        "rate",
                        f"dropped {dropped} of {draws} {unit}s ({share:.4f}, interval "
                        f"[{low:.4f}, {high:.4f}]) but its rate is {rate:.4f}",
                    )
                )
    if tally.partial:
        problems.append(("mask", f"{tally.partial} rows were dropped only in part"))
    if mode == "row" and tally.whole_calls:
        problems.append(
            ("mode", f"{tally.whole_calls} calls dropped every row: it drops whole batches")
        )
    if mode == "batch" and tally.mixed_calls:
        problems.append(
            ("mode", f"{tally.mixed_calls} calls dropped some rows and kept others: it drops "
             "samples, not the whole batch")
        )  # fmt: skip
    scale = expected_scale = None
    if tally.ratios:
        scale = statistics.median(tally.ratios)
        expected_scale = statistics.median(tally.expected)
        off = sum(
            abs(r / e - 1.0) > SCALE_TOLERANCE
            for r, e in zip(tally.ratios, tally.expected, strict=True)
        )
        if off > 0.01 * len(tally.ratios) or abs(scale / expected_scale - 1) > SCALE_TOLERANCE:
            problems.append(
                (
                    "scale",
                    f"kept branches are scaled by {scale:.4f} (median of {len(tally.ratios)} "
                    f"rows; {off} off by more than 1 %), its settings say {expected_scale:.4f}",
                )
            )
    return Measured(
        unit, draws, dropped, share, low, high, exact, scale, expected_scale, tuple(problems)
    )


def schedule_shape(steps: Sequence[float], tol: float = 1e-6) -> str:
    """``none``, ``uniform``, ``linear`` (equal steps), ``increasing``, ``decreasing`` or
    ``custom``."""
    if not steps or max(steps) <= tol:
        return "none"
    if max(steps) - min(steps) <= tol:
        return "uniform"
    diffs = [b - a for a, b in itertools.pairwise(steps)]
    if max(diffs) - min(diffs) <= tol * max(1.0, max(steps)):
        return "linear"
    if all(d >= -tol for d in diffs):
        return "increasing"
    if all(d <= tol for d in diffs):
        return "decreasing"
    return "custom"


def plateaus(steps: Sequence[float], tol: float = 1e-9) -> list[tuple[int, int, float]]:
    """Runs (first, last, rate) of two or more equal nonzero rates inside a rising ramp of
    at least three distinct rates: one rate per stage where a per-block ramp was meant
    (transformers#33974)."""
    if len(steps) < 4 or schedule_shape(steps) != "increasing":
        return []
    if len({round(r, 9) for r in steps}) < 3:
        return []
    runs: list[tuple[int, int, float]] = []
    start = 0
    for i in range(1, len(steps) + 1):
        if i == len(steps) or abs(steps[i] - steps[start]) > tol:
            if i - start >= 2 and steps[start] > tol:
                runs.append((start, i - 1, steps[start]))
            start = i
    return runs


def compare_declared(
    configured: Mapping[str, Mapping[str, Any]],
    declared: Mapping[str, Mapping[str, Any]],
    *,
    complete: bool,
) -> list[tuple[str, str]]:
    """(site, message) for every declared setting the model does not have; ``complete``:
    the declaration lists every site (a manifest), so an unlisted site is reported too."""
    out: list[tuple[str, str]] = []
    for name, want in declared.items():
        have = configured.get(name)
        if have is None:
            out.append((name, "declared, but the model has no such site"))
            continue
        if bool(have.get("pruned")) != bool(want.get("pruned")):
            out.append(
                (name, "declared pruned, but the model runs it")
                if want.get("pruned")
                else (name, "pruned in the model, but declared to run")
            )
            continue
        for key, value in want.items():
            got = have.get(key)
            if key == "rate":
                if abs(float(got or 0.0) - float(value)) > 1e-6:
                    where = "" if have.get("slot_present") else " (no DropPath on this branch)"
                    out.append(
                        (name, f"rate is {float(got or 0.0):.4f}{where}, declared {value:.4f}")
                    )
            elif got != value:
                out.append((name, f"{key} is {got!r}, declared {value!r}"))
    if complete:
        out += [(n, "not in the declaration") for n in configured if n not in declared]
    return out


@dataclass(frozen=True)
class SiteCheck:
    """What one site declares and what it did.

    Attributes:
        site: the site (its configured ``rate``, ``mode``, ``scaling``, ``skip``).
        declared: the rate that was promised (the configured rate without a declaration).
        slot_present: a stochastic-depth module sits on this branch.
        calls: training calls of its slot seen in the forward passes.
        measured: what its slot realised (a slot shared by two sites: the same record).
        ok: no error concerns this site.
    """

    site: Site
    declared: float
    slot_present: bool
    calls: int
    measured: Measured
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.site.to_dict(),
            "name": self.site.name,
            "declared": self.declared,
            "slot_present": self.slot_present,
            "calls": self.calls,
            **self.measured.to_dict(),
            "ok": self.ok,
        }


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify`.

    Attributes:
        ok: no finding of severity ``error``.
        sites: one check per residual site, in forward order.
        findings: every error and warning, one line each.
        eval_check: ``bitwise`` or ``close`` (sites with expected scaling).
        eval_equal: eval output equals the model without stochastic depth.
        schedule: shape of the per-block rates (``schedule_shape``).
        steps, batch: forward passes run, and rows in each.
        draws, rows: replay: decisions aimed for per slot, rows per replayed call.
        confidence: family-wise confidence of the intervals (Bonferroni over sites).
        interval: how intervals are computed (``wilson``).
        seconds: wall-clock time of the whole check.
        inputs: the training-pass inputs (shapes, dtypes) and where their shape came from.
        unreached: modules holding parameters the input never reached (their branches
            were not checked).
        layerdrop: one check per layer list the model's own code drops layers of
            (``config.layerdrop``, ...): realised skip share against the claimed rate.
    """

    ok: bool
    sites: tuple[SiteCheck, ...]
    findings: tuple[Finding, ...]
    eval_check: str
    eval_equal: bool
    schedule: str
    steps: int
    batch: int
    draws: int
    rows: int
    seed: int
    confidence: float
    seconds: float
    interval: str = "wilson"
    inputs: str = ""
    unreached: tuple[Unreached, ...] = ()
    layerdrop: tuple[LayerDropCheck, ...] = ()

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "warning")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "inputs": self.inputs,
            "steps": self.steps,
            "batch": self.batch,
            "draws": self.draws,
            "rows": self.rows,
            "seed": self.seed,
            "confidence": self.confidence,
            "interval": self.interval,
            "eval": {"check": self.eval_check, "equal": self.eval_equal},
            "schedule": self.schedule,
            "summary": {
                "sites": len(self.sites),
                "ok_sites": sum(c.ok for c in self.sites),
                "errors": len(self.errors),
                "warnings": len(self.warnings),
            },
            "sites": [c.to_dict() for c in self.sites],
            "findings": [f.to_dict() for f in self.findings],
            "unreached": [u.to_dict() for u in self.unreached],
            "layerdrop": [c.to_dict() for c in self.layerdrop],
        }
