"""``dpatch sensitivity``: what each residual branch is worth (the model evaluated with that
branch removed), or each layer (angular distance, Block Influence)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from dpatch._version import __version__
from dpatch.cli._app import about, app, echo_json, err, load, out, step
from dpatch.cli._options import (
    ArchOpt,
    BatchSizeOpt,
    DataOpt,
    ForceOpt,
    InputDtypeOpt,
    InputShapeOpt,
    JsonOpt,
    LimitOpt,
    MetricOpt,
    ModelArg,
    OutOpt,
    PretrainedOpt,
    SyntheticOpt,
    WeightsOpt,
    parse_inputs,
    parse_rate,
)
from dpatch.errors import InvalidValueError
from dpatch.settings import METRICS, check_choice

__all__: list[str] = []

_SMOKE = "synthetic inputs: a smoke test, not a measurement"


@contextmanager
def progress_bar(total_hint: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr (over sites or batches), only when stdout is a terminal."""
    if quiet or not sys.stdout.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

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
    data: DataOpt = None,
    synthetic: SyntheticOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchSizeOpt = 64,
    suggest: Annotated[
        str | None,
        typer.Option(
            "--suggest",
            metavar="MAX_RATE",
            help="Write per-branch rates (least sensitive: MAX_RATE, most: 0) to -o, for "
            "inject --schedule custom --per branch --rates-from.",
        ),
    ] = None,
    metric: MetricOpt = "loss",
    output: OutOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    arch: ArchOpt = None,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
) -> None:
    """Measure what each residual branch (the model with it removed) or layer (how much it
    changes its hidden state) is worth.

    Example: dpatch sensitivity timm:resnet18 --data val/ --suggest 0.3 -o rates.json
    """
    check_choice(metric, "--metric", METRICS)
    top = parse_rate(suggest, "--suggest") if suggest is not None else None
    if (top is None) != (output is None):
        raise InvalidValueError("--suggest MAX_RATE and -o FILE go together (-o gets the rates)")
    if top is not None and metric != "loss":
        raise InvalidValueError(
            f"--suggest needs per-branch scores (--metric loss); --metric {metric} gives one "
            "score per layer"
        )
    from dpatch.depth import load_data, sensitivity, suggestion
    from dpatch.files import atomic_write, check_output

    example = parse_inputs(input_shape, input_dtype)
    if output is not None:
        check_output(output, force)
    loaded = load(model, weights=weights, pretrained=pretrained, arch=arch, quiet=as_json)
    name = loaded.spec.text if loaded.spec else model
    with step("Loading data", as_json):
        ds = load_data(data, loaded.model, synthetic=synthetic, limit=limit, example_inputs=example)
    what = "Removing branches" if metric == "loss" else "Measuring layers"
    with progress_bar(what, as_json) as update, about(name):
        report = sensitivity(
            loaded.model,
            ds.inputs,
            ds.targets,
            batch_size=batch_size,
            progress=update,
            metric=metric,
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
        echo_json({**head, **report.to_dict(), "output": written})
        return
    from dpatch.report import render_sensitivity

    render_sensitivity(out(), report, title=name, source=ds.source, synthetic=ds.synthetic)
    if written:
        err().print(f"wrote {written}", markup=False)


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text + "\n")
