"""Rendering for people: every rich table and summary line dpatch prints.

Patch reports with a per-layer bar of the rates, schedules, model lists, recipes,
sensitivity, pruning and folding results, and verification. With :mod:`dpatch.cli`, the
only module that imports rich. On a terminal the tables are drawn with colour and box
characters; piped, they are plain aligned text. The records rendered are imported for type
checking only, so importing this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from dpatch.analysis import Unreached
    from dpatch.depth import FoldReport, PruneStats, SensitivityReport
    from dpatch.patching import PatchReport
    from dpatch.verification import LayerDropCheck, VerifyReport

__all__ = [
    "bar",
    "render_file_summary",
    "render_fold",
    "render_list",
    "render_prune_stats",
    "render_recipes",
    "render_report",
    "render_schedule",
    "render_sensitivity",
    "render_verify",
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
    for record in report.layerdrop:
        console.print(f"layerdrop: {record.describe()}", highlight=False, markup=False)
    for text in report.notes:
        console.print(f"note: {text}", highlight=False, markup=False)
    if report.unreached:
        given = report.example is not None and report.example.source == "given"
        line = unreached_note(report.unreached, given=given)
        console.print(line, highlight=False, markup=False)
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


def unreached_note(unreached: Sequence[Unreached], *, given: bool) -> str:
    """``note: N modules holding M parameters did not run on the inferred input (...)``."""
    which = "given" if given else "inferred"
    paths = ", ".join(f"{u.path or '(root)'}.*" for u in unreached[:3])
    more = ", ..." if len(unreached) > 3 else ""
    count = sum(u.parameters for u in unreached)
    return (
        f"note: {len(unreached)} modules holding {count:,} parameters did not run on the "
        f"{which} input ({paths}{more}); their residual branches were not looked for: pass "
        "example_inputs / --input-shape that reach them"
    )


def _recipe_line(recipe: dict[str, Any]) -> str:
    size = f" size {recipe['size']} ({recipe['size_from']})" if recipe.get("size") else ""
    line = f"recipe: {recipe['recipe']}{size}; {recipe['source']['paper']}"
    sched = recipe.get("scheduler") or {}
    if sched.get("kind", "constant") != "constant":
        args = ", ".join(f"{k}={v!r}" for k, v in sched.items())
        if recipe.get("needs_total_steps"):
            args += ", total_steps=<optimizer steps of the run>"
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


# --------------------------------------------------------------------------- depth
_LABELS = {
    "ce_increase": "cross-entropy increase",
    "kl": "KL divergence of the softmax outputs",
    "rel_l2": "relative L2 change of the output",
    "angular": "angular distance arccos(cos(in, out))/pi of the layer's hidden state "
    "(Gromov et al.), mean over tokens",
    "bi": "Block Influence 1 - cos(in, out) of the layer's hidden state (ShortGPT), mean "
    "over tokens",
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
    """One row per site in depth order: its rate, scores and a bar of the primary score;
    one row per layer for layer metrics."""
    if report.per == "layer":
        _render_layer_sensitivity(console, report, title, source)
    else:
        _render_site_sensitivity(console, report, title, source)
    if synthetic:
        console.print(
            "note: synthetic inputs: a smoke test, not a measurement", highlight=False, markup=False
        )
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, markup=False)


def _render_layer_sensitivity(
    console: Console, report: SensitivityReport, title: str | None, source: str
) -> None:
    top = max((e.score for e in report.layers if e.score is not None), default=0.0)
    table = _table(console, title)
    for col, justify in (("layer", "right"), ("module", "left"), ("branches", "right"),
                         ("score", "right"), ("", "left")):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for e in report.layers:
        shown = e.score if e.score is not None and e.score > 0 else 0.0
        last: str | Text = Text(e.reason) if e.reason else Text(bar(shown, top), style="magenta")
        # similarities of a barely trained model are small: significant digits, not places
        score = "-" if e.score is None else f"{e.score:.4g}"
        table.add_row(str(e.layer.index), e.name, str(len(e.layer.sites)), score, last)
    console.print(table)
    measured = sum(1 for e in report.layers if e.score is not None)
    console.print(
        f"{measured} of {len(report.layers)} layers measured on {report.samples} samples"
        + (f" ({source})" if source else "")
        + f"; score: {_LABELS.get(report.metric, report.metric)}; lowest first when pruning",
        highlight=False,
        markup=False,
    )


def _render_site_sensitivity(
    console: Console, report: SensitivityReport, title: str | None, source: str
) -> None:
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


# --------------------------------------------------------------------------- verify
def render_verify(console: Console, report: VerifyReport, *, title: str | None = None) -> None:
    """One row per site: declared rate, realised share and interval, kept-branch scale."""
    table = _table(console, title)
    for col, justify in (
        ("block", "right"),
        ("module", "left"),
        ("branch", "left"),
        ("rate", "right"),
        ("realised", "right"),
        ("interval", "left"),
        ("scale", "right"),
        ("", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for c in report.sites:
        s, m = c.site, c.measured
        realised = "-" if m.share is None else f"{m.share:.4f}"
        if m.exact:
            interval = f"exact ({m.draws} rows)"
        elif m.low is None:
            interval = "no slot" if not c.slot_present else "not called"
        else:
            interval = f"[{m.low:.4f}, {m.high:.4f}] of {m.draws} {m.unit}s"
        scale = "-" if m.scale is None else f"{m.scale:.3f}/{m.expected_scale:.3f}"
        table.add_row(
            str(s.block),
            s.path or "(root)",
            s.branch,
            f"{s.rate:.4f}",
            realised,
            interval,
            scale,
            "ok" if c.ok else "FAIL",
        )
    if report.sites:
        console.print(table)
    for check in report.layerdrop:
        console.print(_layerdrop_line(check), markup=False, highlight=False, soft_wrap=True)
    console.print(_summary(report), markup=False, highlight=False, soft_wrap=True)
    if report.unreached:
        line = unreached_note(report.unreached, given=report.inputs.endswith("(given)"))
        console.print(line, markup=False, highlight=False)


def _layerdrop_line(check: LayerDropCheck) -> str:
    """``layerdrop: encoder.layers (12 layers) at 0.1 (config.layerdrop): skipped 27 of 264
    layer runs in 22 passes (0.1023, [0.0610, 0.1664]) ok``."""
    m = check.measured
    if m.share is None:
        seen = "not run in training"
    else:
        seen = f"skipped {m.dropped} of {m.draws} layer runs in {check.passes} passes"
        seen += f" ({m.share:.4f}, [{m.low:.4f}, {m.high:.4f}])" if m.low is not None else ""
    verdict = "ok" if check.ok else "FAIL"
    return f"layerdrop: {check.layerdrop.describe()}: {seen} {verdict}"


def _summary(report: VerifyReport) -> str:
    sites = report.sites
    measured = sum(c.measured.draws > 0 for c in sites)
    verdict = "ok" if report.ok else f"{len(report.errors)} mismatches"
    eval_text = (
        ("equals" if report.eval_equal else "DIFFERS from")
        + " the model without stochastic depth"
        + (" (bit for bit)" if report.eval_check == "bitwise" else " (to float tolerance)")
    )
    return (
        f"{len(sites)} sites, {measured} measured: {verdict}; eval output {eval_text}; "
        f"schedule {report.schedule}; {report.steps} training passes on {report.inputs} "
        f"+ {report.draws} replayed draws per slot; Wilson {report.confidence:.1%} intervals "
        f"(Bonferroni over sites{' and LayerDrops' if report.layerdrop else ''}); "
        f"{report.seconds:.1f} s"
    )
