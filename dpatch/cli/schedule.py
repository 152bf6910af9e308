"""``dpatch schedule``: a per-layer schedule without a model."""

from __future__ import annotations

from typing import Annotated

import typer

from dpatch.cli._app import app, echo_json, out
from dpatch.cli._options import JsonOpt, MaxRate, MinRate, RatesOpt, ScheduleOpt, parse_settings
from dpatch.errors import InvalidValueError
from dpatch.schedule import expected_depth, schedule_rates
from dpatch.settings import DEFAULTS

__all__: list[str] = []


@app.command("schedule")
def schedule_cmd(
    depth: Annotated[int, typer.Option("--depth", metavar="N", help="Number of blocks.")],
    max_rate: MaxRate = None,
    min_rate: MinRate = None,
    schedule: ScheduleOpt = None,
    rates: RatesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a schedule without loading a model.

    Example: dpatch schedule --depth 12 --max-rate 0.2 --schedule cosine
    """
    if depth < 1:
        raise InvalidValueError(f"--depth must be at least 1 (a number of blocks), but got {depth}")
    given = parse_settings(
        max_rate=max_rate,
        min_rate=min_rate,
        schedule=schedule,
        rates=rates,
        rates_from=None,
        mode=None,
        scaling=None,
        per=None,
        skip=None,
    )
    s = given.over(DEFAULTS)
    kind = str(s.schedule)
    if kind == "native":
        raise InvalidValueError(
            "--schedule native is the model's own rule; it needs a model (dpatch inject MODEL "
            "--schedule native --dry-run shows it)"
        )
    values = schedule_rates(
        kind, depth, float(s.max_rate or 0.0), float(s.min_rate or 0.0), s.rates
    )
    if as_json:
        doc = {"schedule": kind, "depth": depth, "rates": values}
        echo_json({**doc, "expected_depth": expected_depth(values)})
    else:
        from dpatch.report import render_schedule

        render_schedule(out(), kind, values, expected_depth(values))
