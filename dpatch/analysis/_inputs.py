"""Example inputs for the probe: given, read off the model's metadata, or inferred from the
first layer that sees the input.

The probe tries candidates in this order and the first one the model runs on wins:

1. inputs the caller gave (``example_inputs=``, ``--input-shape``); nothing else is tried;
2. the model's own metadata: timm's ``pretrained_cfg["input_size"]`` (and its patch
   embedding's image size), torchvision ViT's ``image_size``, a transformers model's
   ``config`` (``main_input_name``: ``pixel_values`` -> images of ``image_size`` and
   ``num_channels``; ``input_ids`` -> 16 integer ids, plus ``decoder_input_ids`` for an
   encoder-decoder; ``input_features`` -> ``num_mel_bins`` x ``2 * max_source_positions``
   (Whisper); ``input_values`` -> raw audio of about 16 frames of its feature encoder;
   ``use_cache=False`` where the forward takes it), torchvision's video builders
   (B, 3, T, H, W);
3. the first layer that sees the input: ``Conv1d/2d/3d`` (``in_channels``, at spatial sizes
   a model usually accepts), ``Linear`` (``in_features``), ``Embedding`` (integer ids);
4. a 3x224x224 image, last, whatever came before it.

Values never matter: inputs run on the meta device (integer ids are zeros when a real run
is needed).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ExampleInputs",
    "as_example_inputs",
    "input_candidates",
    "parse_shape",
    "takes_token_ids",
]


@dataclass(frozen=True)
class ExampleInputs:
    """Inputs for one forward pass, ``model(*values, **kwargs)``, and where they came from.

    Attributes:
        values: the positional inputs (tensors are shapes and dtypes only).
        source: how dpatch chose them (``"given"``, ``"timm pretrained_cfg"``, ...).
        kwargs: keyword inputs (an encoder-decoder's ``decoder_input_ids``, and
            ``use_cache=False`` so a transformers model fills no cache while probed).
    """

    values: tuple[Any, ...]
    source: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """``2x3x224x224 float32`` per tensor input, then ``name=2x16 int64`` per keyword
        input, comma-separated."""
        return ", ".join(
            [_describe(v) for v in self.values]
            + [
                f"{k}={_describe(v) if isinstance(v, Tensor) else repr(v)}"
                for k, v in self.kwargs.items()
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``--json`` output says which input was used)."""
        tensors = [v for v in self.values if isinstance(v, Tensor)]
        out: dict[str, Any] = {
            "source": self.source,
            "shapes": [list(v.shape) for v in tensors],
            "dtypes": [str(v.dtype).removeprefix("torch.") for v in tensors],
        }
        if self.kwargs:
            out["kwargs"] = {k: _plain(v) for k, v in self.kwargs.items()}
        return out

    def with_batch(self, batch: int) -> ExampleInputs:
        """The same inputs with another size of the first (batch) dimension."""
        return ExampleInputs(
            tuple(_rebatch(v, batch) for v in self.values),
            self.source,
            {k: _rebatch(v, batch) for k, v in self.kwargs.items()},
        )

    def call(self, model: nn.Module) -> Any:
        """``model(*values, **kwargs)``."""
        return model(*self.values, **self.kwargs)


def _plain(value: Any) -> Any:
    """A keyword input in plain JSON: a tensor's shape and dtype, or the value itself."""
    if isinstance(value, Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return type(value).__name__


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        dims = "x".join(str(d) for d in value.shape) or "scalar"
        return f"{dims} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def _rebatch(value: Any, batch: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0:
        return torch.empty((batch, *value.shape[1:]), dtype=value.dtype, device="meta")
    return value


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def as_example_inputs(values: Sequence[Any]) -> ExampleInputs:
    """Inputs a caller gave, as meta tensors."""
    from dpatch.analysis._meta import to_meta

    return ExampleInputs(tuple(to_meta(v) for v in values), "given")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,16,112,112"`` (or ``1x3x224x224``) as a shape.

    Raises:
        InvalidValueError: not a list of positive integers.
    """
    from dpatch.errors import InvalidValueError

    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InvalidValueError(
            f"--input-shape {text!r} is not a list of positive integers; write it like "
            "1,3,224,224 (batch first)"
        )
    return shape


# --------------------------------------------------------------------------- candidates
def input_candidates(model: nn.Module, batch: int) -> list[ExampleInputs]:
    """Inputs worth trying, most specific first, without duplicates; the last is a
    3x224x224 image (a model whose first layer embeds image patches with a ``Linear``,
    CaiT-style, runs on nothing its first layer suggests)."""
    seen: set[tuple[tuple[int, ...], ...]] = set()
    out: list[ExampleInputs] = []
    default = ExampleInputs((_meta(batch, 3, 224, 224),), "default image")
    for cand in [*_from_metadata(model, batch), *_from_first_layer(model, batch), default]:
        key = tuple((tuple(v.shape), v.dtype) for v in cand.values if isinstance(v, Tensor))
        if key not in seen:
            seen.add(key)  # type: ignore[arg-type]
            out.append(cand)
    return out


def _from_metadata(model: nn.Module, batch: int) -> Iterator[ExampleInputs]:
    size = _timm_input_size(model)
    if size is not None:
        yield ExampleInputs((_meta(batch, *size),), "timm pretrained_cfg / patch_embed")
    image_size = getattr(model, "image_size", None)
    if isinstance(image_size, int) and type(model).__module__.startswith("torchvision."):
        yield ExampleInputs((_meta(batch, 3, image_size, image_size),), "torchvision image_size")
    yield from _from_hf_config(model, batch)
    if type(model).__module__.startswith("torchvision.models.video"):
        for t, s in ((16, 112), (16, 224)):
            yield ExampleInputs((_meta(batch, 3, t, s, s),), "torchvision video (B, 3, T, H, W)")


def _timm_input_size(model: nn.Module) -> tuple[int, ...] | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size: tuple[int, ...] | None = None
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), list | tuple):
        size = tuple(int(s) for s in cfg["input_size"])
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(img_size, list | tuple) and len(img_size) == 2 and img_size[0]:
        # built for another image size than its pretrained config says
        size = ((size or (3,))[0], int(img_size[0]), int(img_size[1]))
    return size


def _from_hf_config(model: nn.Module, batch: int) -> Iterator[ExampleInputs]:
    config = getattr(model, "config", None)
    if config is None or not type(config).__module__.startswith("transformers."):
        return
    name = getattr(model, "main_input_name", "pixel_values")
    source = f"transformers config ({name})"
    kwargs = _hf_keywords(model, config, batch)
    if name == "pixel_values":
        channels = int(getattr(config, "num_channels", 3) or 3)
        size = getattr(config, "image_size", None) or 224
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        yield ExampleInputs((_meta(batch, channels, h, w),), source, kwargs)
    elif name == "input_ids":
        length = _text_length(config, "max_position_embeddings")
        yield ExampleInputs((_meta(batch, length, dtype=torch.long),), source, kwargs)
    elif name == "input_values":
        yield ExampleInputs((_meta(batch, _audio_length(config)),), source, kwargs)
    elif name == "input_features":
        bins = int(getattr(config, "num_mel_bins", 80) or 80)
        # Whisper's encoder wants exactly 2 * max_source_positions frames (its two
        # convolutions halve them); 3000 is its default (30 s).
        frames = 2 * int(getattr(config, "max_source_positions", 1500) or 1500)
        yield ExampleInputs((_meta(batch, bins, frames),), source, kwargs)


def _text_length(config: Any, limit_attr: str) -> int:
    """16 tokens, or fewer where the config's positions end sooner."""
    limit = getattr(config, limit_attr, None)
    return min(int(limit), 16) if isinstance(limit, int) and limit > 0 else 16


def _audio_length(config: Any) -> int:
    """Samples for about 16 frames of a wav2vec2-style convolutional feature encoder
    (``conv_kernel``, ``conv_stride``), else one second at 16 kHz."""
    kernels = getattr(config, "conv_kernel", None)
    strides = getattr(config, "conv_stride", None)
    if not (isinstance(kernels, list | tuple) and isinstance(strides, list | tuple)) or len(
        kernels
    ) != len(strides):
        return 16000
    length = 16
    for k, st in zip(reversed(kernels), reversed(strides), strict=True):
        length = (length - 1) * int(st) + int(k)
    return length


def _hf_keywords(model: nn.Module, config: Any, batch: int) -> dict[str, Any]:
    """Keyword inputs a transformers model needs besides its main input:
    ``decoder_input_ids`` for an encoder-decoder, and ``use_cache=False`` where the forward
    takes it (the probe runs once; a cache filled then would be handed to every layer's
    recorded call)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    kwargs: dict[str, Any] = {}
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        limit = "max_target_positions" if hasattr(config, "max_target_positions") else ""
        length = _text_length(config, limit or "max_position_embeddings")
        kwargs["decoder_input_ids"] = _meta(batch, length, dtype=torch.long)
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def takes_token_ids(model: nn.Module) -> str:
    """Why ``model`` takes integer token ids ("" when nothing says so): a transformers
    config whose main input is ``input_ids``, or an ``Embedding`` as the first layer that
    sees the input."""
    config = getattr(model, "config", None)
    if config is not None and type(config).__module__.startswith("transformers."):
        if getattr(model, "main_input_name", "") == "input_ids":
            return "its transformers config takes input_ids"
        return ""
    if isinstance(_first_layer(model), nn.Embedding):
        return "its first layer is an Embedding"
    return ""


def _first_layer(
    model: nn.Module,
) -> nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear | nn.Embedding | None:
    return next(
        (
            m
            for m in model.modules()
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear | nn.Embedding)
        ),
        None,
    )


_SIZES_1D = (1024, 256, 64)
_SIZES_2D = (224, 64, 32, 256)
_SIZES_3D = ((16, 112), (16, 224), (8, 64))


def _from_first_layer(model: nn.Module, batch: int) -> Iterator[ExampleInputs]:
    first = _first_layer(model)
    if first is None:
        return
    what = f"first layer {type(first).__name__}"
    if isinstance(first, nn.Embedding):
        yield ExampleInputs((_meta(batch, 16, dtype=torch.long),), what)
    elif isinstance(first, nn.Linear):
        yield ExampleInputs((_meta(batch, first.in_features),), what)
        yield ExampleInputs((_meta(batch, 16, first.in_features),), what)
    elif isinstance(first, nn.Conv1d):
        for n in _SIZES_1D:
            yield ExampleInputs((_meta(batch, first.in_channels, n),), what)
    elif isinstance(first, nn.Conv2d):
        for s in _SIZES_2D:
            yield ExampleInputs((_meta(batch, first.in_channels, s, s),), what)
    elif isinstance(first, nn.Conv3d):
        for t, s in _SIZES_3D:
            yield ExampleInputs((_meta(batch, first.in_channels, t, s, s),), what)
