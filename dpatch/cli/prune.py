"""``dpatch prune``: remove residual branches (or whole layers) for inference, and save."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from dpatch._version import __version__
from dpatch.cli._app import about, app, echo_json, err, load, note, out, step
from dpatch.cli._options import (
    ArchOpt,
    BatchSizeOpt,
    DataOpt,
    ForceOpt,
    InputDtypeOpt,
    InputShapeOpt,
    JsonOpt,
    LimitOpt,
    ModelArg,
    PretrainedOpt,
    PrunedOutOpt,
    SyntheticOpt,
    WeightsOpt,
    parse_inputs,
)
from dpatch.cli.sensitivity import progress_bar
from dpatch.errors import InvalidValueError
from dpatch.settings import LAYER_METRICS, PRUNE_BY

__all__: list[str] = []

#: Random token ids a text model is measured on when no data is given (a smoke test).
_SMOKE_IDS = 8


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


def _layer_scores(
    model: Any,
    metric: str,
    *,
    data: Path | None,
    synthetic: int | None,
    limit: int | None,
    batch_size: int,
    example: Any,
    quiet: bool,
) -> tuple[Any, Any]:
    """``--by angular|bi``: the layers measured on the data (random ids for a text model
    given none: a smoke test, said so)."""
    from dpatch.depth import load_data, sensitivity

    with step("Loading data", quiet):
        if data is None and synthetic is None:
            ds = load_data(None, model, synthetic=_SMOKE_IDS, example_inputs=example)
            if ds.inputs.is_floating_point():
                raise InvalidValueError(
                    f"--by {metric} measures each layer on data; give --data PATH (or "
                    "--synthetic N for a smoke test)"
                )
            note(
                f"no --data: {ds.source}, a smoke test, not a measurement; give --data PATH "
                "for a real choice"
            )
        else:
            ds = load_data(data, model, synthetic=synthetic, limit=limit, example_inputs=example)
    with progress_bar("Measuring layers", quiet) as update:
        report = sensitivity(
            model, ds.inputs, batch_size=batch_size, progress=update, metric=metric
        )
    return report, ds


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
            metavar="rate|depth|every-other|angular|bi|FILE",
            help="Which first: highest rate, deepest, every other block, least sensitive "
            "(a dpatch sensitivity --json file), or whole layers by angular distance / Block "
            "Influence measured on --data (lowest first). Default: rate.",
        ),
    ] = None,
    data: DataOpt = None,
    synthetic: SyntheticOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchSizeOpt = 64,
    output: PrunedOutOpt = None,
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
    """Remove residual branches (each pruned block returns its shortcut) or whole layers, and
    save.

    Example: dpatch prune vit-dp.safetensors --drop 4 --by rate -o vit-pruned.safetensors
    """
    names = [s.strip() for s in sites.split(",") if s.strip()] if sites is not None else None
    if sites is not None and by is not None:
        raise InvalidValueError("--by chooses branches for --drop/--keep; --sites names them")
    rule, scores = _by(by)
    if rule not in LAYER_METRICS and (data is not None or synthetic is not None):
        raise InvalidValueError(
            "--data and --synthetic are for --by angular|bi (the layers are measured on them)"
        )
    from dpatch.depth import layers_of, measure_pruning, prune, pruned_layers
    from dpatch.files import check_output, check_output_dir, is_transformers_model, save

    example = parse_inputs(input_shape, input_dtype)
    as_dir = output is not None and output.suffix != ".safetensors"
    if output is not None and as_dir:
        source = Path(model[3:]).expanduser() if model.startswith("hf:") else None
        check_output_dir(output, force, source=source.resolve() if source else None)
    elif output is not None:
        check_output(output, force)
    loaded = load(model, weights=weights, pretrained=pretrained, arch=arch, quiet=as_json)
    name = loaded.spec.text if loaded.spec else model
    if as_dir and not is_transformers_model(loaded.model):
        raise InvalidValueError(
            f"-o {str(output)!r} would be a save_pretrained directory, which only transformers "
            "models have; give -o FILE.safetensors for a dpatch file"
        )
    measured, layer_report = None, None
    if rule in LAYER_METRICS and (drop is not None or keep is not None):
        with about(name):
            layer_report, measured = _layer_scores(
                loaded.model,
                rule,
                data=data,
                synthetic=synthetic,
                limit=limit,
                batch_size=batch_size,
                example=example,
                quiet=as_json,
            )
    with step("Pruning", as_json), about(name):
        report = prune(
            loaded.model,
            names,
            count=drop,
            keep=keep,
            by=rule,
            scores=layer_report if layer_report is not None else scores,
            inplace=False,
            example_inputs=example,
        )
    assert report.model is not None
    written, size, export = None, None, None
    if output is not None and as_dir:
        from dpatch.files import save_pretrained

        with step(f"Saving {output}", as_json), about(name):
            export = save_pretrained(report.model, output, force=force, example_inputs=example)
        written, size = str(output), sum(f.stat().st_size for f in output.rglob("*"))
    elif output is not None:
        with step(f"Saving {output}", as_json):
            save(report.model.cpu(), output, report, spec=loaded.spec, force=force)
        written, size = str(output), output.stat().st_size
    with step("Timing", as_json):
        stats = measure_pruning(
            loaded.model,
            report.model,
            device=device,
            iterations=iterations,
            example_inputs=example,
        )
    layers = layers_of(report.model, report.sites)
    gone = [layer.path for layer in pruned_layers(report.model, report.sites)]
    # whole layers were chosen (by a layer metric or a file of layer scores)
    by_layer = layer_report is not None or bool(scores and set(scores) <= {x.path for x in layers})
    if as_json:
        doc: dict[str, Any] = {"dpatch": __version__, "model": name, "output": written}
        doc["file_bytes"] = size
        doc["pruned_layers"] = gone
        doc["save_pretrained"] = export.to_dict() if export is not None else None
        if measured is not None and layer_report is not None:
            doc["measured"] = {
                "metric": layer_report.metric,
                "data": measured.source,
                "synthetic": measured.synthetic,
                "scores": layer_report.scores,
            }
        doc |= {"stats": stats.to_dict(), **report.to_dict()}
        echo_json(doc)
        return
    from dpatch.report import render_prune_stats, render_report

    render_report(out(), report, title=name)
    if by_layer:
        out().print(f"layers pruned whole: {', '.join(gone)}", highlight=False, markup=False)
    render_prune_stats(out(), stats, size)
    if export is not None:
        changed = [
            f"{k} {old!r} -> {new!r}" for c in export.plain.changes for k, old, new in c.config
        ]
        err().print(
            f"wrote {written} (save_pretrained, loads without dpatch"
            + "".join(f"; {c}" for c in changed)
            + ")",
            markup=False,
        )
    elif written:
        err().print(f"wrote {written}", markup=False)
