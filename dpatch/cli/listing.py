"""``dpatch schedule`` and ``dpatch list``: answers without a model."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dpatch.cli._app import app, out
from dpatch.cli._options import (
    JsonOpt,
    MaxRate,
    MinRate,
    RatesOpt,
    ScheduleOpt,
    parse_rate,
    parse_rates,
)
from dpatch.errors import InvalidValueError
from dpatch.models import SOURCES, list_models
from dpatch.patching import DEFAULTS
from dpatch.report import render_list, render_schedule
from dpatch.schedule import expected_depth, schedule_rates

__all__: list[str] = []


@app.command("schedule")
def schedule_cmd(
    depth: Annotated[int, typer.Option("--depth", metavar="N", help="Number of blocks.")],
    max_rate: MaxRate = "0.1",
    min_rate: MinRate = "0",
    schedule: ScheduleOpt = "linear",
    rates: RatesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a schedule without loading a model.

    Example: dpatch schedule --depth 12 --max-rate 0.2 --schedule cosine
    """
    hi, lo = parse_rate(max_rate, "--max-rate"), parse_rate(min_rate, "--min-rate")
    schedule = schedule or DEFAULTS["schedule"]
    values = schedule_rates(
        schedule,
        depth,
        DEFAULTS["max_rate"] if hi is None else hi,
        DEFAULTS["min_rate"] if lo is None else lo,
        parse_rates(rates),
    )
    if as_json:
        doc = {
            "schedule": schedule,
            "depth": depth,
            "rates": values,
            "expected_depth": expected_depth(values),
        }
        typer.echo(json.dumps(doc, indent=2))
    else:
        render_schedule(out(), schedule, values, expected_depth(values))


@app.command("list")
def list_cmd(
    pattern: Annotated[
        str | None,
        typer.Argument(
            metavar="PATTERN", help="A word (matched anywhere) or a glob, e.g. 'resnet*'."
        ),
    ] = None,
    source: Annotated[
        str | None, typer.Option("--source", metavar="timm|tv|hf", help="Only one library.")
    ] = None,
    native_only: Annotated[
        bool, typer.Option("--native", help="Only models with native DropPath slots.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List model names from timm, torchvision (every task) and transformers (vision
    classes, when installed), marking those with native slots.

    Example: dpatch list 'convnext*' --native
    """
    if source is not None and source not in SOURCES:
        raise InvalidValueError(
            f"--source {source!r} is unknown; choose one of: {', '.join(SOURCES)}"
        )
    entries = list_models(pattern, source)
    if native_only:
        entries = [e for e in entries if e.native]
    if as_json:
        doc = [{"model": e.spec, "native": e.native, "task": e.task} for e in entries]
        typer.echo(json.dumps(doc, indent=2))
    else:
        render_list(out(), entries)
