"""Rendering on its own: what a person reads (piped: plain aligned text, no colour)."""

from __future__ import annotations

import io

import torch
from helpers import PlainRes, example
from rich.console import Console

import dpatch
from dpatch.report import bar, render_report, render_schedule, render_sensitivity


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False, color_system=None), buf


def test_bar_widths() -> None:
    assert bar(0.0, 0.4) == "" and bar(0.1, 0.0) == ""
    assert bar(0.4, 0.4) == "█" * 24
    assert bar(0.2, 0.4) == "█" * 12
    assert bar(0.4, 0.4, width=4) == "████" and bar(0.05, 0.4, width=4) == "▌"


def test_report_rows_summary_and_notes() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(PlainRes(), PlainRes())
    report = dpatch.inject(model, 0.2, skip=True, example_inputs=(example(),))
    console, buf = _console()
    render_report(console, report, title="toy")
    text = buf.getvalue()
    assert "0.2000" in text and "row skip" in text
    assert "2 sites in 2 blocks; schedule linear (per block); mean rate 0.1000" in text
    assert "expected depth 1.80 of 2" in text and "input: 4x4x8 float32 (given)" in text


def test_notes_are_cut_at_five_unless_all() -> None:
    report = dpatch.PatchReport(
        sites=(), skipped=tuple(dpatch.Skipped(f"m{i}", "why") for i in range(7))
    )
    console, buf = _console()
    render_report(console, report)
    assert buf.getvalue().count("note: m") == 5 and "2 more (use --all" in buf.getvalue()
    console, buf = _console()
    render_report(console, report, show_all=True)
    assert buf.getvalue().count("note: m") == 7


def test_schedule_table() -> None:
    console, buf = _console()
    render_schedule(console, "linear", [0.0, 0.1, 0.2], 2.7)
    lines = buf.getvalue().splitlines()
    assert any(line.split()[:2] == ["2", "0.2000"] for line in lines)
    assert "schedule linear: 3 steps; expected depth 2.70" in buf.getvalue()


def test_sensitivity_of_an_untrained_zero_init_model_says_why_scores_are_zero() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(PlainRes(), PlainRes())
    for block in model:
        torch.nn.init.zeros_(block.f[2].weight)  # branch ends at zero: removing it changes nothing
        torch.nn.init.zeros_(block.f[2].bias)
    x = torch.randn(8, 4, 8)
    report = dpatch.sensitivity(model, x)
    assert report.scores and set(report.scores.values()) == {0.0}
    assert report.notes and "unchanged" in report.notes[0]
    assert report.to_dict()["notes"] == list(report.notes)
    console, buf = _console()
    render_sensitivity(console, report)
    assert "note: every score is 0" in buf.getvalue()
    torch.nn.init.normal_(model[0].f[2].weight)
    assert not dpatch.sensitivity(model, x).notes


def test_layer_sensitivity_table_has_one_row_per_layer_and_the_reason() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.Sequential(PlainRes(), PlainRes()), torch.nn.Linear(8, 3)
    )
    x = torch.randn(6, 4, 8)
    report = dpatch.sensitivity(model, x, metric="angular")
    console, buf = _console()
    render_sensitivity(console, report, title="m", source="6 inputs")
    text = buf.getvalue()
    rows = [ln.split() for ln in text.splitlines() if ln.split()[:1] in (["0"], ["1"])]
    assert [r[1] for r in rows] == ["1.0", "1.1"] and [r[2] for r in rows] == ["1", "1"]
    assert f"{report.scores['1.0']:.4g}" in text
    assert "2 of 2 layers measured on 6 samples (6 inputs); score: angular distance" in text
    for block in model[1]:
        torch.nn.init.zeros_(block.f[2].weight)
        torch.nn.init.zeros_(block.f[2].bias)
    zero = dpatch.sensitivity(model, x, metric="bi")
    assert zero.notes and "no layer changes its hidden state" in zero.notes[0]
