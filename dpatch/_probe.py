"""One forward pass that records which modules run, in which order, and with which inputs.

The pass runs on the meta device (:func:`dpatch._meta.meta_execution`): it costs no compute
and changes nothing. A model whose forward needs real values (data-dependent control flow,
``.item()``) is run once more on random inputs on its own device, without gradients and with
copies of its buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dpatch._meta import materialise, meta_execution, real_execution, to_meta

__all__ = ["PROBE_BATCH", "Call", "Probe", "default_example_input", "probe"]

PROBE_BATCH = 2

#: A recorded call: positional and keyword arguments.
Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class Probe:
    """What one forward pass saw, by ``id(module)``."""

    order: dict[int, int] = field(default_factory=dict)  # first-call index
    calls: dict[int, int] = field(default_factory=dict)  # number of calls
    inputs: dict[int, Call] = field(default_factory=dict)  # the first call's arguments
    outputs: dict[int, Any] = field(default_factory=dict)  # the first call's output
    error: str | None = None  # why the forward failed, if it did

    def ran_once(self) -> dict[int, Any]:
        """Outputs of the modules that ran exactly once (safe to reuse for their inputs)."""
        return {k: v for k, v in self.outputs.items() if self.calls.get(k) == 1}


def default_example_input(model: nn.Module, batch: int = PROBE_BATCH) -> Tensor:
    """An input of the size the model expects: timm's ``pretrained_cfg``, torchvision ViT's
    ``image_size``, else 3x224x224."""
    size: Sequence[int] = (3, 224, 224)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), list | tuple):
        size = tuple(int(s) for s in cfg["input_size"])
    elif isinstance(getattr(model, "image_size", None), int):
        size = (3, int(model.image_size), int(model.image_size))  # type: ignore[arg-type]
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(img_size, list | tuple) and len(img_size) == 2 and img_size[0]:
        size = (size[0], int(img_size[0]), int(img_size[1]))
    return torch.empty((batch, *size), device="meta")


def probe(model: nn.Module, example_inputs: Sequence[Any] | None = None) -> Probe:
    """Run ``model`` once, recording call order and each module's inputs and outputs."""
    inputs = (
        tuple(to_meta(v) for v in example_inputs)
        if example_inputs
        else (default_example_input(model),)
    )
    result = _probe_once(model, inputs, meta=True)
    if result.error is None:
        return result
    device = next((t.device for t in model.parameters() if not t.is_meta), None)
    if device is None:
        return result
    real = _probe_once(model, tuple(materialise(v, device) for v in inputs), meta=False)
    return real if real.error is None else result


def _probe_once(model: nn.Module, inputs: tuple[Any, ...], *, meta: bool) -> Probe:
    result = Probe()

    def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key = id(mod)
        result.calls[key] = result.calls.get(key, 0) + 1
        if key not in result.order:
            result.order[key] = len(result.order)
            result.inputs[key] = (args, dict(kwargs))

    def post_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        result.outputs.setdefault(id(mod), output)

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(post_hook) for m in model.modules()]
    try:
        with meta_execution(model) if meta else real_execution(model):
            model(*inputs)
    except Exception as exc:  # any model code can fail here; the caller reports it
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        for h in handles:
            h.remove()
    return result
