"""The Typer app, the one place exceptions become a message and an exit code, and the
console helpers every command shares.

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
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from dpatch._version import __version__
from dpatch.errors import DPatchError, NoResidualSitesError
from dpatch.files import Target, load_target
from dpatch.patching import PatchReport
from dpatch.report import render_report

__all__ = ["app", "emit", "err", "load", "note", "out", "step"]

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
            typer.echo(f"error: {_one_line(str(exc))}" + (f" ({hint})" if hint else ""), err=True)
            code = exc.exit_code
        except KeyboardInterrupt:
            typer.echo("error: interrupted; no output was written", err=True)
            code = 130
        except Exception as exc:
            if _is_usage_error(exc):  # unknown option, missing argument, bad integer, ...
                message = exc.format_message()  # type: ignore[attr-defined]
                typer.echo(f"error: {_one_line(message)} (see 'dpatch --help')", err=True)
                code = int(exc.exit_code)  # type: ignore[attr-defined]
            else:
                if debug:
                    traceback.print_exc()
                typer.echo(
                    f"error: unexpected {type(exc).__name__}: {_one_line(str(exc))} "
                    "(set DPATCH_DEBUG=1 for the traceback)",
                    err=True,
                )
                code = 1
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _is_usage_error(exc: BaseException) -> bool:
    # Click's exceptions (Typer vendors its own copy of Click in recent releases, so the
    # class is matched by its interface rather than imported).
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines)[:500] if lines else "(no message)"


app = typer.Typer(
    name="dpatch",
    cls=_Group,
    help="Add or retune stochastic depth (DropPath) in PyTorch models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
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
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def err() -> Console:
    """The console for notes and progress (stderr)."""
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
        doc = {"dpatch": __version__, **extra, **report.to_dict()}
        typer.echo(json.dumps(doc, indent=2))
    else:
        title = extra.get("model")
        render_report(out(), report, title=str(title) if title else None, show_all=show_all)
