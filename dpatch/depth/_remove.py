"""Removing whole layers from a model's layer list, so a plain copy of the architecture with
fewer layers holds a model whose layers dpatch pruned whole (:func:`without_pruned_layers`): the list shrinks (later layers move up), the config's layer count and
per-layer lists follow, and layer indices kept on modules (transformers' ``layer_idx``, which
the KV cache is indexed by) are renumbered.

The config conventions are transformers' (no transformers import is needed): the layer
count is one of :data:`COUNT_KEYS` whose value is the list's length (in the config or a
sub-config such as ``text_config``); a per-layer list (``layer_types``, ...) is a list
attribute with ``layer`` in its name and one entry per layer; a list of layer indices
(``mlp_only_layers``, ...) is a shorter list of ints with ``layer`` in its name.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dpatch.depth._data import random_example
from dpatch.depth._layers import Layer, hidden_of, layer_input, pruned_layers
from dpatch.errors import InvalidValueError, UnsupportedSiteError
from dpatch.patching import inspect as inspect_model
from dpatch.patching import strip

__all__ = [
    "COUNT_KEYS",
    "INDEX_ATTRS",
    "LayerRemoval",
    "PlainModel",
    "remove_layers",
    "shared_copy",
    "without_pruned_layers",
]

#: Config entries that count a model's layers (transformers' names).
COUNT_KEYS: tuple[str, ...] = (
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "encoder_layers",
    "decoder_layers",
    "num_encoder_layers",
    "num_decoder_layers",
)
#: Module attributes that hold a layer's own index (renumbered when layers move up).
INDEX_ATTRS: tuple[str, ...] = ("layer_idx", "layer_id", "layer_index", "layer_number")


@dataclass(frozen=True)
class LayerRemoval:
    """What removing layers from one layer list changed.

    Attributes:
        container: the path of the layer list.
        removed: the old indices of the removed layers.
        before: layers before.
        after: layers after.
        config: ``(key, old, new)`` for each config entry changed (``text_config.`` for a
            sub-config's).
    """

    container: str
    removed: tuple[int, ...]
    before: int
    after: int
    config: tuple[tuple[str, Any, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "removed": list(self.removed),
            "before": self.before,
            "after": self.after,
            "config": [{"key": k, "old": old, "new": new} for k, old, new in self.config],
        }


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are the original tensors (its
    modules, config and attributes are new): cheap for a large model, and safe as long as no
    tensor is changed in place."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _split(path: str) -> tuple[str, int]:
    container, _, index = path.rpartition(".")
    if not index.isdigit():
        raise InvalidValueError(
            f"layer {path!r} is not an item of a layer list (nn.ModuleList or nn.Sequential), "
            "so it cannot be removed from the model"
        )
    return container, int(index)


def _configs(config: Any) -> list[tuple[str, Any]]:
    """The config and its sub-configs (``text_config``, ...), with their key prefixes."""
    out = [("", config)]
    for key, value in vars(config).items():
        if hasattr(value, "to_dict") and not isinstance(value, type) and key.endswith("config"):
            out.append((f"{key}.", value))
    return out


_STACKS = frozenset({"encoder", "decoder", "text", "vision", "audio"})


def _stack_words(prefix: str, key: str) -> set[str]:
    """Which stack a count entry is for: ``encoder_layers`` -> encoder, ``text_config.`` ->
    text."""
    words = set(prefix.rstrip(".").removesuffix("_config").split("_")) | set(key.split("_"))
    return words & _STACKS


def _count_key(config: Any, container: str, length: int) -> tuple[str, Any, str]:
    """(prefix, config object, key) of the entry counting the layers of ``container``."""
    found = [
        (prefix, cfg, key)
        for prefix, cfg in _configs(config)
        for key in COUNT_KEYS
        if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) == length
    ]
    if len(found) > 1:  # an encoder and a decoder of one depth, a text and a vision tower
        parts = set(re.split(r"[._]", container))
        if "language" in parts:
            parts.add("text")
        named = [f for f in found if (w := _stack_words(f[0], f[2])) and w <= parts]
        found = named if len(named) == 1 else found
    if len(found) != 1:
        which = "none" if not found else ", ".join(p + k for p, _, k in found)
        raise InvalidValueError(
            f"cannot tell which config entry counts the {length} layers of {container!r} "
            f"(candidates: {which}); a save_pretrained directory needs it"
        )
    return found[0]


def _per_layer_edits(
    cfg: Any, prefix: str, old: int, kept: Sequence[int]
) -> list[tuple[str, Any, Any]]:
    """New values of the config's per-layer lists and lists of layer indices."""
    new_index = {o: n for n, o in enumerate(kept)}
    edits: list[tuple[str, Any, Any]] = []
    for key, value in vars(cfg).items():
        if "layer" not in key or not isinstance(value, list | tuple) or not value:
            continue
        if list(value) == list(range(old)):  # every layer by index
            new: Any = list(range(len(kept)))
        elif len(value) == old:  # one entry per layer
            new = [value[i] for i in kept]
        elif all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < old for v in value):
            new = [new_index[v] for v in value if v in new_index]  # layer indices
        else:
            continue
        edits.append((prefix + key, list(value), type(value)(new)))
    return edits


def _renumber(layer: nn.Module, old: int, new: int) -> None:
    shift = old - new
    if shift == 0:
        return
    for mod in layer.modules():
        for attr in INDEX_ATTRS:
            value = mod.__dict__.get(attr)
            # 0-based (layer_idx) or 1-based (layer_number) indices of this layer
            if isinstance(value, int) and not isinstance(value, bool) and value in (old, old + 1):
                mod.__dict__[attr] = value - shift


def remove_layers(model: nn.Module, paths: Sequence[str]) -> list[LayerRemoval]:
    """Remove the layers ``paths`` (items of ``nn.ModuleList``/``nn.Sequential`` layer lists)
    from ``model``, in place: the later layers move up, ``model.config`` (when it has one)
    counts the layers left and keeps its per-layer lists in step, and layer indices held by
    modules are renumbered.

    Raises:
        InvalidValueError: a path that is not an item of a layer list, a list the removal
            would empty, or a config whose layer count cannot be told.
    """
    by_list: dict[str, set[int]] = {}
    for path in paths:
        container, index = _split(path)
        by_list.setdefault(container, set()).add(index)
    config = getattr(model, "config", None)
    plan = []
    for container, gone in by_list.items():
        layers = model.get_submodule(container)
        if not isinstance(layers, nn.ModuleList | nn.Sequential):
            raise InvalidValueError(
                f"{container!r} is a {type(layers).__name__}, not a layer list; its layers "
                "cannot be removed"
            )
        kept = [i for i in range(len(layers)) if i not in gone]
        if not kept:
            raise InvalidValueError(
                f"removing every layer of {container!r} ({len(layers)}) leaves no model; keep "
                "at least one"
            )
        count = _count_key(config, container, len(layers)) if config is not None else None
        plan.append((container, layers, sorted(gone), kept, count))
    done = []
    for container, layers, removed, kept, count in plan:
        edits: list[tuple[str, Any, Any]] = []
        if count is not None:
            prefix, cfg, key = count
            edits = [(prefix + key, len(layers), len(kept))]
            edits += _per_layer_edits(cfg, prefix, len(layers), kept)
            for full, _, new in edits:
                # transformers 5 configs validate on setattr; the count and its lists change
                # together, so set past the validator and let save_pretrained check the whole
                object.__setattr__(cfg, full[len(prefix) :], new)
        for new_i, old_i in enumerate(kept):
            _renumber(layers[old_i], old_i, new_i)
        shorter: nn.Module
        if isinstance(layers, nn.Sequential):
            shorter = nn.Sequential(*[layers[i] for i in kept])
        else:
            shorter = nn.ModuleList([layers[i] for i in kept])
        parent, _, attr = container.rpartition(".")
        setattr(model.get_submodule(parent), attr, shorter)
        done.append(LayerRemoval(container, tuple(removed), len(layers), len(kept), tuple(edits)))
    return done


# --------------------------------------------------------------------------- pruned layers
@dataclass(frozen=True)
class PlainModel:
    """A pruned model as its plain architecture holds it (see :func:`without_pruned_layers`).

    Attributes:
        model: the copy: dpatch undone, the pruned layers removed.
        removed: the layers removed (paths and branches, as in the pruned model).
        changes: what each layer list and the config lost.
    """

    model: nn.Module
    removed: tuple[Layer, ...]
    changes: tuple[LayerRemoval, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": [layer.path for layer in self.removed],
            "changes": [c.to_dict() for c in self.changes],
        }


def _not_identity(
    model: nn.Module, layers: Sequence[Layer], inputs: tuple[Any, ...]
) -> tuple[Layer, float] | None:
    """The first layer whose output differs from its input on ``inputs`` (with how much)."""
    found: list[tuple[Layer, float]] = []

    def hook(layer: Layer) -> Any:
        def check(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x, y = layer_input(args, kwargs), hidden_of(out)
            if x is None or y is None or x.shape != y.shape:
                found.append((layer, math.inf))
            elif not torch.equal(x, y):
                found.append((layer, float((y.float() - x.float()).abs().max())))

        return check

    handles = [
        model.get_submodule(layer.path).register_forward_hook(hook(layer), with_kwargs=True)
        for layer in layers
    ]
    try:
        _run_eval(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _run_eval(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    modes = [(m, m.training) for m in model.modules()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            return model(*(x.to(device) if isinstance(x, Tensor) else x for x in inputs))
    finally:
        for m, was in modes:
            m.training = was


def _output_tensors(out: Any) -> list[Tensor]:
    """The tensors of a model output (a tensor, a tuple, a transformers ModelOutput)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for t in out if isinstance(t, Tensor)]
    return []


def without_pruned_layers(
    model: nn.Module, example_inputs: Sequence[Any] | None = None
) -> PlainModel:
    """A plain copy of a pruned ``model`` (dpatch undone, its tensors shared) without the
    layers whose every branch is pruned, checked to compute what ``model`` computes.

    Each removed layer must be an identity in the pruned model (a pre-norm layer is: both
    residual additions return their shortcut; a post-norm one, as BERT's, still applies its
    LayerNorms), and the copy's output must equal the pruned model's on random inputs.

    Raises:
        UnsupportedSiteError: a pruned branch outside a whole pruned layer, or a pruned layer
            that still changes its hidden state.
        InvalidValueError: a layer that is not an item of a layer list, a config whose layer
            count cannot be told, or a copy whose output differs.
    """
    sites = inspect_model(model, example_inputs).sites
    gone = pruned_layers(model, sites)
    whole = {n for layer in gone for n in layer.sites}
    partial = [s for s in sites if s.pruned and s.name not in whole]
    if partial:
        raise UnsupportedSiteError(
            f"{partial[0].name} is pruned but not the rest of its layer; the plain "
            "architecture holds whole layers only: prune whole layers (by angular, bi or "
            "layer scores), or save a dpatch file"
        )
    inputs = random_example(model, 2, example_inputs=example_inputs)
    if gone:
        bad = _not_identity(model, gone, inputs)
        if bad is not None:
            layer, diff = bad
            raise UnsupportedSiteError(
                f"layer {layer.path} still changes its hidden state with every branch pruned "
                f"(max difference {diff:.3g}: e.g. a LayerNorm after its residual additions, "
                "a post-norm layer such as BERT's), so the model without it would compute "
                "something else; save a dpatch file instead"
            )
    plain = shared_copy(model)
    strip(plain, pruned="restore")
    changes = remove_layers(plain, [layer.path for layer in gone])
    want = _output_tensors(_run_eval(model, inputs))
    got = _output_tensors(_run_eval(plain, inputs))
    same = len(want) == len(got) and all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
        for a, b in zip(want, got, strict=False)
    )
    if not same:
        raise InvalidValueError(
            "the model without its pruned layers does not compute what the pruned model "
            "computes (a forward of the plain copy differs); save a dpatch file instead"
        )
    return PlainModel(plain, tuple(gone), tuple(changes))
