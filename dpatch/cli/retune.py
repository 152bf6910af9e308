"""``dpatch retune``: change the rates of an existing patch or of native slots, and save."""

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
from dpatch.errors import InvalidValueError

__all__: list[str] = []

LayerDropOpt = Annotated[
    str | None,
    typer.Option(
        "--layerdrop",
        metavar="R",
        help="Rate of the model's own LayerDrop (config.layerdrop, encoder_layerdrop, ...), "
        "in [0, 1); alone, a model without DropPath slots is fine.",
    ),
]


@app.command("retune")
def retune_cmd(
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
    layerdrop: LayerDropOpt = None,
) -> None:
    """Change the rates of an existing patch (a dpatch file) or of native slots, and save.

    Mode, scaling, skipping and seeds stay as each site has them unless given; --layerdrop
    sets the model's own LayerDrop.

    Example: dpatch retune resnet50-dp.safetensors --max-rate 0.3 -o resnet50-dp3.safetensors
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
    rate = _parse_layerdrop(layerdrop)
    how = Invocation(
        models, recipe, size, coverage, weights, pretrained, output, force, dry_run,
        as_json, allow_empty, arch, input_shape, input_dtype, template, keep_going,
        {} if rate is None else {"layerdrop": rate},
    )  # fmt: skip
    run_patch("retune", settings, how)


def _parse_layerdrop(text: str | None) -> float | None:
    """``--layerdrop R`` as a float in [0, 1) (None when not given)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:  # also NaN
        raise InvalidValueError(
            f"--layerdrop has to be a number in [0, 1) (the share of layers skipped; 1 would "
            f"skip every layer), but got {text!r}"
        )
    return value
