"""Options shared by several commands (Typer ``Annotated`` aliases) and their parsers.

Choice lists come from the library (``SCHEDULES``, ``MODES``, ``SCALINGS``, ``PER``), so the
command line never spells them twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dpatch.droppath import MODES, SCALINGS
from dpatch.errors import InvalidValueError
from dpatch.patch import PER
from dpatch.schedule import SCHEDULES, check_rate

__all__ = [
    "AllowEmptyOpt",
    "ArchOpt",
    "DryRunOpt",
    "ForceOpt",
    "JsonOpt",
    "KeepModeOpt",
    "KeepScalingOpt",
    "KeepSkipOpt",
    "MaxRate",
    "MinRate",
    "ModeOpt",
    "ModelArg",
    "OutOpt",
    "PerOpt",
    "PretrainedOpt",
    "RatesOpt",
    "ScalingOpt",
    "ScheduleOpt",
    "SkipOpt",
    "WeightsOpt",
    "parse_rate",
    "parse_rates",
]


def _bar(choices: tuple[str, ...]) -> str:
    return "|".join(choices)


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
    typer.Option("--schedule", metavar="KIND", help=" | ".join((*SCHEDULES, "native")) + "."),
]
RatesOpt = Annotated[
    str | None,
    typer.Option("--rates", metavar="R,R,...", help="Per-step rates for --schedule custom."),
]
ModeOpt = Annotated[
    str, typer.Option("--mode", metavar=_bar(MODES), help="Drop per sample or whole batch.")
]
ScalingOpt = Annotated[
    str,
    typer.Option(
        "--scaling",
        metavar=_bar(SCALINGS),
        help="inverted: kept/(1-p) in training (timm); expected: x(1-p) in eval (Huang).",
    ),
]
KeepModeOpt = Annotated[
    str | None,
    typer.Option(
        "--mode", metavar=_bar(MODES), help="Drop per sample or whole batch (default: keep)."
    ),
]
KeepScalingOpt = Annotated[
    str | None,
    typer.Option(
        "--scaling",
        metavar=_bar(SCALINGS),
        help="inverted | expected | none (default: keep each site's).",
    ),
]
KeepSkipOpt = Annotated[
    bool | None,
    typer.Option(
        "--skip/--no-skip",
        help="Turn compute-skipping on or off (default: keep each site's).",
        show_default=False,
    ),
]
PerOpt = Annotated[
    str, typer.Option("--per", metavar=_bar(PER), help="What one schedule step covers.")
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


def parse_rate(text: str, flag: str) -> float:
    """A rate option's text as a float in [0, 1), or an error naming the flag and value."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InvalidValueError(f"{flag} must be a number in [0, 1), but got {text!r}") from None
    return check_rate(value, flag)


def parse_rates(text: str | None) -> list[float] | None:
    """``--rates R,R,...`` as floats (None when not given)."""
    if text is None:
        return None
    out: list[float] = []
    for i, tok in enumerate(t.strip() for t in text.split(",")):
        if not tok:
            raise InvalidValueError(f"--rates has an empty entry at position {i}: {text!r}")
        out.append(parse_rate(tok, f"--rates entry {i}"))
    return out
