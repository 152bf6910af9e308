"""``dpatch sensitivity``, ``dpatch prune`` and ``dpatch fold``: measuring, removing and
folding residual branches."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from dpatch._version import __version__
from dpatch.cli._app import about, app, err, load, out, step
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
    parse_rate,
)
from dpatch.depth import (
    BY,
    fold,
    load_data,
    measure_pruning,
    prune,
    read_scores,
    sensitivity,
    suggestion,
)
from dpatch.errors import InvalidValueError
from dpatch.files import atomic_write, check_output, save
from dpatch.report import render_fold, render_prune_stats, render_report, render_sensitivity

__all__: list[str] = []

_SMOKE = "synthetic inputs: a smoke test, not a measurement"


@contextmanager
def _progress(total_hint: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar over sites on stderr, only when stdout is a terminal."""
    if quiet or not sys.stdout.isatty():
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err(),
        transient=True,
    ) as bar:
        task = bar.add_task(total_hint, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.command("sensitivity")
def sensitivity_cmd(
    model: ModelArg,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            metavar="PATH",
            help="An ImageFolder directory, or a .safetensors/.pt file with 'inputs' "
            "(and 'targets').",
        ),
    ] = None,
    synthetic: Annotated[
        int | None,
        typer.Option("--synthetic", metavar="N", help="N random inputs (a smoke test only)."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", metavar="N", help="Use at most N samples.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", metavar="N", help="Inputs per forward pass.")
    ] = 64,
    suggest: Annotated[
        str | None,
        typer.Option(
            "--suggest",
            metavar="MAX_RATE",
            help="Write per-branch rates (least sensitive: MAX_RATE, most: 0) to -o, for "
            "inject --schedule custom --per branch --rates-from.",
        ),
    ] = None,
    output: OutOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    arch: ArchOpt = None,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
) -> None:
    """Measure what each residual branch is worth: the model with that branch removed.

    Example: dpatch sensitivity timm:resnet18 --data val/ --suggest 0.3 -o rates.json
    """
    top = parse_rate(suggest, "--suggest") if suggest is not None else None
    example = parse_inputs(input_shape, input_dtype)
    if (top is None) != (output is None):
        raise InvalidValueError("--suggest MAX_RATE and -o FILE go together (-o gets the rates)")
    if output is not None:
        check_output(output, force)
    loaded = load(model, weights=weights, pretrained=pretrained, arch=arch, quiet=as_json)
    name = loaded.spec.text if loaded.spec else model
    with step("Loading data", as_json):
        ds = load_data(data, loaded.model, synthetic=synthetic, limit=limit, example_inputs=example)
    with _progress("Removing branches", as_json) as update, about(name):
        report = sensitivity(
            loaded.model, ds.inputs, ds.targets, batch_size=batch_size, progress=update
        )
    written = None
    if top is not None and output is not None:
        doc = suggestion(report, top, model=name)
        text = json.dumps(doc, indent=2)
        atomic_write(output, lambda tmp: _write_text(tmp, text), force=force)
        written = str(output)
    if as_json:
        head: dict[str, Any] = {"dpatch": __version__, "model": name, "data": ds.source}
        head["synthetic"] = ds.synthetic
        if ds.synthetic:
            head["note"] = _SMOKE
        typer.echo(json.dumps({**head, **report.to_dict(), "output": written}, indent=2))
        return
    render_sensitivity(out(), report, title=name, source=ds.source, synthetic=ds.synthetic)
    if written:
        err().print(f"wrote {written}", markup=False)


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text + "\n")


def _by(by: str | None) -> tuple[str, dict[str, float] | None]:
    """``--by``: a rule name, or a sensitivity JSON file."""
    if by is None:
        return "rate", None
    if by in BY and by != "sensitivity":
        return by, None
    if not os.path.isfile(by):
        rules = ", ".join(b for b in BY if b != "sensitivity")
        raise InvalidValueError(f"--by {by!r} is neither {rules} nor an existing JSON file")
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
        typer.echo(json.dumps(doc, indent=2))
        return
    render_report(out(), report, title=name)
    render_prune_stats(out(), stats, size)
    if written:
        err().print(f"wrote {written}", markup=False)


@app.command("fold")
def fold_cmd(
    model: ModelArg,
    output: Annotated[
        Path, typer.Option("-o", "--output", metavar="OUT", help="Write a .safetensors file.")
    ],
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    arch: ArchOpt = None,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
) -> None:
    """Fold each 'expected'-scaling site's (1 - p) into its branch's weights, and save.

    Example: dpatch fold huang-trained.safetensors -o folded.safetensors
    """
    check_output(output, force)
    example = parse_inputs(input_shape, input_dtype)
    loaded = load(model, weights=weights, pretrained=pretrained, arch=arch, quiet=as_json)
    name = loaded.spec.text if loaded.spec else model
    with step("Folding", as_json), about(name):
        result = fold(loaded.model, example_inputs=example)
    folded = result.to_dict()["folded"]
    depth = {"folded": folded} if folded else None
    with step(f"Saving {output}", as_json):
        save(loaded.model, output, result.report, spec=loaded.spec, force=force, depth=depth)
    if as_json:
        doc = {"dpatch": __version__, "model": name, "output": str(output)}
        typer.echo(json.dumps({**doc, **result.to_dict()}, indent=2))
        return
    render_fold(out(), result)
    err().print(f"wrote {output}", markup=False)
