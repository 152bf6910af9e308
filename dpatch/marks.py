"""The marks dpatch leaves on objects, what they say, and the only code that reads or
writes them.

dpatch changes a model in three visible ways and remembers each on the object it changed:

- a rewritten block keeps its :class:`PatchMeta` in its instance ``__dict__``
  (under a name TorchScript and ``state_dict`` ignore), so its sites can be found again and
  the rewrite undone;
- a dpatch ``DropPath`` that replaced a model's own slot keeps that slot's original value
  (a module, or ``None`` for timm's empty ResNet slots), so :func:`dpatch.strip` can put it
  back;

- a patched model keeps the per-layer schedule it was last patched with
  (:class:`ScheduleMark`: ``inject``, ``retune``, or a file's manifest), so ``retune``
  keeps its kind and reports label it;
- a module whose own LayerDrop ``inject`` turned off keeps the rate it had, by layer list
  (:func:`layerdrop_mark`), so :func:`dpatch.strip` can put it back.

(A model built by :mod:`dpatch.models` also keeps the spec it was built from; that mark
lives with :class:`~dpatch.models.ModelSpec`.)
"""

from __future__ import annotations

import hashlib
import importlib
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "NOT_REQUESTED",
    "GeneratedCode",
    "PatchMeta",
    "PatchedSite",
    "ScheduleMark",
    "block_meta",
    "clear_block_meta",
    "clear_original_slot",
    "has_original_slot",
    "layerdrop_mark",
    "original_slot",
    "schedule_mark",
    "set_block_meta",
    "set_layerdrop_mark",
    "set_original_slot",
    "set_schedule_mark",
]


@dataclass(frozen=True)
class _ModuleRef:
    """A module in a generated function's globals, by name (modules do not pickle)."""

    name: str


@dataclass(frozen=True)
class GeneratedCode:
    """The methods dpatch generated for one block class: sources and what they refer to.

    Attributes:
        functions: (method name, source) pairs; the last is ``forward``.
        globals: (name, value) pairs the sources read; modules are kept by name so the
            record pickles and deep-copies.
        in_place: the sources are the original class's own methods edited at source level
            (:mod:`dpatch.rewrite._source`): they run in that method's module, with its closure.
    """

    functions: tuple[tuple[str, str], ...]
    globals: tuple[tuple[str, Any], ...] = ()
    in_place: bool = False

    @classmethod
    def of(cls, functions: Mapping[str, str], globals_: Mapping[str, Any]) -> GeneratedCode:
        portable = tuple(
            (k, _ModuleRef(v.__name__) if isinstance(v, types.ModuleType) else v)
            for k, v in sorted(globals_.items())
        )
        return cls(tuple(functions.items()), portable)

    @property
    def key(self) -> str:
        """A digest of the sources: equal code, equal class."""
        text = "\n".join(f"{name}\n{src}" for name, src in self.functions) + str(self.in_place)
        return hashlib.sha1(text.encode()).hexdigest()

    def namespace(self) -> dict[str, Any]:
        """The globals the sources run in."""
        return {
            k: importlib.import_module(v.name) if isinstance(v, _ModuleRef) else v
            for k, v in self.globals
        }

    def source(self, name: str) -> str:
        return dict(self.functions)[name]


NOT_REQUESTED = "skip not requested"


@dataclass(frozen=True)
class PatchedSite:
    """One site of a rewritten block.

    Attributes:
        attr: the slot attribute holding its DropPath.
        kind: ``"native"`` or ``"graph"``.
        origin: the model's own slot attribute it came from ("" for graph sites).
        skippable: the generated forward has the compute-skipping form for it.
        skip_reason: why not, when it has not ("" otherwise).
        pruned: the branch is left out of the generated forward (the block returns the
            shortcut).
        dropped: for a pruned site, the children and attributes (relative to the block)
            that only its removed nodes used.
    """

    attr: str
    kind: str
    origin: str
    skippable: bool = False
    skip_reason: str = ""
    pruned: bool = False
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class PatchMeta:
    """What dpatch did to one block (kept on the instance, see below).

    Attributes:
        orig_cls: the block's class before the rewrite.
        sites: its sites, in graph order.
        added_attrs: DropPath children dpatch created (graph sites, second uses of a shared
            slot).
        replaced_slots: (attr, original value) of the native slots it replaced.
        consts: tensor constants the tracer lifted onto the block.
        code: the generated methods (pickling rebuilds the class from them).
        coverage: the coverage its sites were chosen under.
        unslotted: slot names of residual additions left alone under coverage "slots".
        unused: children and attributes (relative to the block) whose tensors only pruned
            branches use, confirmed by :func:`dpatch.prune` (left out of saved files).
    """

    orig_cls: type
    sites: tuple[PatchedSite, ...]
    added_attrs: tuple[str, ...]
    replaced_slots: tuple[tuple[str, Any], ...]
    consts: tuple[str, ...]
    code: GeneratedCode
    coverage: str = "slots"
    unslotted: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()

    @property
    def pruned(self) -> tuple[str, ...]:
        """The slot attributes of its pruned sites."""
        return tuple(s.attr for s in self.sites if s.pruned)

    @property
    def rewritten_without_skip(self) -> bool:
        """Rewritten by a masking-only patch (so a skipping patch must redo it). A block with
        pruned sites is never redone that way: it would lose its pruning."""
        return (
            not self.pruned
            and not any(s.skippable for s in self.sites)
            and any(s.skip_reason == NOT_REQUESTED for s in self.sites)
        )


_BLOCK_META = "_dpatch_meta"
_SCHEDULE = "_dpatch_schedule"
_ORIGINAL_SLOT = "_dpatch_original"
_LAYERDROP = "_dpatch_layerdrop"


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


@dataclass(frozen=True)
class ScheduleMark:
    """The per-layer schedule a model was last patched with.

    Attributes:
        schedule: the kind (``linear``, ``cosine``, ``custom``, ``native``, ...).
        per: ``block`` or ``branch``: what one step covers.
        max_rate: its deepest rate.
        min_rate: its first rate (``linear``, ``cosine``).
        rates: each step's rate.
    """

    schedule: str
    per: str
    max_rate: float
    min_rate: float
    rates: tuple[float, ...] = ()

    def describe(self) -> str:
        """``cosine (per branch)``."""
        return f"{self.schedule} (per {self.per})"


def schedule_mark(model: nn.Module) -> ScheduleMark | None:
    """The schedule ``model`` was last patched with (None: never, or stripped)."""
    return model.__dict__.get(_SCHEDULE)


def set_schedule_mark(model: nn.Module, mark: ScheduleMark | None) -> None:
    if mark is None:
        model.__dict__.pop(_SCHEDULE, None)
    else:
        object.__setattr__(model, _SCHEDULE, mark)


def layerdrop_mark(module: nn.Module) -> Mapping[str, float] | None:
    """The LayerDrop rates ``inject`` turned off on ``module``, by the name of the layer
    list they drop (None: none)."""
    return module.__dict__.get(_LAYERDROP)


def set_layerdrop_mark(module: nn.Module, rates: Mapping[str, float] | None) -> None:
    if not rates:
        module.__dict__.pop(_LAYERDROP, None)
    else:
        object.__setattr__(module, _LAYERDROP, dict(rates))
