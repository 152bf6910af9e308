"""``dpatch fold``: fold Huang's eval scaling into the weights, and save."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    PretrainedOpt,
    WeightsOpt,
    parse_inputs,
)
from dpatch.errors import InvalidValueError

__all__: list[str] = []


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
    from dpatch.depth import fold
    from dpatch.files import check_output, save

    check_output(output, force)
    example = parse_inputs(input_shape, input_dtype)
    loaded = load(model, weights=weights, pretrained=pretrained, arch=arch, quiet=as_json)
    name = loaded.spec.text if loaded.spec else model
    with step("Folding", as_json), about(name):
        result = fold(loaded.model, example_inputs=example)
    if not result.folded:
        raise InvalidValueError(
            f"nothing to fold in {name}: no site uses scaling 'expected' with a rate above 0 "
            "(fold is for models trained with --scaling expected); nothing written"
        )
    folded = result.to_dict()["folded"]
    depth = {"folded": folded} if folded else None
    with step(f"Saving {output}", as_json):
        save(loaded.model, output, result.report, spec=loaded.spec, force=force, depth=depth)
    if as_json:
        doc = {"dpatch": __version__, "model": name, "output": str(output)}
        echo_json({**doc, **result.to_dict()})
        return
    from dpatch.report import render_fold

    render_fold(out(), result)
    err().print(f"wrote {output}", markup=False)
