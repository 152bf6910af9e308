"""``dpatch inject``: put stochastic depth on every residual branch, and save."""

from __future__ import annotations

from typing import Annotated

import typer

from dpatch.cli._app import app
from dpatch.cli._batch import KeepGoingOpt, ModelsArg, TemplateOpt
from dpatch.cli._options import (
    AllowEmptyOpt,
    ArchOpt,
    CoverageOpt,
    DryRunOpt,
    ForceOpt,
    InputDtypeOpt,
    InputShapeOpt,
    JsonOpt,
    MaxRate,
    MinRate,
    ModeOpt,
    OutOpt,
    PerOpt,
    PretrainedOpt,
    RatesFromOpt,
    RatesOpt,
    RecipeOpt,
    ScalingOpt,
    ScheduleOpt,
    SizeOpt,
    SkipOpt,
    WeightsOpt,
    parse_settings,
)
from dpatch.cli._patching import Invocation, run_patch

__all__: list[str] = []

KeepLayerDropOpt = Annotated[
    bool,
    typer.Option(
        "--keep-layerdrop",
        help="Keep the model's own LayerDrop (config.layerdrop, ...) on layers that get "
        "sites (default: turned off there, so rates never double).",
    ),
]


@app.command("inject")
def inject_cmd(
    models: ModelsArg,
    max_rate: MaxRate = None,
    min_rate: MinRate = None,
    schedule: ScheduleOpt = None,
    rates: RatesOpt = None,
    rates_from: RatesFromOpt = None,
    mode: ModeOpt = None,
    scaling: ScalingOpt = None,
    per: PerOpt = None,
    skip: SkipOpt = None,
    recipe: RecipeOpt = None,
    size: SizeOpt = None,
    coverage: CoverageOpt = "slots",
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    output: OutOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    allow_empty: AllowEmptyOpt = False,
    arch: ArchOpt = None,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    template: TemplateOpt = None,
    keep_going: KeepGoingOpt = False,
    keep_layerdrop: KeepLayerDropOpt = False,
) -> None:
    """Put DropPath on every residual branch with a per-layer schedule, and save.

    Many inputs (files, folders, globs) take -o DIR; each architecture is built once.

    Example: dpatch inject resnet50 --max-rate 0.2 -o resnet50-dp.safetensors
    """
    settings = parse_settings(
        max_rate=max_rate,
        min_rate=min_rate,
        schedule=schedule,
        rates=rates,
        rates_from=rates_from,
        mode=mode,
        scaling=scaling,
        per=per,
        skip=skip,
    )
    how = Invocation(
        models, recipe, size, coverage, weights, pretrained, output, force, dry_run,
        as_json, allow_empty, arch, input_shape, input_dtype, template, keep_going,
        {"keep_layerdrop": True} if keep_layerdrop else {},
    )  # fmt: skip
    run_patch("inject", settings, how)
