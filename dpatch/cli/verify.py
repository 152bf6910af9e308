"""``dpatch verify``: run a model and show, site by site, the rate it declares and the rate
that really runs; exit 1 with one line per mismatch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dpatch._version import __version__
from dpatch.cli._app import app, echo_json, load, out, step
from dpatch.cli._batch import KeepGoingOpt, ModelsArg, check_single_only, prepare, run_batch
from dpatch.cli._options import (
    ArchOpt,
    InputDtypeOpt,
    InputShapeOpt,
    JsonOpt,
    PretrainedOpt,
    WeightsOpt,
    parse_inputs,
)
from dpatch.settings import FINDING_CODES

if TYPE_CHECKING:
    from dpatch.files import FileResult

__all__: list[str] = []

StepsOpt = Annotated[
    int, typer.Option("--steps", metavar="N", help="Training forward passes of the model.")
]
BatchOpt = Annotated[
    int, typer.Option("--batch", metavar="N", help="Rows of the random input (at least 2).")
]
DrawsOpt = Annotated[
    int,
    typer.Option(
        "--draws",
        metavar="N",
        help="Per slot, rows replayed on the slot alone after the forward passes (0: none).",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the whole check.")]
IgnoreOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--ignore",
        metavar="CODE",
        help="Report findings of this code as warnings (repeatable): "
        + ", ".join(FINDING_CODES)
        + ".",
    ),
]


@app.command("verify")
def verify_cmd(
    models: ModelsArg,
    steps: StepsOpt = 1,
    batch: BatchOpt = 2,
    draws: DrawsOpt = 2048,
    seed: SeedOpt = 0,
    ignore: IgnoreOpt = None,
    as_json: JsonOpt = False,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    arch: ArchOpt = None,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    keep_going: KeepGoingOpt = False,
) -> None:
    """Prove the stochastic depth that runs is the one declared (exit 1 on a mismatch).

    Per site: declared rate, realised drop share (Wilson interval), scale of kept branches.

    Also: eval output, slots never called or on no residual, the schedule (a file: its manifest).

    Example: dpatch verify resnet50-dp.safetensors
    """
    from dpatch.files import is_many, read_manifest, report_from_manifest, verify_many
    from dpatch.verification import verify

    options: dict[str, Any] = {
        "steps": steps,
        "batch": batch,
        "draws": draws,
        "seed": seed,
        "ignore": tuple(ignore or ()),
        "example_inputs": parse_inputs(input_shape, input_dtype),
    }
    if is_many(models):
        check_single_only(weights=weights, pretrained=pretrained)
        prepared = prepare(models, None, None, False, writes=False)
        results = verify_many(prepared, model=arch, keep_going=keep_going, **options)
        run_batch(
            results, len(prepared.inputs), as_json=as_json, describe=_line, details=_mismatches
        )
        return
    target = models[0]
    loaded = load(target, weights=weights, pretrained=pretrained, arch=arch, quiet=as_json)
    name = loaded.spec.text if loaded.spec else target
    path = Path(target)
    manifest = read_manifest(path) if path.is_file() else None
    declared = report_from_manifest(manifest) if manifest is not None else None
    with step("Running the model", as_json):
        report = verify(loaded.model, declared=declared, **options)
    if as_json:
        doc = {"dpatch": __version__, "model": name, "file": str(path) if manifest else None}
        echo_json({**doc, **report.to_dict()})
    else:
        from dpatch.report import render_verify

        render_verify(out(), report, title=name)
        for finding in report.findings:
            label = "mismatch" if finding.severity == "error" else "warning"
            typer.echo(f"{label}: {finding.line()}", err=True)
    raise typer.Exit(0 if report.ok else 1)


def _line(result: FileResult) -> str:
    from dpatch.verification import VerifyReport

    report = result.report
    assert isinstance(report, VerifyReport)
    verdict = "ok" if report.ok else "FAIL"
    return (
        f"{result.input}: {verdict}: {len(report.sites)} sites, {len(report.errors)} "
        f"mismatches, {len(report.warnings)} warnings; schedule {report.schedule} "
        f"({report.seconds:.1f} s)"
    )


def _mismatches(result: FileResult) -> list[str]:
    from dpatch.verification import VerifyReport

    report = result.report
    if not isinstance(report, VerifyReport):
        return []
    return [
        f"{'mismatch' if f.severity == 'error' else 'warning'}: {result.input}: {f.line()}"
        for f in report.findings
    ]
