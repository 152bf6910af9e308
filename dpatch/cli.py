"""The ``dpatch`` command line: parses, calls the library, renders, maps errors to exit codes.

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

from dpatch import io as dio
from dpatch import zoo
from dpatch._version import __version__
from dpatch.errors import DPatchError, InvalidValueError, NoResidualSitesError, WeightsError
from dpatch.patch import PatchReport, inject, retune
from dpatch.patch import inspect as inspect_model
from dpatch.report import (
    render_file_summary,
    render_list,
    render_report,
    render_schedule,
)
from dpatch.schedule import SCHEDULES, check_rate, expected_depth, schedule_rates
from dpatch.sites import Site

__all__ = ["app", "main"]


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
            typer.echo(f"error: {_one_line(str(exc))}", err=True)
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
    help="Add or retune stochastic depth (DropPath) in PyTorch vision models.",
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
    """Add or retune stochastic depth (DropPath) in PyTorch vision models.

    Exit codes: 0 ok, 1 bad input or failed operation, 2 usage error, 3 no residual branch.
    """


# --------------------------------------------------------------------------- options
ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="timm:NAME, tv:NAME, hf-hub:ORG/NAME, package.module:factory, a bare NAME "
        "(timm first, then torchvision), or a .safetensors file written by dpatch.",
    ),
]
MaxRate = Annotated[
    str, typer.Option("--max-rate", metavar="R", help="Rate of the deepest block, in [0, 1).")
]
MinRate = Annotated[
    str,
    typer.Option("--min-rate", metavar="R", help="Rate of the first block (linear, cosine)."),
]
ScheduleOpt = Annotated[
    str,
    typer.Option(
        "--schedule",
        metavar="KIND",
        help="linear | uniform | huang | efficientnet | cosine | native | custom.",
    ),
]
RatesOpt = Annotated[
    str | None,
    typer.Option("--rates", metavar="R,R,...", help="Per-step rates for --schedule custom."),
]
ModeOpt = Annotated[
    str, typer.Option("--mode", metavar="row|batch", help="Drop per sample or whole batch.")
]
ScalingOpt = Annotated[
    str,
    typer.Option(
        "--scaling",
        metavar="inverted|expected|none",
        help="inverted: kept/(1-p) in training (timm); expected: x(1-p) in eval (Huang).",
    ),
]
PerOpt = Annotated[
    str,
    typer.Option("--per", metavar="block|branch", help="What one schedule step covers."),
]
SkipOpt = Annotated[
    bool,
    typer.Option("--skip", help="Compute dropped branches only where kept (training speed-up)."),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        metavar="FILE",
        help="Load a local state dict: .safetensors, or .pt/.pth (weights only).",
    ),
]
PretrainedOpt = Annotated[
    bool, typer.Option("--pretrained", help="Download the library's pretrained weights.")
]
OutOpt = Annotated[
    Path | None, typer.Option("-o", "--output", metavar="OUT", help="Write a .safetensors file.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Do everything but write OUT.")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout (logs go to stderr).")
]
AllowEmptyOpt = Annotated[
    bool,
    typer.Option("--allow-empty", help="Exit 0, not 3, when the model has no residual branch."),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--model", metavar="NAME", help="Architecture of a plain checkpoint given as MODEL."
    ),
]


# --------------------------------------------------------------------------- helpers
def _out() -> Console:
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def _err() -> Console:
    console = Console(stderr=True, highlight=False)
    return console if console.is_terminal else Console(stderr=True, highlight=False, width=200)


@contextmanager
def _step(message: str, quiet: bool = False) -> Iterator[None]:
    """A spinner on stderr while a slow step runs (terminals only).

    Whatever the libraries print meanwhile (torch.hub's "Downloading: ...") goes to stderr,
    so stdout carries only dpatch's own output (one JSON document with ``--json``).
    """
    err = _err()
    with redirect_stdout(_NoteWriter()):
        if quiet or not err.is_terminal:
            yield
            return
        with err.status(message):
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
                _note(line.strip())
        return len(text)


def _note(message: str) -> None:
    _err().print(f"note: {message}", markup=False)


def _parse_rate(text: str, flag: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InvalidValueError(f"{flag} must be a number in [0, 1), but got {text!r}") from None
    return check_rate(value, flag)


def _parse_rates(text: str | None) -> list[float] | None:
    if text is None:
        return None
    out: list[float] = []
    for i, tok in enumerate(t.strip() for t in text.split(",")):
        if not tok:
            raise InvalidValueError(f"--rates has an empty entry at position {i}: {text!r}")
        out.append(_parse_rate(tok, f"--rates entry {i}"))
    return out


def _choice(value: str, flag: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidValueError(f"{flag} {value!r} is unknown; choose one of: {', '.join(choices)}")
    return value


def _load_target(
    target: str,
    *,
    weights: Path | None,
    pretrained: bool,
    arch: str | None,
    quiet: bool,
) -> tuple[Any, zoo.ModelSpec | None]:
    """Build the model MODEL names (a spec or a dpatch file), with optional weights."""
    path = Path(target)
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or path.is_file():
        if not path.exists():
            raise WeightsError(f"file {target!r} does not exist")
        manifest = dio.read_manifest(path) if path.suffix != ".pt" else None
        if manifest is not None and arch is None:
            with _step(f"Rebuilding {target}", quiet):
                model = dio.load(path)
            return model, zoo.spec_of(model)
        if arch is None:
            raise WeightsError(
                f"{target!r} is a checkpoint without a dpatch manifest; pass --model NAME "
                "to say which architecture it holds"
            )
        weights, target = path, arch
    spec, note = zoo.parse_spec(target)
    if note:
        _note(note)
    with _step(f"Loading {spec.text}", quiet):
        model = zoo.create_model(spec, pretrained=pretrained)
    if weights is not None:
        with _step(f"Loading weights {weights}", quiet):
            dio.load_weights(model, weights, what=spec.text)
    return model, spec


def _emit(report: PatchReport, as_json: bool, extra: dict[str, Any], *, show_all: bool) -> None:
    if as_json:
        doc = {"dpatch": __version__, **extra, **report.to_dict()}
        typer.echo(json.dumps(doc, indent=2))
    else:
        title = extra.get("model")
        render_report(_out(), report, title=str(title) if title else None, show_all=show_all)


def _patch(
    target: str,
    *,
    max_rate: str,
    min_rate: str,
    schedule: str,
    rates: str | None,
    mode: str,
    scaling: str,
    per: str,
    skip: bool,
    weights: Path | None,
    pretrained: bool,
    output: Path | None,
    force: bool,
    dry_run: bool,
    as_json: bool,
    allow_empty: bool,
    arch: str | None,
    retuning: bool,
) -> None:
    hi = _parse_rate(max_rate, "--max-rate")
    lo = _parse_rate(min_rate, "--min-rate")
    rate_list = _parse_rates(rates)
    _choice(schedule, "--schedule", (*SCHEDULES, "native"))
    _choice(mode, "--mode", ("row", "batch"))
    _choice(scaling, "--scaling", ("inverted", "expected", "none"))
    _choice(per, "--per", ("block", "branch"))
    if rate_list is not None and schedule != "custom":
        raise InvalidValueError("--rates needs --schedule custom")
    if output is not None and not dry_run:
        dio.check_output(output, force)  # fail before the slow part
    model, spec = _load_target(
        target, weights=weights, pretrained=pretrained, arch=arch, quiet=as_json
    )
    action = retune if retuning else inject
    with _step("Tracing residual branches", as_json):
        try:
            report = action(
                model,
                max_rate=hi,
                schedule=schedule,
                min_rate=lo,
                rates=rate_list,
                mode=mode,
                scaling=scaling,
                per=per,
                skip=skip,
            )
        except NoResidualSitesError:
            if not allow_empty:
                raise
            report = inspect_model(model)
    if not report.sites and not allow_empty:
        raise NoResidualSitesError(
            f"{spec.text if spec else target} has no residual branch to put stochastic depth on"
            " (pass --allow-empty to accept that)"
        )
    written = None
    if output is not None and not dry_run:
        with _step(f"Saving {output}", as_json):
            dio.save(model, output, report, spec=spec, force=force)
        written = str(output)
    extra = {
        "model": spec.text if spec else target,
        "output": written,
        "dry_run": dry_run,
    }
    _emit(report, as_json, extra, show_all=False)
    if not as_json:
        if written:
            _err().print(f"wrote {written}", markup=False)
        elif dry_run and output is not None:
            _err().print(f"dry run: would write {output}", markup=False)


# --------------------------------------------------------------------------- commands
def _register_patch_command(name: str, retuning: bool, doc: str) -> None:
    """``inject`` and ``retune`` take the same options; only the operation differs."""

    def command(
        model: ModelArg,
        max_rate: MaxRate = "0.1",
        min_rate: MinRate = "0",
        schedule: ScheduleOpt = "linear",
        rates: RatesOpt = None,
        mode: ModeOpt = "row",
        scaling: ScalingOpt = "inverted",
        per: PerOpt = "block",
        skip: SkipOpt = False,
        weights: WeightsOpt = None,
        pretrained: PretrainedOpt = False,
        output: OutOpt = None,
        force: ForceOpt = False,
        dry_run: DryRunOpt = False,
        as_json: JsonOpt = False,
        allow_empty: AllowEmptyOpt = False,
        arch: ArchOpt = None,
    ) -> None:
        _patch(
            model,
            max_rate=max_rate,
            min_rate=min_rate,
            schedule=schedule,
            rates=rates,
            mode=mode,
            scaling=scaling,
            per=per,
            skip=skip,
            weights=weights,
            pretrained=pretrained,
            output=output,
            force=force,
            dry_run=dry_run,
            as_json=as_json,
            allow_empty=allow_empty,
            arch=arch,
            retuning=retuning,
        )

    command.__doc__ = doc
    command.__name__ = f"{name}_cmd"
    app.command(name)(command)


_register_patch_command(
    "inject",
    False,
    """Put DropPath on every residual branch with a per-layer schedule, and save.

    Example: dpatch inject resnet50 --max-rate 0.2 -o resnet50-dp.safetensors
    """,
)
_register_patch_command(
    "retune",
    True,
    """Change the rates of an existing patch (a dpatch file) or of native slots, and save.

    Example: dpatch retune resnet50-dp.safetensors --max-rate 0.3 -o resnet50-dp3.safetensors
    """,
)


@app.command("inspect")
def inspect_cmd(
    model: ModelArg,
    as_json: JsonOpt = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="List every note (skipped blocks and why).")
    ] = False,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    arch: ArchOpt = None,
    allow_empty: AllowEmptyOpt = False,
) -> None:
    """List every residual site with its rate (model, dpatch file or plain checkpoint).

    Example: dpatch inspect out.safetensors --json | jq '.sites[] | .rate'
    """
    path = Path(model)
    if path.is_file() and arch is None:
        manifest = dio.read_manifest(path)
        if manifest is None:
            info = _file_info(path)
            if as_json:
                typer.echo(
                    json.dumps(
                        {
                            "dpatch": __version__,
                            "file": str(path),
                            "manifest": None,
                            **info,
                            "sites": None,
                        },
                        indent=2,
                    )
                )
            else:
                render_file_summary(_out(), str(path), info)
            return
        report = _report_from_manifest(manifest)
        extra = {"file": str(path), "model": (manifest.get("model") or {}).get("spec")}
    else:
        loaded, spec = _load_target(
            model, weights=weights, pretrained=pretrained, arch=arch, quiet=as_json
        )
        with _step("Tracing residual branches", as_json):
            report = inspect_model(loaded)
        extra = {"model": spec.text if spec else model}
    if not report.sites and not allow_empty:
        raise NoResidualSitesError(
            f"{extra.get('model') or model} has no residual branch (pass --allow-empty to "
            "accept that)"
        )
    _emit(report, as_json, extra, show_all=show_all)


def _file_info(path: Path) -> dict[str, Any]:
    state = dio.load_state_dict_file(path)
    return {"tensors": len(state), "parameters": sum(t.numel() for t in state.values())}


def _report_from_manifest(manifest: dict[str, Any]) -> PatchReport:
    """A report from a file's manifest alone, without building the model."""
    try:
        sites = tuple(
            Site(**{k: d[k] for k in Site.__dataclass_fields__ if k in d})
            for d in manifest.get("sites", [])
        )
    except TypeError as exc:
        from dpatch.errors import ManifestError

        raise ManifestError(f"the manifest's sites are malformed ({exc})") from exc
    sched = manifest.get("schedule") or {}
    steps = [float(r) for r in sched.get("rates") or []]
    return PatchReport(
        sites=sites,
        schedule=str(sched.get("schedule") or "current"),
        per=str(sched.get("per") or "block"),
        max_rate=float(sched.get("max_rate") or 0.0),
        min_rate=float(sched.get("min_rate") or 0.0),
        mode=str(sched.get("mode") or "row"),
        scaling=str(sched.get("scaling") or "inverted"),
        skip=bool(sched.get("skip")),
        rates=tuple(steps),
        expected_depth=expected_depth(steps),
    )


@app.command("schedule")
def schedule_cmd(
    depth: Annotated[int, typer.Option("--depth", metavar="N", help="Number of blocks.")],
    max_rate: MaxRate = "0.1",
    min_rate: MinRate = "0",
    schedule: ScheduleOpt = "linear",
    rates: RatesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a schedule without loading a model.

    Example: dpatch schedule --depth 12 --max-rate 0.2 --schedule cosine
    """
    _choice(schedule, "--schedule", SCHEDULES)
    values = schedule_rates(
        schedule,
        depth,
        _parse_rate(max_rate, "--max-rate"),
        _parse_rate(min_rate, "--min-rate"),
        _parse_rates(rates),
    )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "schedule": schedule,
                    "depth": depth,
                    "rates": values,
                    "expected_depth": expected_depth(values),
                },
                indent=2,
            )
        )
    else:
        render_schedule(_out(), schedule, values, expected_depth(values))


@app.command("list")
def list_cmd(
    pattern: Annotated[
        str | None, typer.Argument(metavar="PATTERN", help="fnmatch filter, e.g. 'resnet*'.")
    ] = None,
    source: Annotated[
        str | None, typer.Option("--source", metavar="timm|tv", help="Only one library.")
    ] = None,
    native_only: Annotated[
        bool, typer.Option("--native", help="Only models with native DropPath slots.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List model names from timm and torchvision, marking those with native slots.

    Example: dpatch list 'convnext*' --native
    """
    if source is not None:
        _choice(source, "--source", ("timm", "tv", "torchvision"))
    entries = zoo.list_models(pattern, source)
    if native_only:
        entries = [e for e in entries if e.native]
    if as_json:
        typer.echo(json.dumps([{"model": e.spec, "native": e.native} for e in entries], indent=2))
    else:
        render_list(_out(), entries)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
