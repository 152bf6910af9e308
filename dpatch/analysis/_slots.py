"""Native stochastic-depth slots: recognising them, reading their settings, and giving each
residual addition of a block the attribute that holds (or will hold) its DropPath.

A slot is a timm/torchvision/dpatch DropPath-like module, an ``nn.Identity`` stored under a
slot name (timm's rate-0 slots), or ``None`` under a slot name that the block's forward
reads (timm's ResNet).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from dpatch.analysis._residual import BlockSite, ResidualAdd
from dpatch.droppath import MODES, DropPath

__all__ = [
    "SLOT_ATTRS",
    "SlotSettings",
    "assign_slots",
    "forward_source",
    "is_slot_module",
    "owner_of",
    "referenced_none_slots",
    "slot_settings",
]

#: Attribute names timm and torchvision give their stochastic-depth slots.
SLOT_ATTRS: tuple[str, ...] = (
    "drop_path",
    "drop_path1",
    "drop_path2",
    "drop_path3",
    "attn_drop_path",
    "mlp_drop_path",
    "mhsa_drop_path",
    "mhca_drop_path",
    "stochastic_depth",
)


@dataclass(frozen=True)
class SlotSettings:
    """How one site drops: what a dpatch DropPath is configured with.

    Attributes:
        rate: drop probability.
        mode: ``"row"`` or ``"batch"``.
        scaling: ``"inverted"``, ``"expected"`` or ``"none"``.
        seed: seed of batch mode's host generator (None: torch's default generator).
        skip: compute-skipping (in a rewritten block that allows it).
    """

    rate: float = 0.0
    mode: str = "row"
    scaling: str = "inverted"
    seed: int | None = None
    skip: bool = False


def _slot_types() -> tuple[type, ...]:
    """DropPath-like classes of the libraries that are loaded (no import is forced)."""
    types: list[type] = [DropPath]
    timm_drop = sys.modules.get("timm.layers.drop")
    if timm_drop is not None:
        types.append(timm_drop.DropPath)
    tv_sd = sys.modules.get("torchvision.ops.stochastic_depth")
    if tv_sd is not None:
        types.append(tv_sd.StochasticDepth)
    return tuple(types)


#: Attributes a stochastic-depth class of another library keeps its rate in.
_RATE_ATTRS: tuple[str, ...] = ("drop_prob", "p", "drop_rate", "drop_path_rate", "prob", "rate")
_FOREIGN_SUFFIXES: tuple[str, ...] = ("droppath", "stochasticdepth")


def _foreign_rate_attr(module: object) -> str | None:
    """The rate attribute of another library's stochastic-depth module, recognised by
    behaviour rather than by a list of classes: a stateless module whose class name ends in
    ``DropPath`` or ``StochasticDepth`` (transformers' ``BeitDropPath``, ``SwinDropPath``,
    ..., mmcv's ``DropPath``, a user's copy of timm's) and that carries a drop probability.
    Stateless, so swapping it for dpatch's changes no state_dict key."""
    if not isinstance(module, nn.Module):
        return None
    if not type(module).__name__.lower().endswith(_FOREIGN_SUFFIXES):
        return None
    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
        return None
    for attr in _RATE_ATTRS:
        value = module.__dict__.get(attr)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return attr
    return None


def is_slot_module(module: object, attr: str | None = None) -> bool:
    """True for a DropPath-like module (timm, torchvision, dpatch, or another library's
    class recognised by behaviour), or an ``nn.Identity`` stored under a slot name."""
    if isinstance(module, _slot_types()) or _foreign_rate_attr(module) is not None:
        return True
    return isinstance(module, nn.Identity) and attr is not None and attr in SLOT_ATTRS


def slot_settings(module: object) -> SlotSettings:
    """The settings of a slot module; an Identity or None slot is rate 0."""
    if isinstance(module, DropPath):
        return SlotSettings(module.drop_prob, module.mode, module.scaling, module.seed, module.skip)
    tv_sd = sys.modules.get("torchvision.ops.stochastic_depth")
    if tv_sd is not None and isinstance(module, tv_sd.StochasticDepth):
        return SlotSettings(float(module.p), str(module.mode))
    timm_drop = sys.modules.get("timm.layers.drop")
    if timm_drop is not None and isinstance(module, timm_drop.DropPath):
        scaling = "inverted" if getattr(module, "scale_by_keep", True) else "none"
        return SlotSettings(float(module.drop_prob), "row", scaling)
    attr = _foreign_rate_attr(module)
    if attr is not None:
        assert isinstance(module, nn.Module)
        mode = module.__dict__.get("mode")
        scaling = "none" if module.__dict__.get("scale_by_keep") is False else "inverted"
        return SlotSettings(float(module.__dict__[attr]), mode if mode in MODES else "row", scaling)
    return SlotSettings()


def forward_source(mod: nn.Module, memo: dict[type, str | None]) -> str | None:
    """The source of ``type(mod).forward`` (None when Python cannot show it), memoised."""
    cls = type(mod)
    if cls not in memo:
        try:
            memo[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            memo[cls] = None
    return memo[cls]


def _none_slots(mod: nn.Module) -> list[str]:
    return [a for a in SLOT_ATTRS if a in mod.__dict__ and mod.__dict__[a] is None]


def referenced_none_slots(mod: nn.Module, memo: dict[type, str | None]) -> list[str]:
    """Slot attributes holding None that the module's forward source reads (timm ResNet)."""
    names = _none_slots(mod)
    if not names:
        return []
    src = forward_source(mod, memo)
    return [a for a in names if src is not None and f"self.{a}" in src]


def owner_of(slot_path: str, model: nn.Module) -> str:
    """The module a loose slot belongs to: its parent, unless it sits in an nn.Sequential."""
    owner = slot_path.rpartition(".")[0]
    while owner:
        mod = model.get_submodule(owner)
        if not isinstance(mod, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            break
        owner = owner.rpartition(".")[0]
    return owner


def assign_slots(mod: nn.Module, adds: Sequence[ResidualAdd]) -> list[BlockSite]:
    """The slot attribute (existing or new), kind and origin of each residual addition."""
    sites: list[BlockSite] = []
    taken: set[str] = set()
    none_slots = _none_slots(mod)
    unslotted = [a for a in adds if a.slot_node is None]
    for add in adds:
        if add.slot_node is not None:
            base = str(add.slot_node.target)
            name = base
            k = 1
            while name in taken:  # one module shared by two branches (torchvision Swin)
                name = f"{base}_{k}"
                k += 1
            site = BlockSite(name, "native", base, add)
        elif len(none_slots) == 1 and len(unslotted) == 1:
            # timm's ResNet keeps ``drop_path = None`` at rate 0
            site = BlockSite(none_slots[0], "native", none_slots[0], add)
        else:
            site = BlockSite(_free_name(mod, taken, len(unslotted)), "graph", "", add)
        taken.add(site.attr)
        sites.append(site)
    return sites


def _free_name(mod: nn.Module, taken: set[str], count: int) -> str:
    """``drop_path`` for a lone graph site, else ``drop_path1``, ``drop_path2``, ..."""
    names = ["drop_path"] if count == 1 else []
    names += [f"drop_path{i}" for i in range(1, 1000)]
    for name in names:
        if name not in taken and not hasattr(mod, name):
            return name
    raise RuntimeError("no free attribute name for a DropPath slot")  # pragma: no cover
