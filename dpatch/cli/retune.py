"""``dpatch retune``: change the rates of an existing patch or of native slots, and save."""

from __future__ import annotations

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
) -> None:
    """Change the rates of an existing patch (a dpatch file) or of native slots, and save.

    Mode, scaling, skipping and seeds stay as each site has them unless given.

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
    how = Invocation(
        models, recipe, size, coverage, weights, pretrained, output, force, dry_run,
        as_json, allow_empty, arch, input_shape, input_dtype, template, keep_going,
    )  # fmt: skip
    run_patch("retune", settings, how)
