"""What dpatch did to one rewritten block: :class:`PatchMeta`, kept on the block (see
:mod:`dpatch._marks`) to find its sites again, to undo the rewrite and to pickle it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpatch._codegen import GeneratedCode

__all__ = ["NOT_REQUESTED", "PatchMeta", "PatchedSite"]

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
    """What dpatch did to one block (kept on the instance, see :mod:`dpatch._marks`).

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
