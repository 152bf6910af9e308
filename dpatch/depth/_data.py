"""Evaluation data for measurements (``dpatch sensitivity``): an image folder, a tensor file,
or synthetic inputs.

- An ImageFolder directory (``PATH/CLASS/IMAGE``): labels come from the folder names (their
  integer value when every folder is named by a number, else their sorted index, as
  torchvision's ``ImageFolder`` numbers them). timm models get timm's own evaluation
  transform (``timm.data.resolve_data_config`` + ``create_transform``); other models are
  resized, centre-cropped and normalised (ImageNet mean/std) to their inferred input size.
- A ``.safetensors`` or ``.pt``/``.pth`` file holding ``inputs`` and optionally ``targets``;
  ``.pt`` files load with ``torch.load(weights_only=True)`` only.
- ``synthetic``: N random inputs of the model's input size (token ids below the vocabulary
  size for a model that takes ids): a smoke test, not a measurement.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpatch.analysis import materialise, probe
from dpatch.errors import DataError, InvalidValueError, first_line

__all__ = ["Data", "load_data", "random_example", "random_inputs"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass(frozen=True)
class Data:
    """Inputs (and labels) for a measurement.

    Attributes:
        inputs: batch-first tensor.
        targets: integer labels, or None.
        source: where they came from, in words.
        synthetic: random inputs (a smoke test, not a measurement).
    """

    inputs: Tensor
    targets: Tensor | None
    source: str
    synthetic: bool = False


def load_data(
    path: str | os.PathLike[str] | None,
    model: nn.Module,
    *,
    synthetic: int | None = None,
    limit: int | None = None,
    example_inputs: Sequence[Any] | None = None,
) -> Data:
    """Load evaluation data for ``model`` from ``path`` (or make ``synthetic`` inputs).

    Args:
        path: an ImageFolder directory or a tensor file (None with ``synthetic``).
        model: the model (its input size and, for timm models, its data config).
        synthetic: make this many random inputs instead.
        limit: use at most this many samples (spread evenly over the data).
        example_inputs: the model's input (any batch size), for ``synthetic`` inputs and
            the size images are resized to where the model says none.

    Raises:
        DataError: a missing path, a folder without images, a file without ``inputs``.
        InvalidValueError: both or neither of ``path`` and ``synthetic``; a bad count.
    """
    if (path is None) == (synthetic is None):
        raise InvalidValueError("give a data path or a number of synthetic inputs (not both)")
    for name, n in (("synthetic", synthetic), ("limit", limit)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InvalidValueError(f"{name} must be a whole number >= 1, but got {n!r}")
    if synthetic is not None:
        x = random_inputs(model, synthetic, example_inputs=example_inputs)
        what = "inputs" if x.is_floating_point() else "token ids"
        return Data(x, None, f"{synthetic} random {what}", True)
    assert path is not None
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist")
    data = _image_folder(p, model, example_inputs) if p.is_dir() else _tensor_file(p)
    return _limited(data, limit)


def random_inputs(
    model: nn.Module, batch: int, seed: int = 0, example_inputs: Sequence[Any] | None = None
) -> Tensor:
    """Random inputs of the size the model runs on (``example_inputs``, else the input its
    probe inferred) at ``batch`` rows, seeded; integer inputs are token ids below the
    model's vocabulary size (``config.vocab_size``, else its first embedding's size).

    Raises:
        ProbeError: the model runs on no input dpatch can infer.
        InvalidValueError: it takes several inputs (give data instead).
    """
    values = random_example(model, batch, seed, example_inputs)
    example = probe(model, example_inputs).example
    assert example is not None
    keywords = [k for k, v in example.kwargs.items() if isinstance(v, Tensor)]
    if len(values) != 1 or not isinstance(values[0], Tensor) or keywords:
        raise InvalidValueError(
            f"the model takes {len(values) + len(keywords)} inputs; give data holding them "
            "instead of synthetic inputs"
        )
    return values[0]


def random_example(
    model: nn.Module, batch: int, seed: int = 0, example_inputs: Sequence[Any] | None = None
) -> tuple[Any, ...]:
    """Every positional input of the model, random as :func:`random_inputs` makes them (on
    the CPU)."""
    example = probe(model, example_inputs).example
    assert example is not None
    out: list[Any] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for v in example.with_batch(batch).values:
            if isinstance(v, Tensor) and not v.is_floating_point() and v.dtype != torch.bool:
                out.append(torch.randint(0, _vocab_size(model), tuple(v.shape), dtype=v.dtype))
            else:
                out.append(materialise(v, torch.device("cpu")))
    return tuple(out)


def _vocab_size(model: nn.Module) -> int:
    """How many token ids the model embeds (1 when it says nowhere: all ids 0)."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    first = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return first.num_embeddings if first is not None else 1


def _limited(data: Data, limit: int | None) -> Data:
    n = data.inputs.shape[0]
    if limit is None or limit >= n:
        return data
    index = torch.linspace(0, n - 1, limit).round().long()
    targets = None if data.targets is None else data.targets[index]
    return Data(data.inputs[index], targets, f"{data.source} ({limit} of {n})", data.synthetic)


def _transform(model: nn.Module, example_inputs: Sequence[Any] | None) -> Any:
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        from timm.data import create_transform, resolve_data_config

        return create_transform(**resolve_data_config({}, model=model))
    from torchvision import transforms

    size = tuple(random_inputs(model, 1, example_inputs=example_inputs).shape[-2:])
    return transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ]
    )


def _image_folder(root: Path, model: nn.Module, example_inputs: Sequence[Any] | None) -> Data:
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(root), transform=_transform(model, example_inputs))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(
            f"{str(root)!r} holds no images in class folders ({first_line(exc, None)}); "
            "lay them out as PATH/CLASS/IMAGE.jpg"
        ) from exc
    numeric = all(c.isdigit() for c in ds.classes)
    label = [int(c) if numeric else i for i, c in enumerate(ds.classes)]
    images, targets = [], []
    for i in range(len(ds)):
        try:
            x, y = ds[i]
        except OSError as exc:
            raise DataError(f"cannot read image {ds.samples[i][0]!r} ({exc})") from exc
        images.append(x)
        targets.append(label[y])
    return Data(
        torch.stack(images),
        torch.tensor(targets, dtype=torch.long),
        f"{len(images)} images in {len(ds.classes)} classes from {str(root)!r}",
    )


def _tensor_file(p: Path) -> Data:
    if p.suffix not in _TENSOR_SUFFIXES:
        raise DataError(
            f"data file {str(p)!r} is neither an image folder nor a tensor file "
            f"({', '.join(_TENSOR_SUFFIXES)})"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise DataError(
            f"{str(p)!r} is not a readable tensor file ({first_line(exc, 160)}); "
            "save {'inputs': x, 'targets': y} with safetensors or torch.save"
        ) from exc
    except Exception as exc:  # safetensors raises its own error type for a corrupt header
        raise DataError(f"{str(p)!r} is not a readable tensor file ({exc})") from exc
    inputs = obj.get("inputs") if isinstance(obj, dict) else None
    if not isinstance(inputs, Tensor):
        keys = sorted(map(str, obj))[:5] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"{str(p)!r} holds no 'inputs' tensor (found {keys}); save "
            "{'inputs': x, 'targets': y} with safetensors or torch.save"
        )
    targets = obj.get("targets")
    if targets is not None and not isinstance(targets, Tensor):
        raise DataError(f"'targets' in {str(p)!r} is a {type(targets).__name__}, not a tensor")
    return Data(
        inputs,
        targets,
        f"{inputs.shape[0]} inputs"
        + (" with targets" if targets is not None else "")
        + f" from {str(p)!r}",
    )
