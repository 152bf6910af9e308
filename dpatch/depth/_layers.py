"""Layers: the units of whole-layer depth pruning, found from dpatch's sites, and how much
each one changes its hidden state (Gromov et al.'s angular distance, ShortGPT's Block
Influence), measured in one forward pass.

A layer is the module that carries the residual stream through one or more of the model's
blocks: the deepest module, among a site's owner and the owner's ancestors, that is an item
of an ``nn.ModuleList`` or ``nn.Sequential`` (a transformers ``BertLayer`` for the two blocks
its ``attention.output`` and ``output`` modules add; a Llama decoder layer, a ViT or ResNet
block for itself). A site outside any such container is its own block's layer. Layers are
numbered in forward order.

Similarity of a layer's input ``x`` and output ``y`` (its first argument and its output, or
the output's first element), per token (the last dimension of ``(B, T, D)`` and ``(B, D)``
values, the channels of ``(B, C, H, W)`` and ``(B, C, T, H, W)`` ones), averaged over every
token of the data:

- ``angular``: ``arccos(cos(x, y)) / pi`` (Gromov et al. 2024, "The Unreasonable
  Ineffectiveness of the Deeper Layers", with n = 1 layer; they read the last token of each
  sequence, dpatch averages over all tokens as ShortGPT does);
- ``bi``: Block Influence ``1 - cos(x, y)`` (Men et al. 2024, ShortGPT).

Lower means the layer changes its input less: it goes first when pruning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpatch.analysis import Site, find_sites
from dpatch.errors import InvalidValueError
from dpatch.settings import LAYER_METRICS

__all__ = [
    "Layer",
    "find_layers",
    "hidden_of",
    "layer_input",
    "layer_similarity",
    "layers_of",
    "pruned_layers",
]


@dataclass(frozen=True)
class Layer:
    """One layer and the residual branches inside it.

    Attributes:
        index: 0-based, in forward order.
        path: the layer module's qualified name.
        sites: ``Site.name`` of its branches, in forward order.
        blocks: the ``Site.block`` numbers its branches belong to.
    """

    index: int
    path: str
    sites: tuple[str, ...]
    blocks: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path": self.path,
            "sites": list(self.sites),
            "blocks": list(self.blocks),
        }


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _layer_path(model: nn.Module, owner: str) -> str:
    """The deepest item of a module list or sequence among ``owner`` and its ancestors;
    ``owner`` itself when there is none."""
    path = owner
    while path:
        parent = model.get_submodule(_parent(path))
        if isinstance(parent, nn.ModuleList | nn.Sequential):
            return path
        path = _parent(path)
    return owner


def layers_of(model: nn.Module, sites: Sequence[Site]) -> list[Layer]:
    """Group ``sites`` (of ``model``, from :func:`dpatch.find_sites`) into layers, in forward
    order."""
    heads: dict[int, str] = {}  # block -> its outermost owner
    for s in sites:
        head = heads.get(s.block)
        if head is None or len(s.path) < len(head):
            heads[s.block] = s.path
    path_of = {b: _layer_path(model, h) for b, h in heads.items()}
    grouped: dict[str, list[Site]] = {}
    for s in sorted(sites, key=lambda s: s.block):
        grouped.setdefault(path_of[s.block], []).append(s)
    return [
        Layer(
            i,
            path,
            tuple(s.name for s in members),
            tuple(sorted({s.block for s in members})),
        )
        for i, (path, members) in enumerate(grouped.items())
    ]


def find_layers(model: nn.Module, example_inputs: Sequence[Any] | None = None) -> list[Layer]:
    """The layers of ``model``: its residual sites grouped by the layer module that holds
    them, in forward order. Read-only.

    Raises:
        ProbeError: the model runs on no input; pass ``example_inputs``.
    """
    return layers_of(model, find_sites(model, example_inputs))


# --------------------------------------------------------------------------- measuring
def hidden_of(value: Any) -> Tensor | None:
    """A layer's hidden state: the value itself, or the first element of a tuple."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, list | tuple) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def layer_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    """The hidden state a layer was called with: its first argument (``hidden_states``)."""
    if args:
        return hidden_of(args[0])
    value = kwargs.get("hidden_states")
    if isinstance(value, Tensor):
        return value
    return next((v for v in kwargs.values() if isinstance(v, Tensor)), None)


def _tokens(x: Tensor) -> Tensor:
    """Rows of feature vectors: one per token (or spatial position, for feature maps), in
    float64 (a float32 cosine of equal vectors can miss 1 by 6e-8, which arccos turns into
    an angular distance of 1e-4)."""
    device = "cpu" if x.device.type == "mps" else x.device  # MPS has no float64
    x = x.detach().to(device, torch.float64)
    if x.dim() >= 4:  # (B, C, H, W), (B, C, T, H, W): the channels are the features
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


@dataclass
class _Tally:
    total: float = 0.0
    tokens: int = 0
    why: str = ""


def layer_similarity(
    model: nn.Module,
    layers: Sequence[Layer],
    inputs: Tensor,
    metric: str,
    *,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[float | None, str]]:
    """``metric`` (``angular`` or ``bi``) of each layer's input and output, averaged over the
    tokens of ``inputs``: one forward pass over the data, in eval mode, with a hook on each
    layer (the model is put back in its mode; nothing else changes).

    Returns:
        ``(score, "")`` per layer, or ``(None, why)`` where it could not be measured (the
        layer did not run, or its output is not a tensor of its input's shape).

    Raises:
        InvalidValueError: an unknown metric.
    """
    if metric not in LAYER_METRICS:
        raise InvalidValueError(
            f"unknown layer metric {metric!r}; choose one of: {', '.join(LAYER_METRICS)}"
        )
    tallies = [_Tally() for _ in layers]

    def hook(tally: _Tally) -> Callable[..., None]:
        def record(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x, y = layer_input(args, kwargs), hidden_of(out)
            if x is None or y is None or x.shape != y.shape:
                what = "no tensor" if x is None or y is None else f"{tuple(y.shape)}"
                got = "no tensor" if x is None else f"{tuple(x.shape)}"
                tally.why = tally.why or (
                    f"its output ({what}) is not its input's hidden state ({got}): "
                    "not a layer of the residual stream"
                )
                return
            cos = F.cosine_similarity(_tokens(x), _tokens(y), dim=-1, eps=1e-8)
            if metric == "angular":
                value = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
            else:
                value = 1.0 - cos
            tally.total += float(value.sum())
            tally.tokens += int(value.numel())

        return record

    handles = [
        model.get_submodule(layer.path).register_forward_hook(hook(t), with_kwargs=True)
        for layer, t in zip(layers, tallies, strict=True)
    ]
    modes = [(m, m.training) for m in model.modules()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    steps = max(1, math.ceil(inputs.shape[0] / batch_size))
    try:
        model.eval()
        with torch.no_grad():
            for k, i in enumerate(range(0, inputs.shape[0], batch_size)):
                model(inputs[i : i + batch_size].to(device))
                if progress is not None:
                    progress(k + 1, steps)
    finally:
        for h in handles:
            h.remove()
        for m, was in modes:
            m.training = was
    out: list[tuple[float | None, str]] = []
    for t in tallies:
        if t.why:
            out.append((None, t.why))
        elif t.tokens == 0:
            out.append((None, "it did not run"))
        else:
            out.append((t.total / t.tokens, ""))
    return out


def pruned_layers(model: nn.Module, sites: Sequence[Site]) -> list[Layer]:
    """The layers of ``model`` whose every branch is pruned (``Site.pruned``)."""
    pruned = {s.name for s in sites if s.pruned}
    return [layer for layer in layers_of(model, sites) if set(layer.sites) <= pruned]
