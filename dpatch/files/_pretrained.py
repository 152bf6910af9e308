"""Writing a pruned transformers model as a ``save_pretrained`` directory that transformers
loads without dpatch: the layers dpatch pruned whole are gone, the config counts the layers
left (``num_hidden_layers``, per-layer lists such as ``layer_types``), and layer indices are
renumbered, so ``AutoModel*.from_pretrained(DIR)`` rebuilds the smaller model and its KV
cache has one entry per layer left.

The directory is written next to its final place and renamed into it: an interrupted or
failed write leaves nothing, and an existing directory is replaced only with ``force``, only
when it is itself a ``save_pretrained`` directory, and never when it is the one the model
was loaded from.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dpatch.depth import PlainModel, without_pruned_layers
from dpatch.errors import InvalidValueError, OutputError
from dpatch.files._files import check_folder, plain_mode
from dpatch.models import transformers_quiet

__all__ = ["PretrainedExport", "check_output_dir", "is_transformers_model", "save_pretrained"]


@dataclass(frozen=True)
class PretrainedExport:
    """What :func:`save_pretrained` wrote.

    Attributes:
        directory: the directory.
        plain: the model written (a plain transformers model) and the layers it lost.
    """

    directory: str
    plain: PlainModel

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, **self.plain.to_dict()}


def is_transformers_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (it has a config and ``save_pretrained``)."""
    return callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config")


def _source_dir(model: nn.Module) -> Path | None:
    """The local directory the model was loaded from, when it was."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(
        model, "name_or_path", ""
    )
    path = Path(str(name)).expanduser() if name else None
    return path.resolve() if path is not None and path.is_dir() else None


def check_output_dir(
    path: str | os.PathLike[str], force: bool, *, source: Path | None = None
) -> Path:
    """Validate an output directory before any work.

    Raises:
        OutputError: its folder is missing or not writable; it is a file; it exists without
            ``force``; it exists but holds no ``config.json`` (only ``save_pretrained``
            directories are replaced); it is ``source`` (the model's own directory).
    """
    out = Path(path)
    check_folder(out)
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"output {str(out)!r} is a file; -o DIR writes a save_pretrained directory "
            "(give -o FILE.safetensors for a dpatch file)"
        )
    if source is not None and out.exists() and out.resolve() == source:
        raise OutputError(
            f"output {str(out)!r} is the directory the model was loaded from; write the pruned "
            "model to another directory"
        )
    if out.exists() and not force:
        raise OutputError(f"output directory {str(out)!r} exists; pass --force to replace it")
    if out.exists() and not (out / "config.json").is_file():
        raise OutputError(
            f"output directory {str(out)!r} exists and is not a save_pretrained directory (no "
            "config.json); dpatch replaces only those, even with --force: choose another -o"
        )
    return out


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    force: bool = False,
    example_inputs: Sequence[Any] | None = None,
) -> PretrainedExport:
    """Write a pruned transformers ``model`` as a ``save_pretrained`` directory without its
    pruned layers, which ``from_pretrained`` loads without dpatch.

    The layers whose every branch is pruned (:func:`dpatch.prune` with ``by="angular"``,
    ``"bi"`` or layer scores) are removed from the model's layer list; the config's layer
    count and per-layer lists follow, and layer indices are renumbered. Before anything is
    written, the plain model is checked to compute what ``model`` computes (see
    :func:`dpatch.depth.without_pruned_layers`). ``model`` itself is not changed.

    Args:
        model: a transformers ``PreTrainedModel``, pruned (or not: it is written as it is).
        directory: where to write; replaced only with ``force`` (and only when it is a
            ``save_pretrained`` directory that the model was not loaded from).
        force: replace an existing ``save_pretrained`` directory.
        example_inputs: inputs for the probe (default: the config's).

    Raises:
        InvalidValueError: not a transformers model; a config whose layer count cannot be
            told.
        UnsupportedSiteError: branches pruned outside whole layers, or a pruned layer that
            still changes its hidden state (post-norm).
        OutputError: see :func:`check_output_dir`.
    """
    if not is_transformers_model(model):
        raise InvalidValueError(
            f"{type(model).__name__} is not a transformers model, so it has no "
            "save_pretrained directory; save a dpatch file (-o FILE.safetensors)"
        )
    out = check_output_dir(directory, force, source=_source_dir(model))
    plain = without_pruned_layers(model, example_inputs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old: Path | None = None
    try:
        with transformers_quiet():
            plain.model.save_pretrained(str(tmp))  # type: ignore[operator]
        plain_mode(tmp, folder=True)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if not out.exists():
                os.replace(old / out.name, out)  # put the one we replaced back
            if not (old / out.name).exists():
                shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return PretrainedExport(str(out), plain)
