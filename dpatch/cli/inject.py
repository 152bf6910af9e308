"""``dpatch inject`` (and ``dpatch retune``, which takes the same options): put stochastic
depth on every residual branch, or change its rates, and save."""

from __future__ import annotations

from typing import Annotated, Any

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
    TieOpt,
    WeightsOpt,
    parse_settings,
)
from dpatch.cli._patching import Invocation, run_patch
from dpatch.errors import InvalidValueError

__all__: list[str] = []

KeepLayerDropOpt = Annotated[
    bool,
    typer.Option(
        "--keep-layerdrop",
        help="inject: keep the model's own LayerDrop (config.layerdrop, ...) on layers that "
        "get sites (default: turned off there, so rates never double).",
    ),
]
LayerDropOpt = Annotated[
    str | None,
    typer.Option(
        "--layerdrop",
        metavar="R",
        help="retune: rate of the model's own LayerDrop (config.layerdrop, encoder_layerdrop, "
        "...), in [0, 1); alone, a model without DropPath slots is fine.",
    ),
]


INJECT_HELP = """Put DropPath on every residual branch with a per-layer schedule, and save.

Many inputs (files, folders, globs) take -o DIR; each architecture is built once.

Example: dpatch inject resnet50 --max-rate 0.2 -o resnet50-dp.safetensors
"""


@app.command("inject", help=INJECT_HELP)
def inject_cmd(
    ctx: typer.Context,
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
    tie: TieOpt = None,
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
    layerdrop: LayerDropOpt = None,
) -> None:
    """``inject`` or ``retune`` (the command's name says which): one runner, one settings
    record."""
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
        tie=tie,
    )
    how = Invocation(
        models, recipe, size, coverage, weights, pretrained, output, force, dry_run,
        as_json, allow_empty, arch, input_shape, input_dtype, template, keep_going,
        _own_options(str(ctx.info_name), keep_layerdrop, layerdrop),
    )  # fmt: skip
    run_patch(str(ctx.info_name), settings, how)


def _own_options(command: str, keep_layerdrop: bool, layerdrop: str | None) -> dict[str, Any]:
    """The options only one of the two commands takes: inject's ``--keep-layerdrop``,
    retune's ``--layerdrop R``."""
    if command == "inject":
        if layerdrop is not None:
            raise InvalidValueError(
                "--layerdrop R is retune's (it sets the model's own LayerDrop); inject turns "
                "that LayerDrop off on the layers it patches, or keeps it with --keep-layerdrop"
            )
        return {"keep_layerdrop": True} if keep_layerdrop else {}
    if keep_layerdrop:
        raise InvalidValueError(
            "--keep-layerdrop is inject's; retune leaves the model's own LayerDrop as it is "
            "unless --layerdrop R sets it"
        )
    if layerdrop is None:
        return {}
    try:
        value = float(layerdrop)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:  # also NaN
        raise InvalidValueError(
            f"--layerdrop has to be a number in [0, 1) (the share of layers skipped; 1 would "
            f"skip every layer), but got {layerdrop!r}"
        )
    return {"layerdrop": value}
