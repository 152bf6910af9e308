"""``dpatch list``: model names from timm, torchvision and transformers."""

from __future__ import annotations

from typing import Annotated

import typer

from dpatch.cli._app import app, echo_json, out
from dpatch.cli._options import JsonOpt, complete
from dpatch.errors import InvalidValueError
from dpatch.settings import SOURCES

__all__: list[str] = []


@app.command("list")
def list_cmd(
    pattern: Annotated[
        str | None,
        typer.Argument(
            metavar="PATTERN", help="A word (matched anywhere) or a glob, e.g. 'resnet*'."
        ),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            metavar="timm|tv|hf",
            help="Only one library.",
            autocompletion=complete(SOURCES),
        ),
    ] = None,
    native_only: Annotated[
        bool, typer.Option("--native", help="Only models with native DropPath slots.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List model names from timm, torchvision (every task) and transformers (vision
    classes, when installed), marking those with native slots.

    Example: dpatch list 'convnext*' --native
    """
    if source is not None and source not in SOURCES:
        raise InvalidValueError(
            f"--source {source!r} is unknown; choose one of: {', '.join(SOURCES)}"
        )
    from dpatch.models import list_models

    entries = list_models(pattern, source)
    if native_only:
        entries = [e for e in entries if e.native]
    if as_json:
        echo_json([{"model": e.spec, "native": e.native, "task": e.task} for e in entries])
    else:
        from dpatch.report import render_list

        render_list(out(), entries)
