"""Options shared by several commands (Typer ``Annotated`` aliases) and their parsers.

Choice lists come from the library (``SCHEDULES``, ``MODES``, ``SCALINGS``, ``PER``,
``COVERAGES``), so the command line never spells them twice, and shell completion offers
them. Nothing here imports torch until an input shape is parsed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dpatch.errors import InvalidValueError
from dpatch.schedule import PER, SCHEDULES, check_rate
from dpatch.settings import COVERAGES, METRICS, MODES, SCALINGS, TIES, Settings

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "AllowEmptyOpt",
    "ArchOpt",
    "BatchSizeOpt",
    "CoverageOpt",
    "DataOpt",
    "DryRunOpt",
    "ForceOpt",
    "InputDtypeOpt",
    "InputShapeOpt",
    "JsonOpt",
    "LimitOpt",
    "MaxRate",
    "MetricOpt",
    "MinRate",
    "ModeOpt",
    "ModelArg",
    "OutOpt",
    "PerOpt",
    "PretrainedOpt",
    "PrunedOutOpt",
    "RatesFromOpt",
    "RatesOpt",
    "RecipeOpt",
    "ScalingOpt",
    "ScheduleOpt",
    "SizeOpt",
    "SkipOpt",
    "SyntheticOpt",
    "TieOpt",
    "WeightsOpt",
    "complete",
    "parse_inputs",
    "parse_rate",
    "parse_rates",
    "parse_settings",
]


def _bar(choices: tuple[str, ...]) -> str:
    return "|".join(choices)


def complete(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """Shell completion offering ``choices`` (``--schedule <TAB>``: the schedule kinds)."""

    def offer(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete)]

    return offer


ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="timm:NAME, tv:NAME, hf-hub:ORG/NAME, package.module:factory, a bare NAME "
        "(timm first, then torchvision), or a .safetensors file written by dpatch.",
    ),
]
MaxRate = Annotated[
    str | None,
    typer.Option(
        "--max-rate", metavar="R", help="Rate of the deepest block, in [0, 1) (default 0.1)."
    ),
]
MinRate = Annotated[
    str | None,
    typer.Option(
        "--min-rate", metavar="R", help="Rate of the first block (linear, cosine; default 0)."
    ),
]
ScheduleOpt = Annotated[
    str | None,
    typer.Option(
        "--schedule",
        metavar="KIND",
        help=" | ".join((*SCHEDULES, "native")) + " (default linear).",
        autocompletion=complete((*SCHEDULES, "native")),
    ),
]
RatesOpt = Annotated[
    str | None,
    typer.Option("--rates", metavar="R,R,...", help="Per-step rates for --schedule custom."),
]
RatesFromOpt = Annotated[
    Path | None,
    typer.Option(
        "--rates-from",
        metavar="FILE",
        help="Per-step rates for --schedule custom from a JSON list, or the file "
        "dpatch sensitivity --suggest writes (with --per branch).",
    ),
]
ModeOpt = Annotated[
    str | None,
    typer.Option(
        "--mode",
        metavar=_bar(MODES),
        help="Drop per sample (default) or whole batch.",
        autocompletion=complete(MODES),
    ),
]
ScalingOpt = Annotated[
    str | None,
    typer.Option(
        "--scaling",
        metavar=_bar(SCALINGS),
        help="inverted (default): kept/(1-p) in training (timm); expected: x(1-p) in eval (Huang).",
        autocompletion=complete(SCALINGS),
    ),
]
PerOpt = Annotated[
    str | None,
    typer.Option(
        "--per",
        metavar=_bar(PER),
        help="What one schedule step covers (block).",
        autocompletion=complete(PER),
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        metavar="PATH",
        help="An ImageFolder directory, or a .safetensors/.pt file with 'inputs' (and 'targets').",
    ),
]
SyntheticOpt = Annotated[
    int | None,
    typer.Option("--synthetic", metavar="N", help="N random inputs (a smoke test only)."),
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", metavar="N", help="Use at most N samples of --data.")
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", metavar="N", help="Inputs per forward pass.")
]
TieOpt = Annotated[
    str | None,
    typer.Option(
        "--tie",
        metavar=_bar(TIES),
        help="What one decision covers: each branch (default, timm) or the whole block "
        "(LayerDrop/LayerSkip; with --skip the layer runs on the kept rows only).",
        autocompletion=complete(TIES),
    ),
]
SkipOpt = Annotated[
    bool | None,
    typer.Option(
        "--skip/--no-skip",
        help="Compute dropped branches only where kept (training speed-up).",
        show_default=False,
    ),
]
CoverageOpt = Annotated[
    str,
    typer.Option(
        "--coverage",
        metavar=_bar(COVERAGES),
        help="slots: a model's own DropPath slots alone when it has any; all: plus every "
        "residual addition without one.",
        autocompletion=complete(COVERAGES),
    ),
]
RecipeOpt = Annotated[
    str | None,
    typer.Option(
        "--recipe",
        metavar="NAME",
        help="A published recipe (dpatch recipes); options given explicitly win over it.",
    ),
]
SizeOpt = Annotated[
    str | None,
    typer.Option("--size", metavar="S", help="Model size for --recipe (default: read off)."),
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
PrunedOutOpt = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        metavar="OUT",
        help="FILE.safetensors: a dpatch file; any other name: a save_pretrained directory "
        "without the pruned layers (transformers models; loads without dpatch).",
    ),
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
MetricOpt = Annotated[
    str,
    typer.Option(
        "--metric",
        metavar=_bar(METRICS),
        help="loss: each branch removed in turn (one score per branch); angular "
        "(Gromov et al.) or bi (ShortGPT's Block Influence): how much each layer changes its "
        "hidden state, one forward pass (one score per layer).",
        autocompletion=complete(METRICS),
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--model", metavar="NAME", help="Architecture of a plain checkpoint given as MODEL."
    ),
]


InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        metavar="B,C,...",
        help="Shape of the model's input, batch first (repeat for several inputs); "
        "default: inferred from the model.",
    ),
]
InputDtypeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-dtype",
        metavar="DTYPE",
        help="dtype of --input-shape (float32, long, ...): once for all inputs, or once each.",
    ),
]

#: ``--input-dtype`` names and the torch dtype each means (looked up when parsing).
DTYPES: dict[str, str] = {
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "float64": "float64",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int32",
    "bool": "bool",
}


def parse_inputs(shapes: list[str] | None, dtypes: list[str] | None) -> tuple[Tensor, ...] | None:
    """``--input-shape``/``--input-dtype`` as example inputs (meta tensors), or None."""
    if not shapes:
        if dtypes:
            raise InvalidValueError("--input-dtype needs --input-shape")
        return None
    names = list(dtypes or ["float32"])
    if len(names) == 1:
        names *= len(shapes)
    if len(names) != len(shapes):
        raise InvalidValueError(
            f"--input-dtype given {len(names)} times for {len(shapes)} --input-shape; give it "
            "once for all inputs or once per input"
        )
    for name in names:
        if name not in DTYPES:
            raise InvalidValueError(
                f"--input-dtype {name!r} is unknown; choose one of: {', '.join(DTYPES)}"
            )
    import torch

    from dpatch.analysis import parse_shape

    return tuple(
        torch.empty(parse_shape(s), dtype=getattr(torch, DTYPES[d]), device="meta")
        for s, d in zip(shapes, names, strict=True)
    )


def parse_rate(text: str | None, flag: str, *, allow_one: bool = False) -> float | None:
    """A rate option's text as a float in [0, 1) (or [0, 1]; None when not given), or an
    error naming the flag and value."""
    if text is None:
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        span = "[0, 1]" if allow_one else "[0, 1)"
        raise InvalidValueError(f"{flag} must be a number in {span}, but got {text!r}") from None
    return check_rate(value, flag, allow_one=allow_one)


def parse_settings(
    *,
    max_rate: str | None,
    min_rate: str | None,
    schedule: str | None,
    rates: str | None,
    rates_from: Path | None,
    mode: str | None,
    scaling: str | None,
    per: str | None,
    skip: bool | None,
    tie: str | None = None,
) -> Settings:
    """The settings options as one checked :class:`~dpatch.settings.Settings`."""
    if rates is not None and rates_from is not None:
        raise InvalidValueError("give --rates or --rates-from, not both")
    if rates_from is not None:
        from dpatch.depth import read_rates

        rate_list: list[float] | None = read_rates(rates_from)
    else:
        rate_list = parse_rates(rates)
    if rate_list is not None and schedule != "custom":
        raise InvalidValueError("--rates and --rates-from need --schedule custom")
    return Settings(
        max_rate=parse_rate(max_rate, "--max-rate"),
        schedule=schedule,
        min_rate=parse_rate(min_rate, "--min-rate"),
        rates=None if rate_list is None else tuple(rate_list),
        mode=mode,
        scaling=scaling,
        per=per,
        skip=skip,
        tie=tie,
    )


def parse_rates(text: str | None) -> list[float] | None:
    """``--rates R,R,...`` as floats (None when not given)."""
    if text is None:
        return None
    out: list[float] = []
    for i, tok in enumerate(t.strip() for t in text.split(",")):
        if not tok:
            raise InvalidValueError(f"--rates has an empty entry at position {i}: {text!r}")
        rate = parse_rate(tok, f"--rates entry {i}", allow_one=True)
        assert rate is not None
        out.append(rate)
    return out
