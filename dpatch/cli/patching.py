"""``dpatch inject`` and ``dpatch retune``: one set of options, two library calls; many
inputs go through :mod:`dpatch.files`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpatch.cli._app import about, app, emit, err, load, out, step
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
    parse_inputs,
    parse_rate,
    parse_rates,
)
from dpatch.cli.batching import (
    KeepGoingOpt,
    ModelsArg,
    TemplateOpt,
    check_single_only,
    prepare,
    run_batch,
)
from dpatch.depth import read_rates
from dpatch.errors import InvalidValueError
from dpatch.files import FileResult, check_output, is_many, patch_many, save
from dpatch.patching import PatchReport, check_arguments, inject, retune

__all__: list[str] = []


def _patch(
    action: Callable[..., PatchReport],
    target: str,
    *,
    max_rate: str | None,
    min_rate: str | None,
    schedule: str | None,
    rates: str | None,
    mode: str | None,
    scaling: str | None,
    per: str | None,
    skip: bool | None,
    recipe: str | None,
    size: str | None,
    coverage: str,
    weights: Path | None,
    pretrained: bool,
    output: Path | None,
    force: bool,
    dry_run: bool,
    as_json: bool,
    allow_empty: bool,
    arch: str | None,
    input_shape: list[str] | None,
    input_dtype: list[str] | None,
    rates_from: Path | None = None,
) -> None:
    hi = parse_rate(max_rate, "--max-rate")
    lo = parse_rate(min_rate, "--min-rate")
    rate_list = _rates(rates, rates_from)
    example_inputs = parse_inputs(input_shape, input_dtype)
    check_arguments(hi, schedule, lo, mode, scaling, per)
    if rate_list is not None and schedule != "custom":
        raise InvalidValueError("--rates and --rates-from need --schedule custom")
    if output is not None and not dry_run:
        check_output(output, force)  # fail before the slow part
    loaded = load(target, weights=weights, pretrained=pretrained, arch=arch, quiet=as_json)
    name = loaded.spec.text if loaded.spec else target
    with step("Tracing residual branches", as_json), about(name):
        report = action(
            loaded.model,
            max_rate=hi,
            schedule=schedule,
            min_rate=lo,
            rates=rate_list,
            mode=mode,
            scaling=scaling,
            per=per,
            skip=skip,
            allow_empty=allow_empty,
            example_inputs=example_inputs,
            recipe=recipe,
            size=size,
            coverage=coverage,
        )
    written = None
    if output is not None and not dry_run:
        with step(f"Saving {output}", as_json):
            save(loaded.model, output, report, spec=loaded.spec, force=force)
        written = str(output)
    emit(report, as_json, {"model": name, "output": written, "dry_run": dry_run}, show_all=False)
    if not as_json and action is retune:
        out().print(_changes_line(report), markup=False, highlight=False)
    if not as_json:
        if written:
            err().print(f"wrote {written}", markup=False)
        elif dry_run and output is not None:
            err().print(f"dry run: would write {output}", markup=False)


def _summary(result: FileResult, dry_run: bool = False) -> str:
    """One line for one patched checkpoint."""
    report = result.report
    assert isinstance(report, PatchReport)
    where = f" -> {result.output}" if result.output else ""
    if where and dry_run:
        where = f" (dry run: would write {result.output})"
    line = (
        f"{result.input}{where}: {len(report.sites)} sites, mean rate {report.mean_rate:.4f}, "
        f"max {max((s.rate for s in report.sites), default=0.0):.4f}, expected depth "
        f"{report.expected_depth:.2f} of {report.depth}"
    )
    changed = report.changed_settings()
    if report.schedule != "current" and changed:
        line += "; changed " + ", ".join(f"{k} on {n}" for k, n in changed.items())
    return f"{line} ({result.seconds:.2f} s)"


def _many(
    action: str,
    models: list[str],
    request: dict[str, Any],
    output: Path | None,
    template: str | None,
    force: bool,
    dry_run: bool,
    as_json: bool,
    allow_empty: bool,
    arch: str | None,
    keep_going: bool,
) -> None:
    """Many inputs: ``-o`` is a folder; one line (or JSON object) per input."""
    batch = prepare(models, output, template, force, writes=output is not None)
    results = patch_many(
        action,
        batch,
        model=arch,
        dry_run=dry_run,
        keep_going=keep_going,
        allow_empty=allow_empty,
        **request,
    )
    run_batch(
        results,
        len(batch.inputs),
        as_json=as_json,
        describe=lambda result: _summary(result, dry_run),
    )


def _changes_line(report: PatchReport) -> str:
    """What a retune changed and kept, for people."""
    changed = report.changed_settings()
    kept = [k for k in ("mode", "scaling", "skip") if k not in changed]
    did = ", ".join(f"{k} on {n} of {len(report.sites)} sites" for k, n in changed.items())
    return f"changed: {did or 'nothing'}" + (f"; kept: {', '.join(kept)}" if kept else "")


def _rates(rates: str | None, rates_from: Path | None) -> list[float] | None:
    """``--rates R,R,...`` or ``--rates-from FILE`` (a JSON list, or a suggestion file)."""
    if rates is not None and rates_from is not None:
        raise InvalidValueError("give --rates or --rates-from, not both")
    return parse_rates(rates) if rates_from is None else read_rates(rates_from)


def _register(name: str, action: Callable[..., PatchReport], doc: str) -> None:
    """``inject`` and ``retune`` take the same options; only the library call differs."""

    def command(
        models: ModelsArg,
        max_rate: MaxRate = None,
        min_rate: MinRate = None,
        schedule: ScheduleOpt = None,
        rates: RatesOpt = None,
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
        rates_from: RatesFromOpt = None,
    ) -> None:
        if is_many(models) or template is not None:
            check_single_only(weights=weights, pretrained=pretrained)
            rate_list = _rates(rates, rates_from)
            if rate_list is not None and schedule != "custom":
                raise InvalidValueError("--rates and --rates-from need --schedule custom")
            request = {
                "max_rate": parse_rate(max_rate, "--max-rate"),
                "min_rate": parse_rate(min_rate, "--min-rate"),
                "schedule": schedule,
                "rates": rate_list,
                "mode": mode,
                "scaling": scaling,
                "per": per,
                "skip": skip,
                "recipe": recipe,
                "size": size,
                "coverage": coverage,
                "example_inputs": parse_inputs(input_shape, input_dtype),
            }
            _many(name, models, request, output, template, force, dry_run, as_json,
                  allow_empty, arch, keep_going)  # fmt: skip
            return
        _patch(
            action,
            models[0],
            max_rate=max_rate,
            min_rate=min_rate,
            schedule=schedule,
            rates=rates,
            mode=mode,
            scaling=scaling,
            per=per,
            skip=skip,
            recipe=recipe,
            size=size,
            coverage=coverage,
            weights=weights,
            pretrained=pretrained,
            output=output,
            force=force,
            dry_run=dry_run,
            as_json=as_json,
            allow_empty=allow_empty,
            arch=arch,
            input_shape=input_shape,
            input_dtype=input_dtype,
            rates_from=rates_from,
        )

    command.__doc__ = doc
    command.__name__ = f"{name}_cmd"
    app.command(name)(command)


_register(
    "inject",
    inject,
    """Put DropPath on every residual branch with a per-layer schedule, and save.

    Many inputs (files, folders, globs) take -o DIR; each architecture is built once.

    Example: dpatch inject resnet50 --max-rate 0.2 -o resnet50-dp.safetensors
    """,
)
_register(
    "retune",
    retune,
    """Change the rates of an existing patch (a dpatch file) or of native slots, and save.

    Mode, scaling, skipping and seeds stay as each site has them unless given.

    Example: dpatch retune resnet50-dp.safetensors --max-rate 0.3 -o resnet50-dp3.safetensors
    """,
)
