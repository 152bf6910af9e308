"""Rendering the depth commands' results for people: sensitivity tables with a bar per
site, what pruning saved, what folding changed (rich, like :mod:`dpatch.report`)."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from dpatch.depth.fold import FoldReport
from dpatch.depth.measure import PruneStats
from dpatch.depth.sensitivity import SensitivityReport
from dpatch.report import _table, bar

__all__ = ["render_fold", "render_prune_stats", "render_sensitivity"]

_LABELS = {
    "ce_increase": "cross-entropy increase",
    "kl": "KL divergence of the softmax outputs",
    "rel_l2": "relative L2 change of the output",
}


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_sensitivity(
    console: Console,
    report: SensitivityReport,
    *,
    title: str | None = None,
    source: str = "",
    synthetic: bool = False,
) -> None:
    """One row per site in depth order: its rate, scores and a bar of the primary score."""
    top = max((s.score for s in report.sites if s.score is not None), default=0.0)
    with_targets = report.accuracy is not None
    table = _table(console, title)
    columns = [("block", "right"), ("site", "left"), ("rate", "right"), ("score", "right")]
    if with_targets:
        columns += [("acc drop", "right"), ("ce +", "right")]
    columns.append(("", "left"))
    for col, justify in columns:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in report.sites:
        row = [str(s.block), s.name, f"{s.rate:.4f}", _num(s.score) if s.reason == "" else "-"]
        if with_targets:
            row += [_num(s.accuracy_drop), _num(s.ce_increase)]
        shown = s.score if s.score is not None and s.score > 0 else 0.0
        cells: list[str | Text] = [*row, Text(bar(shown, top), style="magenta")]
        if s.reason:
            cells[-1] = Text(s.reason)
        table.add_row(*cells)
    console.print(table)
    measured = sum(1 for s in report.sites if s.score is not None)
    line = (
        f"{measured} of {len(report.sites)} sites measured on {report.samples} samples"
        + (f" ({source})" if source else "")
        + f"; score: {_LABELS.get(report.metric, report.metric)}"
    )
    if with_targets:
        line += (
            f"; full model: accuracy {report.accuracy:.4f}, "
            f"cross-entropy {_num(report.cross_entropy)}"
        )
    console.print(line, highlight=False, markup=False)
    if synthetic:
        console.print(
            "note: synthetic inputs: a smoke test, not a measurement", highlight=False, markup=False
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _change(before: float, after: float) -> str:
    return f"{after / before:.2f}x" if before else "-"


def render_prune_stats(console: Console, stats: PruneStats, file_bytes: int | None) -> None:
    """Parameters, file size and eval latency before and after pruning."""
    lines = [
        f"parameters: {stats.parameters_before:,} -> {stats.parameters_after:,} "
        f"({_change(stats.parameters_before, stats.parameters_after)})",
        f"tensor bytes: {_mb(stats.bytes_before)} -> {_mb(stats.bytes_after)}"
        + (f" (file written: {_mb(file_bytes)})" if file_bytes is not None else ""),
        f"eval latency on {stats.device} (batch {stats.batch}, median of {stats.iterations}): "
        f"{stats.latency_before_ms:.2f} ms -> {stats.latency_after_ms:.2f} ms "
        f"({_change(stats.latency_before_ms, stats.latency_after_ms)})",
    ]
    for line in lines:
        console.print(line, highlight=False, markup=False)


def render_fold(console: Console, report: FoldReport) -> None:
    """The folded sites and the tensors each scaled."""
    if not report.folded:
        console.print(
            "nothing to fold: no site uses scaling 'expected' with a rate above 0",
            highlight=False,
            markup=False,
        )
        return
    table = _table(console)
    for col in ("site", "rate", "factor", "scaled"):
        table.add_column(col)
    for f in report.folded:
        table.add_row(f.name, f"{f.rate:.4f}", f"{f.factor:.4f}", ", ".join(f.tensors))
    console.print(table)
    console.print(
        f"{len(report.folded)} sites folded; they now use scaling 'inverted' (eval: identity)",
        highlight=False,
        markup=False,
    )
