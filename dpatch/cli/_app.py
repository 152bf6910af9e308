"""The Typer app, the one place exceptions become a message and an exit code, and the
console helpers every command shares.

Nothing heavy is imported here or by any command module at import time: ``--help``,
``--version``, completion and usage errors answer without importing torch; each command
imports the library when it runs.

Exit codes: 0 success; 1 bad input or failed operation; 2 usage error (unknown option,
missing argument); 3 the model has no residual branch (unless ``--allow-empty``).
Errors are one line on stderr; ``DPATCH_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import io
import json
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from dpatch._version import __version__
from dpatch.errors import DPatchError, NoResidualSitesError, first_line

if TYPE_CHECKING:
    from rich.console import Console

    from dpatch.files import Target
    from dpatch.patching import PatchReport

__all__ = ["app", "echo_json", "emit", "err", "json_ready", "load", "note", "out", "step"]

#: What a command line user can do about an error of exactly this type.
_HINTS: dict[type[DPatchError], str] = {
    NoResidualSitesError: "pass --allow-empty to accept that",
}


class _Group(TyperGroup):
    """The one place where exceptions become a one-line message and an exit code."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        debug = os.environ.get("DPATCH_DEBUG") == "1"
        if args is None:
            args = sys.argv[1:]
        if not list(args) and complete_var is None and not _completing():
            # ``dpatch`` alone: the help, and success (Click would exit 2 with no message).
            args = ["--help"]
        try:
            code = super().main(
                args=args,
                prog_name=prog_name or "dpatch",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            code = 1
        except DPatchError as exc:
            if debug:
                traceback.print_exc()
            hint = _HINTS.get(type(exc))
            typer.echo(f"error: {first_line(exc, 500)}" + (f" ({hint})" if hint else ""), err=True)
            code = exc.exit_code
        except KeyboardInterrupt:
            typer.echo("error: interrupted; no output was written", err=True)
            code = 130
        except Exception as exc:
            if _is_usage_error(exc):  # unknown option, missing argument, bad integer, ...
                message = exc.format_message()  # type: ignore[attr-defined]
                where = _command_path(exc)
                typer.echo(f"error: {first_line(message, 500)} (see '{where} --help')", err=True)
                code = int(exc.exit_code)  # type: ignore[attr-defined]
            else:
                if debug:
                    traceback.print_exc()
                typer.echo(
                    f"error: unexpected {first_line(exc, 500, typed=True)} "
                    "(set DPATCH_DEBUG=1 for the traceback)",
                    err=True,
                )
                code = 1
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _completing() -> bool:
    """Shell completion is asking (Click's ``_DPATCH_COMPLETE`` variable is set)."""
    return any(k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ)


def _command_path(exc: BaseException) -> str:
    """``dpatch inject`` for an error in ``dpatch inject``'s arguments."""
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None)
    return str(path) if path else "dpatch"


def _is_usage_error(exc: BaseException) -> bool:
    # Click's exceptions (Typer vendors its own copy of Click in recent releases, so the
    # class is matched by its interface rather than imported).
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


app = typer.Typer(
    name="dpatch",
    cls=_Group,
    help="Add or retune stochastic depth (DropPath) in PyTorch models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dpatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Add or retune stochastic depth (DropPath) in PyTorch models.

    Exit codes: 0 ok, 1 bad input or failed operation, 2 usage error, 3 no residual branch.
    """


# --------------------------------------------------------------------------- output
def out() -> Console:
    """The console for results (stdout); wide when piped so tables do not wrap."""
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def err() -> Console:
    """The console for notes and progress (stderr)."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    return console if console.is_terminal else Console(stderr=True, highlight=False, width=200)


def note(message: str) -> None:
    err().print(f"note: {message}", markup=False)


@contextmanager
def step(message: str, quiet: bool = False) -> Iterator[None]:
    """A spinner on stderr while a slow step runs (terminals only).

    Whatever the libraries print meanwhile (torch.hub's "Downloading: ...") goes to stderr,
    so stdout carries only dpatch's own output (one JSON document with ``--json``).
    """
    console = err()
    with redirect_stdout(_NoteWriter()):
        if quiet or not console.is_terminal:
            yield
            return
        with console.status(message):
            yield


class _NoteWriter(io.TextIOBase):
    """Stands in for stdout during library calls: their lines go to stderr as notes."""

    def __init__(self) -> None:
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if line.strip():
                note(line.strip())
        return len(text)


def load(
    target: str, *, weights: Path | None, pretrained: bool, arch: str | None, quiet: bool
) -> Target:
    """:func:`dpatch.load_target` with a spinner, its notes on stderr."""
    from dpatch.files import load_target

    with step(f"Loading {target}", quiet):
        loaded = load_target(target, weights=weights, model=arch, pretrained=pretrained)
    for text in loaded.notes:
        note(text)
    return loaded


@contextmanager
def about(name: str) -> Iterator[None]:
    """Name the model in a "no residual branch" error (the library cannot know the name)."""
    try:
        yield
    except NoResidualSitesError as exc:
        raise type(exc)(f"{name}: {exc}") from exc


def emit(report: PatchReport, as_json: bool, extra: dict[str, Any], *, show_all: bool) -> None:
    """A report as one JSON document, or as a table."""
    if as_json:
        echo_json({"dpatch": __version__, **extra, **report.to_dict()})
    else:
        from dpatch.report import render_report

        title = extra.get("model")
        render_report(out(), report, title=str(title) if title else None, show_all=show_all)


#: Decimals of the floats ``--json`` prints: rates such as 0.07499999999999998 (a
#: schedule's arithmetic) print as 0.075. Files keep every bit (a manifest's rates are the
#: model's exact values).
JSON_DECIMALS = 10


def json_ready(value: Any) -> Any:
    """``value`` with every float rounded to :data:`JSON_DECIMALS` decimals."""
    if isinstance(value, float):
        return round(value, JSON_DECIMALS)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def echo_json(doc: Any, *, lines: bool = False) -> None:
    """One JSON document on stdout (``lines``: compact, one line, for JSON Lines)."""
    if lines:
        typer.echo(json.dumps(json_ready(doc), separators=(",", ":")))
    else:
        typer.echo(json.dumps(json_ready(doc), indent=2))
