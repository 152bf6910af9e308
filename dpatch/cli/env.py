"""``dpatch env``: what a bug report needs, in one command."""

from __future__ import annotations

from typing import Annotated

import typer

from dpatch.cli._app import app, echo_json
from dpatch.cli._options import JsonOpt

__all__: list[str] = []


@app.command("env")
def env_cmd(
    as_json: JsonOpt = False,
    check: Annotated[
        bool,
        typer.Option(
            "--self-check/--no-self-check",
            help="Run the Triton kernels' self-check where they are in use (default: yes).",
        ),
    ] = True,
) -> None:
    """Print versions (dpatch, Python, torch, torchvision, timm, transformers, Lightning,
    Triton), the CUDA devices, whether dpatch's kernels are on, interpreted or off and
    their self-check, and the DPATCH_* variables: paste it into a bug report.

    Example: dpatch env --json
    """
    from dpatch.env import collect  # imports torch: only when the command runs

    report = collect(self_check=check)
    if as_json:
        echo_json(report.to_dict())
    else:
        typer.echo("\n".join(report.lines()))
