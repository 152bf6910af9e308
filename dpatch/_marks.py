"""The marks dpatch leaves on objects, and the only code that reads or writes them.

dpatch changes a model in three visible ways and remembers each on the object it changed:

- a rewritten block keeps its :class:`~dpatch.rewrite.PatchMeta` in its instance ``__dict__``
  (under a name TorchScript and ``state_dict`` ignore), so its sites can be found again and
  the rewrite undone;
- a dpatch ``DropPath`` that replaced a model's own slot keeps that slot's original value
  (a module, or ``None`` for timm's empty ResNet slots), so :func:`dpatch.strip` can put it
  back;
- a model built by :mod:`dpatch.zoo` keeps the spec it was built from, so it can be saved
  and rebuilt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from dpatch._patchmeta import PatchMeta
    from dpatch._spec import ModelSpec

__all__ = [
    "block_meta",
    "clear_block_meta",
    "clear_original_slot",
    "has_original_slot",
    "model_spec",
    "original_slot",
    "set_block_meta",
    "set_model_spec",
    "set_original_slot",
]

_BLOCK_META = "_dpatch_meta"
_ORIGINAL_SLOT = "_dpatch_original"
_MODEL_SPEC = "_dpatch_spec"


def block_meta(module: nn.Module) -> PatchMeta | None:
    """The PatchMeta of a block dpatch rewrote, or None."""
    return module.__dict__.get(_BLOCK_META)


def set_block_meta(module: nn.Module, meta: PatchMeta) -> None:
    # object.__setattr__: a plain instance attribute, never a submodule or buffer.
    object.__setattr__(module, _BLOCK_META, meta)


def clear_block_meta(module: nn.Module) -> None:
    module.__dict__.pop(_BLOCK_META, None)


def has_original_slot(slot: nn.Module) -> bool:
    """True for a dpatch DropPath that replaced a model's own slot."""
    return _ORIGINAL_SLOT in slot.__dict__


def original_slot(slot: nn.Module) -> Any:
    """The model's own slot value a dpatch DropPath replaced (a module, or None)."""
    return slot.__dict__[_ORIGINAL_SLOT]


def set_original_slot(slot: nn.Module, value: Any) -> None:
    object.__setattr__(slot, _ORIGINAL_SLOT, value)


def clear_original_slot(slot: nn.Module) -> None:
    slot.__dict__.pop(_ORIGINAL_SLOT, None)


def model_spec(model: nn.Module) -> ModelSpec | None:
    """The spec :func:`dpatch.zoo.create_model` built ``model`` from, or None."""
    return model.__dict__.get(_MODEL_SPEC)


def set_model_spec(model: nn.Module, spec: ModelSpec) -> None:
    object.__setattr__(model, _MODEL_SPEC, spec)
