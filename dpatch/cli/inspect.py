"""``dpatch inspect``: the sites of a model, a dpatch file (read from its manifest alone) or
a plain checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dpatch._version import __version__
from dpatch.cli._app import about, app, echo_json, emit, load, out, step
from dpatch.cli._batch import KeepGoingOpt, ModelsArg, check_single_only, prepare, run_batch
from dpatch.cli._options import (
    AllowEmptyOpt,
    ArchOpt,
    CoverageOpt,
    InputDtypeOpt,
    InputShapeOpt,
    JsonOpt,
    PretrainedOpt,
    WeightsOpt,
    parse_inputs,
)
from dpatch.errors import NoResidualSitesError

if TYPE_CHECKING:
    from dpatch.files import FileResult

__all__: list[str] = []


@app.command("inspect")
def inspect_cmd(
    models: ModelsArg,
    as_json: JsonOpt = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="List every note (skipped blocks and why).")
    ] = False,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    arch: ArchOpt = None,
    allow_empty: AllowEmptyOpt = False,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    coverage: CoverageOpt = "slots",
    keep_going: KeepGoingOpt = False,
) -> None:
    """List every residual site with its rate (model, dpatch file or plain checkpoint).

    Many inputs print one line each (JSON Lines with --json).

    Example: dpatch inspect out.safetensors --json | jq '.sites[] | .rate'
    """
    from dpatch.files import inspect_many, is_many, read_manifest, report_from_manifest
    from dpatch.patching import inspect

    example_inputs = parse_inputs(input_shape, input_dtype)
    if is_many(models):
        check_single_only(weights=weights, pretrained=pretrained)
        batch = prepare(models, None, None, False, writes=False)
        results = inspect_many(
            batch,
            model=arch,
            keep_going=keep_going,
            allow_empty=allow_empty,
            example_inputs=example_inputs,
            coverage=coverage,
        )
        run_batch(results, len(batch.inputs), as_json=as_json, describe=_line)
        return
    model = models[0]
    path = Path(model)
    if path.is_file() and arch is None:
        manifest = read_manifest(path)
        if manifest is None:
            _plain_file(path, as_json)
            return
        report = report_from_manifest(manifest)
        extra: dict[str, Any] = {
            "file": str(path),
            "model": (manifest.get("model") or {}).get("spec"),
        }
        if not report.sites and not allow_empty:
            raise NoResidualSitesError(f"{model}: the file's manifest lists no residual branch")
    else:
        loaded = load(model, weights=weights, pretrained=pretrained, arch=arch, quiet=as_json)
        extra = {"model": loaded.spec.text if loaded.spec else model}
        with step("Tracing residual branches", as_json), about(extra["model"]):
            report = inspect(
                loaded.model, example_inputs, allow_empty=allow_empty, coverage=coverage
            )
    emit(report, as_json, extra, show_all=show_all)


def _line(result: FileResult) -> str:
    """One line for one inspected input."""
    from dpatch.patching import PatchReport

    report = result.report
    if not isinstance(report, PatchReport):
        info = result.info or {}
        return (
            f"{result.input}: no dpatch manifest ({info.get('tensors')} tensors, "
            f"{info.get('parameters', 0):,} values); pass --model NAME to list its sites"
        )
    top = max((s.rate for s in report.sites), default=0.0)
    return (
        f"{result.input}: {result.model or '?'}: {len(report.sites)} sites in "
        f"{report.blocks} blocks, mean rate {report.mean_rate:.4f}, max {top:.4f}, expected "
        f"depth {report.expected_depth:.2f} of {report.depth}"
    )


def _plain_file(path: Path, as_json: bool) -> None:
    """A checkpoint without a manifest: its size, and how to see its sites."""
    from dpatch.files import load_state_dict_file

    state = load_state_dict_file(path)
    info = {"tensors": len(state), "parameters": sum(t.numel() for t in state.values())}
    if as_json:
        doc = {"dpatch": __version__, "file": str(path), "manifest": None, **info, "sites": None}
        echo_json(doc)
    else:
        from dpatch.report import render_file_summary

        render_file_summary(out(), str(path), info)
