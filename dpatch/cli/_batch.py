"""Many inputs per command: the options that take them, and one loop that shows a progress
bar (terminals only), one line per input (JSON Lines with ``--json``) and exits with the
worst exit code. The work itself is :mod:`dpatch.files`'s."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dpatch.cli._app import echo_json, err, out, step
from dpatch.errors import InvalidValueError
from dpatch.settings import DEFAULT_TEMPLATE

if TYPE_CHECKING:
    from dpatch.files import Batch, FileResult

__all__ = [
    "KeepGoingOpt",
    "ModelsArg",
    "TemplateOpt",
    "check_single_only",
    "prepare",
    "run_batch",
]

ModelsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="MODEL",
        help="timm:NAME, tv:NAME, hf-hub:ORG/NAME, package.module:factory, a bare NAME "
        "(timm first, then torchvision), or checkpoint files: .safetensors written by "
        "dpatch, plain state dicts with --model, folders and globs ('ckpt/*.pt').",
    ),
]
TemplateOpt = Annotated[
    str | None,
    typer.Option(
        "--output-template",
        metavar="TEMPLATE",
        help="Output name inside -o DIR for many inputs: {stem}, {name}, {parent}, {index} "
        f"(default {DEFAULT_TEMPLATE}).",
    ),
]
KeepGoingOpt = Annotated[
    bool, typer.Option("--keep-going", help="With many inputs, carry on past a failing one.")
]


def check_single_only(**given: object) -> None:
    """Options that apply to one model only (``--weights``, ``--pretrained``)."""
    for flag, value in given.items():
        if value:
            raise InvalidValueError(
                f"--{flag} applies to a single MODEL; with many inputs, give checkpoint files"
            )


def prepare(
    models: list[str], output: Path | None, template: str | None, force: bool, *, writes: bool
) -> Batch:
    """:func:`dpatch.files.prepare_batch` (``-o`` is a folder here)."""
    from dpatch.files import prepare_batch

    return prepare_batch(
        models,
        out_dir=output if writes else None,
        template=template or DEFAULT_TEMPLATE,
        force=force,
    )


def run_batch(
    results: Iterator[FileResult],
    total: int,
    *,
    as_json: bool,
    describe: Callable[[FileResult], str],
    details: Callable[[FileResult], list[str]] | None = None,
) -> None:
    """Print one line per input as results come, then exit with the worst exit code."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    started = time.perf_counter()
    worst = ok = 0
    console = err()
    show_bar = not as_json and console.is_terminal and out().is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not show_bar,
    )
    seen = 0
    with progress:
        task = progress.add_task("checkpoints", total=total)
        while True:
            with step("", quiet=True):  # what libraries print goes to stderr as notes
                result = next(results, None)
            if result is None:
                break
            seen += 1
            progress.advance(task)
            worst = max(worst, result.exit_code)
            ok += result.ok
            _show(result, as_json, describe, details)
    if not as_json:
        failed = seen - ok
        stopped = f"; stopped after a failure ({total - seen} not run)" if seen < total else ""
        console.print(
            f"{seen} inputs: {ok} ok, {failed} failed{stopped} "
            f"({time.perf_counter() - started:.1f} s)",
            markup=False,
            highlight=False,
        )
    raise typer.Exit(worst)


def _show(
    result: FileResult,
    as_json: bool,
    describe: Callable[[FileResult], str],
    details: Callable[[FileResult], list[str]] | None,
) -> None:
    if as_json:
        echo_json(result.to_dict(), lines=True)
        return
    if result.error is not None:
        err().print(
            f"error: {result.input}: {result.error}", markup=False, highlight=False, soft_wrap=True
        )
        return
    out().print(describe(result), markup=False, highlight=False, soft_wrap=True)
    for line in details(result) if details is not None else []:
        err().print(line, markup=False, highlight=False, soft_wrap=True)
