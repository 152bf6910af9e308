"""Rendering reports for people: rich tables with a per-layer bar of the rates.

With ``cli.py``, the only module that imports rich. On a terminal the tables are drawn with
colour and box characters; piped, they are plain aligned text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dpatch.patch import PatchReport

__all__ = [
    "bar",
    "render_file_summary",
    "render_list",
    "render_recipes",
    "render_report",
    "render_schedule",
]

_BAR_WIDTH = 24


def bar(rate: float, top: float, width: int = _BAR_WIDTH) -> str:
    """A horizontal bar of ``rate`` on a scale whose full width is ``top``."""
    if top <= 0:
        return ""
    filled = rate / top * width
    whole = int(filled)
    eighths = round((filled - whole) * 8)
    if eighths == 8:
        whole, eighths = whole + 1, 0
    partial = " ▏▎▍▌▋▊▉"[eighths] if eighths else ""
    return ("█" * whole + partial).rstrip()


def _table(console: Console, title: str | None = None) -> Table:
    if console.is_terminal:
        return Table(title=title, show_lines=False, header_style="bold")
    return Table(title=title, box=None, show_edge=False, pad_edge=False, header_style="")


def render_report(
    console: Console, report: PatchReport, *, title: str | None = None, show_all: bool = False
) -> None:
    """One row per site (block, module, branch, kind, rate, mode, bar), then a summary."""
    top = max((s.rate for s in report.sites), default=0.0)
    table = _table(console, title)
    for col, justify in (
        ("block", "right"),
        ("module", "left"),
        ("branch", "left"),
        ("kind", "left"),
        ("rate", "right"),
        ("mode", "left"),
        ("", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in report.sites:
        flags = (
            s.mode + (" skip" if s.skip else "") + ("" if s.fused or s.rate == 0 else " unfused")
        )
        flags += " pruned" if s.pruned else ""
        table.add_row(
            str(s.block),
            s.path or "(root)",
            s.branch,
            s.kind,
            f"{s.rate:.4f}",
            flags,
            Text(bar(s.rate, top), style="cyan"),
        )
    if report.sites:
        console.print(table)
    summary = (
        f"{len(report.sites)} sites in {report.blocks} blocks; "
        f"schedule {report.schedule}"
        + (f" (per {report.per})" if report.schedule != "current" else "")
        + f"; mean rate {report.mean_rate:.4f}; max rate "
        f"{max((s.rate for s in report.sites), default=0.0):.4f}; expected depth "
        f"{report.expected_depth:.2f} of {report.depth}"
    )
    console.print(summary, highlight=False)
    if report.example is not None:
        console.print(
            f"input: {report.example.describe()} ({report.example.source})",
            highlight=False,
            markup=False,
        )
    if report.recipe:
        console.print(_recipe_line(report.recipe), highlight=False, markup=False)
    notes = report.skipped if show_all else report.skipped[:5]
    for note in notes:
        console.print(
            f"note: {note.path or '(root)'}: {note.reason}", highlight=False, markup=False
        )
    if len(report.skipped) > len(notes):
        console.print(
            f"note: {len(report.skipped) - len(notes)} more (use --all to list them)",
            highlight=False,
        )


def _recipe_line(recipe: dict[str, Any]) -> str:
    size = f" size {recipe['size']} ({recipe['size_from']})" if recipe.get("size") else ""
    line = f"recipe: {recipe['recipe']}{size}; {recipe['source']['paper']}"
    sched = recipe.get("scheduler") or {}
    if sched.get("kind", "constant") != "constant":
        args = ", ".join(f"{k}={v!r}" for k, v in sched.items())
        line += f"; over training time: DropPathScheduler(model, {args})"
    return line


def render_schedule(console: Console, kind: str, rates: Sequence[float], depth_sum: float) -> None:
    """A schedule without a model: one row per step with its bar."""
    top = max(rates, default=0.0)
    table = _table(console)
    table.add_column("step", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("", justify="left")
    for i, r in enumerate(rates):
        table.add_row(str(i), f"{r:.4f}", Text(bar(r, top), style="cyan"))
    console.print(table)
    console.print(
        f"schedule {kind}: {len(rates)} steps; expected depth {depth_sum:.2f}", highlight=False
    )


def render_list(console: Console, entries: Sequence[Any]) -> None:
    """Model names, marking those whose library gives them native drop-path slots."""
    table = _table(console)
    table.add_column("model", justify="left")
    table.add_column("native", justify="left")
    for e in entries:
        table.add_row(e.spec, "yes" if e.native else "")
    console.print(table)
    console.print(f"{len(entries)} models", highlight=False)


def render_recipes(console: Console, recipes: Sequence[Any]) -> None:
    """One row per published recipe: rates, schedule, time schedule, source."""
    table = _table(console)
    for col in ("recipe", "for", "rates", "schedule", "over time", "source"):
        table.add_column(col, justify="left", overflow="fold")
    for r in recipes:
        row = r.summary()
        table.add_row(
            row["name"], row["title"], row["rates"], row["schedule"], row["time"], row["source"]
        )
    console.print(table)
    console.print(
        f"{len(recipes)} recipes; use one with --recipe NAME (and --size S where rates depend "
        "on the model size)",
        highlight=False,
    )


def render_file_summary(console: Console, path: str, info: dict[str, Any]) -> None:
    """A checkpoint without a dpatch manifest."""
    console.print(
        f"{path}: no dpatch manifest ({info['tensors']} tensors, {info['parameters']:,} values); "
        "pass --model NAME to list its residual sites",
        highlight=False,
        markup=False,
    )
