"""Inputs of a batch run (:mod:`dpatch.files`): expanding files, folders and globs, and
naming each input's output inside ``-o DIR``, with every problem found before any work."""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dpatch.errors import DPatchError, InvalidValueError, OutputError, WeightsError
from dpatch.settings import DEFAULT_TEMPLATE

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "Batch",
    "BatchInput",
    "is_many",
    "prepare_batch",
]

CHECKPOINT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pt", ".pth", ".bin")
_GLOB_CHARS = "*?["
_FIELDS = ("stem", "name", "parent", "index")


@dataclass(frozen=True)
class BatchInput:
    """One input: a checkpoint file or a model spec."""

    text: str
    is_file: bool

    @property
    def stem(self) -> str:
        """The name an output is made from: a file's stem, a spec's model name."""
        if self.is_file:
            return Path(self.text).stem
        return self.text.rpartition(":")[2].replace("/", "_") or "model"


@dataclass(frozen=True)
class Batch:
    """Inputs ready to run: each with its output path and any problem found up front.

    Attributes:
        inputs: in the order given (folders and globs expanded, sorted, without repeats).
        outputs: output path by input index (only when an output folder was given).
        problems: by input index, what makes that input fail before any work.
        out_dir: the output folder, if any.
        force: existing outputs may be replaced.
    """

    inputs: tuple[BatchInput, ...]
    outputs: Mapping[int, Path] = field(default_factory=dict)
    problems: Mapping[int, DPatchError] = field(default_factory=dict)
    out_dir: Path | None = None
    force: bool = False


# --------------------------------------------------------------------------- inputs
def _has_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def is_many(items: Sequence[str]) -> bool:
    """Whether inputs call for a batch run: several, a folder, or a glob to expand."""
    return len(items) > 1 or any(
        Path(t).is_dir() or (_has_glob(t) and not Path(t).exists()) for t in items
    )


def _expand(item: str) -> list[BatchInput] | DPatchError:
    path = Path(item)
    if path.is_dir():
        try:
            entries = sorted(path.iterdir())
        except OSError as exc:
            return WeightsError(f"folder {item!r} cannot be read ({exc.strerror or exc})")
        files = [
            e
            for e in entries
            if e.suffix in CHECKPOINT_SUFFIXES and not e.name.startswith(".") and not e.is_dir()
        ]
        if not files:
            return WeightsError(
                f"folder {item!r} holds no checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})"
            )
        return [BatchInput(str(f), True) for f in files]
    if path.exists() or (path.suffix in CHECKPOINT_SUFFIXES and not _has_glob(item)):
        return [BatchInput(item, True)]
    if _has_glob(item):
        found = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not found:
            return WeightsError(f"glob {item!r} matches no file; check the path and pattern")
        return [BatchInput(p, True) for p in found]
    return [BatchInput(item, False)]


def _check_folder(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output {str(out_dir)!r} is a file; give a folder for many inputs")
    if not out_dir.exists():
        parent = out_dir.parent
        if not parent.is_dir():
            raise OutputError(f"output folder {str(parent)!r} does not exist; create it first")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"cannot create {str(out_dir)!r}: {str(parent)!r} is not writable")
        return
    if not os.access(out_dir, os.W_OK):
        raise OutputError(f"output folder {str(out_dir)!r} is not writable; choose another -o")


def _output_name(inp: BatchInput, template: str, index: int) -> str:
    fields = {
        "stem": inp.stem,
        "name": Path(inp.text).name if inp.is_file else f"{inp.stem}.safetensors",
        "parent": Path(inp.text).resolve().parent.name if inp.is_file else "",
        "index": index + 1,
    }
    if template == DEFAULT_TEMPLATE and inp.stem.endswith("-dp"):
        return f"{inp.stem}.safetensors"  # a dpatch output keeps its name: no run0-dp-dp
    try:
        name = template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise InvalidValueError(
            f"--output-template {template!r} is not valid ({exc}); use the fields "
            + ", ".join("{" + f + "}" for f in _FIELDS)
        ) from None
    if not name or "/" in name or os.sep in name or name in (".", ".."):
        raise InvalidValueError(
            f"--output-template {template!r} gives {name!r} for {inp.text!r}; it must name a "
            "file inside the output folder"
        )
    return name


def prepare_batch(
    items: Sequence[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    force: bool = False,
) -> Batch:
    """Expand inputs and name their outputs, finding every problem before any work.

    Problems of one input (a glob matching nothing, an unreadable folder, two inputs
    mapping to one output, an output that exists, an output that is another input) are
    returned per input; problems of the whole run are raised.

    Raises:
        OutputError: the output folder is a file, or cannot be written or created.
        InvalidValueError: no inputs, or a bad ``template``.
    """
    if not items:
        raise InvalidValueError("no inputs given")
    inputs: list[BatchInput] = []
    problems: dict[int, DPatchError] = {}
    seen: set[str] = set()
    for item in items:
        expanded = _expand(item)
        if isinstance(expanded, DPatchError):
            problems[len(inputs)] = expanded
            inputs.append(BatchInput(item, True))
            continue
        for inp in expanded:
            key = str(Path(inp.text).resolve()) if inp.is_file else inp.text
            if key not in seen:
                seen.add(key)
                inputs.append(inp)
    outputs: dict[int, Path] = {}
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None:
        _check_folder(folder)
        by_path: dict[Path, list[int]] = {}
        for i, inp in enumerate(inputs):
            if i not in problems:
                path = folder / _output_name(inp, template, i)
                outputs[i] = path
                by_path.setdefault(path.resolve(), []).append(i)
        sources = {Path(inp.text).resolve(): i for i, inp in enumerate(inputs) if inp.is_file}
        for path, users in by_path.items():
            for i in users:
                if len(users) > 1:
                    others = [inputs[j].text for j in users if j != i]
                    problems[i] = OutputError(
                        f"{inputs[i].text!r} and {others[0]!r} both map to {str(outputs[i])!r}; "
                        "use --output-template, e.g. '{parent}-{stem}-dp.safetensors'"
                    )
                elif sources.get(path, i) != i:
                    problems[i] = OutputError(
                        f"output {str(outputs[i])!r} of {inputs[i].text!r} is another input, "
                        "which it would overwrite; choose another -o or --output-template"
                    )
                elif path.exists() and not force:
                    problems[i] = OutputError(
                        f"output {str(outputs[i])!r} exists; pass --force to overwrite it"
                    )
    return Batch(tuple(inputs), outputs, problems, folder, force)
