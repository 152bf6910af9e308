"""``dpatch prune``: remove residual branches for inference, and save."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from dpatch._version import __version__
from dpatch.cli._app import about, app, echo_json, err, load, out, step
from dpatch.cli._options import (
    ArchOpt,
    ForceOpt,
    InputDtypeOpt,
    InputShapeOpt,
    JsonOpt,
    ModelArg,
    OutOpt,
    PretrainedOpt,
    WeightsOpt,
    parse_inputs,
)
from dpatch.errors import InvalidValueError
from dpatch.settings import PRUNE_BY

__all__: list[str] = []


def _by(by: str | None) -> tuple[str, dict[str, float] | None]:
    """``--by``: a rule name, or a sensitivity JSON file."""
    if by is None:
        return "rate", None
    if by in PRUNE_BY and by != "sensitivity":
        return by, None
    if not os.path.isfile(by):
        rules = ", ".join(b for b in PRUNE_BY if b != "sensitivity")
        raise InvalidValueError(f"--by {by!r} is neither {rules} nor an existing JSON file")
    from dpatch.depth import read_scores

    return "sensitivity", read_scores(by)


@app.command("prune")
def prune_cmd(
    model: ModelArg,
    sites: Annotated[
        str | None, typer.Option("--sites", metavar="A,B,...", help="Site names to prune.")
    ] = None,
    drop: Annotated[
        int | None, typer.Option("--drop", metavar="N", help="Prune N branches (chosen --by).")
    ] = None,
    keep: Annotated[
        int | None, typer.Option("--keep", metavar="N", help="Keep N branches, prune the rest.")
    ] = None,
    by: Annotated[
        str | None,
        typer.Option(
            "--by",
            metavar="rate|depth|every-other|FILE",
            help="Which first: highest rate, deepest, every other block, or least sensitive "
            "(a dpatch sensitivity --json file). Default: rate.",
        ),
    ] = None,
    output: OutOpt = None,
    force: ForceOpt = False,
    device: Annotated[
        str, typer.Option("--device", metavar="DEVICE", help="Where to time eval latency.")
    ] = "cpu",
    iterations: Annotated[
        int, typer.Option("--iterations", metavar="N", help="Timed forward passes per model.")
    ] = 10,
    as_json: JsonOpt = False,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    arch: ArchOpt = None,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
) -> None:
    """Remove residual branches: each pruned block returns its shortcut, and save.

    Example: dpatch prune vit-dp.safetensors --drop 4 --by rate -o vit-pruned.safetensors
    """
    names = [s.strip() for s in sites.split(",") if s.strip()] if sites is not None else None
    if sites is not None and by is not None:
        raise InvalidValueError("--by chooses branches for --drop/--keep; --sites names them")
    rule, scores = _by(by)
    from dpatch.depth import measure_pruning, prune
    from dpatch.files import check_output, save

    example = parse_inputs(input_shape, input_dtype)
    if output is not None:
        check_output(output, force)
    loaded = load(model, weights=weights, pretrained=pretrained, arch=arch, quiet=as_json)
    name = loaded.spec.text if loaded.spec else model
    with step("Pruning", as_json), about(name):
        report = prune(
            loaded.model,
            names,
            count=drop,
            keep=keep,
            by=rule,
            scores=scores,
            inplace=False,
            example_inputs=example,
        )
    assert report.model is not None
    with step("Timing", as_json):
        stats = measure_pruning(
            loaded.model,
            report.model,
            device=device,
            iterations=iterations,
            example_inputs=example,
        )
    written, size = None, None
    if output is not None:
        with step(f"Saving {output}", as_json):
            save(report.model.cpu(), output, report, spec=loaded.spec, force=force)
        written, size = str(output), output.stat().st_size
    if as_json:
        doc: dict[str, Any] = {"dpatch": __version__, "model": name, "output": written}
        doc["file_bytes"] = size
        doc |= {"stats": stats.to_dict(), **report.to_dict()}
        echo_json(doc)
        return
    from dpatch.report import render_prune_stats, render_report

    render_report(out(), report, title=name)
    render_prune_stats(out(), stats, size)
    if written:
        err().print(f"wrote {written}", markup=False)
