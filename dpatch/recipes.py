"""Published stochastic-depth recipes, each with its source.

A :class:`Recipe` is what a paper or its repository trained with: the per-layer schedule
(``schedule.py`` kinds), the rate (per model size where it depends on it), what one
schedule step covers, the drop mode and scaling, and the rate over training time (a
:class:`TimeSchedule`, run by :class:`dpatch.DropPathScheduler`).
:func:`resolve_recipe` turns one into the keyword arguments of ``inject``/``retune`` and of
the scheduler; where the rate depends on the model size it reads the size from the model
(the number of residual blocks and the width of the first one), or asks for ``size=``.

Every figure here is checked against the cited file; where the issue that asked for a
recipe and its source disagree, the source wins and ``notes`` says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from dpatch.droppath import MODES, SCALINGS
from dpatch.errors import DPatchError, InvalidValueError
from dpatch.schedule import SCHEDULES, check_rate
from dpatch.scheduler import check_config

__all__ = [
    "ModelShape",
    "Recipe",
    "ResolvedRecipe",
    "SizeRate",
    "Source",
    "TimeSchedule",
    "get_recipe",
    "list_recipes",
    "model_shape",
    "resolve_recipe",
]


_SIZE_ALIASES = {
    "tiny": "t",
    "small": "s",
    "base": "b",
    "large": "l",
    "xlarge": "xl",
    "x-large": "xl",
    "huge": "h",
    "giant": "g",
}
_SIZE_PREFIXES = ("vit-", "vit_", "convnext-", "convnext_", "swin-", "swin_", "resnet-", "resnet")


def _size_key(size: str) -> str:
    key = str(size).strip().lower()
    for prefix in _SIZE_PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            key = key[len(prefix) :]
            break
    return _SIZE_ALIASES.get(key, key)


@dataclass(frozen=True)
class Source:
    """Where a recipe comes from: the paper and the file that holds the numbers."""

    paper: str
    url: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"paper": self.paper, "url": self.url, "detail": self.detail}


@dataclass(frozen=True)
class SizeRate:
    """The rate of one model size, and how to recognise that size in a model.

    Attributes:
        size: the short name users pass as ``size=`` (``"S"``, ``"B"``, ``"50"``, ...).
        max_rate: the recipe's rate for this size.
        blocks: residual blocks (dpatch schedule steps with ``per="block"``); None: any.
        width: channels of the first residual block (ViT embed dim, ConvNeXt/Swin stage-1
            dim); None: any.
    """

    size: str
    max_rate: float
    blocks: int | None = None
    width: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "max_rate": self.max_rate,
            "blocks": self.blocks,
            "width": self.width,
        }


@dataclass(frozen=True)
class TimeSchedule:
    """The rate over training time, as ``DropPathScheduler`` arguments.

    Attributes:
        kind: a scheduler kind (``"constant"``, ``"early"``, ``"late"``, ...).
        shape: ``"early"`` only: ``"constant"`` or ``"linear"``.
        cutoff_epochs: ``"early"``/``"late"``: the epoch where the phase switches ...
        epochs: ... out of this many; the scheduler gets the fraction of ``total_steps``.
    """

    kind: str = "constant"
    shape: str = "constant"
    cutoff_epochs: int | None = None
    epochs: int | None = None

    @property
    def cutoff_fraction(self) -> float | None:
        """The cutoff as a share of training (``cutoff_epochs / epochs``)."""
        if self.cutoff_epochs is None or self.epochs is None:
            return None
        return self.cutoff_epochs / self.epochs

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``DropPathScheduler`` (add ``total_steps=`` for a cutoff)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "early":
            out["shape"] = self.shape
        if self.cutoff_fraction is not None:
            out["cutoff_fraction"] = self.cutoff_fraction
        return out

    def describe(self) -> str:
        """One line for tables: ``early (linear decay to 0), epochs 0-50 of 300``."""
        if self.kind == "early":
            how = "linear decay to 0" if self.shape == "linear" else "constant"
            return f"early ({how}), first {self.cutoff_epochs} of {self.epochs} epochs, then 0"
        if self.kind == "late":
            return f"late: 0 for the first {self.cutoff_epochs} of {self.epochs} epochs, then on"
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "shape": self.shape,
            "cutoff_epochs": self.cutoff_epochs,
            "epochs": self.epochs,
            "cutoff_fraction": self.cutoff_fraction,
            "describe": self.describe(),
        }


@dataclass(frozen=True)
class Recipe:
    """A published stochastic-depth setting.

    Attributes:
        name: registry key (``dpatch recipes``, ``--recipe``).
        title: what was trained, on what (one line).
        schedule: per-layer schedule kind (``linear``, ``uniform``, ``huang``).
        source: paper and repository file.
        max_rate: the rate when it does not depend on the size (else None).
        sizes: the rate per size, when it does.
        per, mode, scaling, skip: as in ``inject``.
        time: the rate over training time.
        notes: caveats, and where a number differs from what one might expect.
    """

    name: str
    title: str
    schedule: str
    source: Source
    max_rate: float | None = None
    sizes: tuple[SizeRate, ...] = ()
    per: str = "block"
    mode: str = "row"
    scaling: str = "inverted"
    skip: bool = False
    time: TimeSchedule = field(default_factory=TimeSchedule)
    notes: str = ""

    def __post_init__(self) -> None:
        # A recipe is checked where it is written: a typo in the registry fails on import,
        # a user's own Recipe fails where it is built.
        where = f"recipe {self.name!r}"
        if (self.max_rate is None) == (not self.sizes):
            raise InvalidValueError(f"{where}: give either max_rate or sizes, not both or none")
        # "custom" needs a list of rates per block, which no size-free recipe can hold.
        schedules = tuple(k for k in SCHEDULES if k != "custom")
        for label, value, choices in (
            ("schedule", self.schedule, schedules),
            ("per", self.per, _PER),
            ("mode", self.mode, MODES),
            ("scaling", self.scaling, SCALINGS),
        ):
            if value not in choices:
                raise InvalidValueError(
                    f"{where}: unknown {label} {value!r}; choose one of: {', '.join(choices)}"
                )
        rates = [self.max_rate] if self.max_rate is not None else [s.max_rate for s in self.sizes]
        for rate in rates:
            check_rate(rate, f"{where} rate")
        keys = [_size_key(s.size) for s in self.sizes]
        if len(set(keys)) != len(keys):
            raise InvalidValueError(f"{where}: sizes repeat ({self.size_names})")
        check_config(**self.time.scheduler_kwargs(), total_steps=self.time.epochs)

    @property
    def sized(self) -> bool:
        """True when the rate depends on the model size."""
        return bool(self.sizes)

    def rate_for(self, size: str | None) -> float:
        """The rate for ``size`` (``None`` for a recipe without sizes).

        Raises:
            InvalidValueError: an unknown size, or none given where one is needed.
        """
        if self.max_rate is not None:
            return self.max_rate
        if size is None:
            raise InvalidValueError(
                f"recipe {self.name!r} depends on the model size; pass size= (CLI --size), "
                f"one of: {self.size_names}"
            )
        return self.size_rate(size).max_rate

    @property
    def size_names(self) -> str:
        """The sizes, comma-separated (for messages and listings)."""
        return ", ".join(s.size for s in self.sizes)

    def size_rate(self, size: str) -> SizeRate:
        """The entry of ``size`` (case-insensitive; ``base``, ``ViT-B``, ``ResNet-50`` work).

        Raises:
            InvalidValueError: an unknown size (the message lists the recipe's sizes).
        """
        key = _size_key(size)
        for s in self.sizes:
            if _size_key(s.size) == key:
                return s
        raise InvalidValueError(
            f"unknown size {size!r} for recipe {self.name!r}; choose one of: {self.size_names}"
        )

    @property
    def rates_text(self) -> str:
        """``S 0.05, B 0.2, L 0.45, H 0.6`` or ``0.1``."""
        if not self.sizes:
            return f"{self.max_rate:g}"
        return ", ".join(f"{s.size} {s.max_rate:g}" for s in self.sizes)

    def summary(self) -> dict[str, str]:
        """The columns of a recipe listing (``dpatch recipes``), as text."""
        how = f"{self.schedule}, per {self.per}, {self.mode}"
        if self.scaling != "inverted":
            how += f", {self.scaling} scaling"
        if self.skip:
            how += ", skip"
        return {
            "name": self.name,
            "title": self.title,
            "rates": self.rates_text,
            "schedule": how,
            "time": self.time.describe(),
            "source": f"{self.source.paper} - {self.source.url}",
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``dpatch recipes --json``)."""
        return {
            "name": self.name,
            "title": self.title,
            "schedule": self.schedule,
            "per": self.per,
            "mode": self.mode,
            "scaling": self.scaling,
            "skip": self.skip,
            "max_rate": self.max_rate,
            "sizes": [s.to_dict() for s in self.sizes],
            "time": self.time.to_dict(),
            "source": self.source.to_dict(),
            "notes": self.notes,
        }


@dataclass(frozen=True)
class ModelShape:
    """What size detection reads from a model: residual blocks and the first one's width."""

    blocks: int
    width: int | None

    def describe(self) -> str:
        width = "unknown width" if self.width is None else f"width {self.width}"
        return f"{self.blocks} residual blocks, {width}"


@dataclass(frozen=True)
class ResolvedRecipe:
    """A recipe applied to a size: the arguments of ``inject``/``retune`` and the scheduler.

    ``inject(model, **r.inject_kwargs)`` then
    ``DropPathScheduler(model, **r.scheduler_kwargs, total_steps=n)`` reproduce it.

    Attributes:
        recipe: the recipe.
        size: the size used (None for a recipe without sizes).
        size_from: ``"argument"`` (given), ``"model"`` (detected) or ``""`` (no sizes).
        max_rate: the rate for that size.
        shape: what detection read from the model, when it did.
    """

    recipe: Recipe
    size: str | None
    size_from: str
    max_rate: float
    shape: ModelShape | None = None

    @property
    def inject_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``dpatch.inject`` / ``dpatch.retune`` (a fresh dict)."""
        r = self.recipe
        return {
            "max_rate": self.max_rate,
            "schedule": r.schedule,
            "per": r.per,
            "mode": r.mode,
            "scaling": r.scaling,
            "skip": r.skip,
        }

    @property
    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``DropPathScheduler`` (a fresh dict); a cutoff comes as
        ``cutoff_fraction``, so add ``total_steps=``."""
        return self.recipe.time.scheduler_kwargs()

    @property
    def needs_total_steps(self) -> bool:
        """True when the scheduler needs ``total_steps`` (a cutoff given as a fraction)."""
        return "cutoff_fraction" in self.scheduler_kwargs

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, for reports and manifests."""
        return {
            "recipe": self.recipe.name,
            "title": self.recipe.title,
            "size": self.size,
            "size_from": self.size_from,
            "model_shape": None
            if self.shape is None
            else {"blocks": self.shape.blocks, "width": self.shape.width},
            "inject": self.inject_kwargs,
            "scheduler": self.scheduler_kwargs,
            "time": self.recipe.time.describe(),
            "source": self.recipe.source.to_dict(),
            "notes": self.recipe.notes,
        }


# --------------------------------------------------------------------------- sources
_DEIT = Source(
    "Touvron et al. 2021, Training data-efficient image transformers & distillation "
    "through attention (ICML, arXiv:2012.12877)",
    "https://github.com/facebookresearch/deit/blob/main/main.py",
    "--drop-path default 0.1 for every DeiT; timm's VisionTransformer spreads it "
    "linearly over the blocks",
)
_DEIT3 = Source(
    "Touvron, Cord & Jegou 2022, DeiT III: Revenge of the ViT (ECCV, arXiv:2204.07118)",
    "https://github.com/facebookresearch/deit/blob/main/README_revenge.md",
    "--drop-path of the training commands per size; models_v2.py gives every block the same rate",
)
_CONVNEXT = Source(
    "Liu et al. 2022, A ConvNet for the 2020s (CVPR, arXiv:2201.03545)",
    "https://github.com/facebookresearch/ConvNeXt/blob/main/TRAINING.md",
    "--drop_path of the training commands; models/convnext.py spreads it linearly over all blocks",
)
_SWIN = Source(
    "Liu et al. 2021, Swin Transformer: Hierarchical Vision Transformer using Shifted "
    "Windows (ICCV, arXiv:2103.14030)",
    "https://github.com/microsoft/Swin-Transformer/blob/main/configs/swin/"
    "swin_tiny_patch4_window7_224.yaml",
    "DROP_PATH_RATE of configs/swin/swin_{tiny,small,base}_patch4_window7_224.yaml; "
    "spread linearly over all blocks",
)
_DINOV2 = Source(
    "Oquab et al. 2023, DINOv2: Learning Robust Visual Features without Supervision "
    "(TMLR, arXiv:2304.07193)",
    "https://github.com/facebookresearch/dinov2/blob/main/dinov2/configs/ssl_default_config.yaml",
    "drop_path_rate 0.3 and drop_path_uniform in the default config; 0.4 in "
    "configs/train/vitl14.yaml and vitg14.yaml; blocks compute the branch on a subset "
    "of the batch above rate 0.1",
)
_HUANG = Source(
    "Huang et al. 2016, Deep Networks with Stochastic Depth (ECCV, arXiv:1603.09382)",
    "https://github.com/yueatsprograms/Stochastic_Depth/blob/master/ResidualDrop.lua",
    "linear decay rule to p_L = 0.5 for 110-layer ResNets on CIFAR; a gate per "
    "mini-batch; eval multiplies the branch by its survival probability",
)
_LIU = Source(
    "Liu et al. 2023, Dropout Reduces Underfitting (ICML, arXiv:2303.01500)",
    "https://github.com/facebookresearch/dropout/blob/main/README.md",
    "--drop_path, --drop_mode, --drop_schedule, --cutoff_epoch of the basic-recipe "
    "commands; drop_scheduler.py gives the rate per iteration",
)
_COMPOSER = Source(
    "MosaicML Composer, Stochastic Depth (Block) method card, after Huang et al. 2016",
    "https://github.com/mosaicml/composer/blob/dev/docs/source/method_cards/stochastic_depth.md",
    "drop_rate 0.2 (ResNet-50) / 0.4 (ResNet-101), drop_distribution 'linear' = "
    "(i + 1) / N * rate in stochastic_depth.py, drop_warmup 0, same blocks on every GPU",
)

# inject's ``per`` choices (patch.PER); not imported, so patch.py may import this module.
_PER = ("block", "branch")

# Sizes recognised by (residual blocks, width of the first block).
_VIT = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "H": (32, 1280), "g": (40, 1536)}
_CONVNEXT_SIZES = {"T": (18, 96), "S": (36, 96), "B": (36, 128), "L": (36, 192), "XL": (36, 256)}
_SWIN_SIZES = {"T": (12, 96), "S": (24, 96), "B": (24, 128)}
_RESNET = {"50": (16, None), "101": (33, None)}


def _sizes(table: Mapping[str, tuple[int, int | None]], **rates: float) -> tuple[SizeRate, ...]:
    return tuple(SizeRate(s, rate, *table[s]) for s, rate in rates.items())


_RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "deit",
        "DeiT-Ti/S/B on ImageNet-1k",
        "linear",
        _DEIT,
        max_rate=0.1,
    ),
    Recipe(
        "deit3-in1k",
        "DeiT III ViT-S/B/L/H, ImageNet-1k training",
        "uniform",
        _DEIT3,
        sizes=_sizes(_VIT, S=0.05, B=0.2, L=0.45, H=0.6),
    ),
    Recipe(
        "deit3-in21k",
        "DeiT III ViT-S/B/L/H, ImageNet-21k pre-training",
        "uniform",
        _DEIT3,
        sizes=_sizes(_VIT, S=0.05, B=0.1, L=0.3, H=0.5),
    ),
    Recipe(
        "deit3-in21k-ft",
        "DeiT III ViT-S/B/L/H, ImageNet-1k fine-tuning after 21k pre-training",
        "uniform",
        _DEIT3,
        sizes=_sizes(_VIT, S=0.05, B=0.15, L=0.4, H=0.45),
    ),
    Recipe(
        "convnext-in1k",
        "ConvNeXt-T/S/B/L, ImageNet-1k training",
        "linear",
        _CONVNEXT,
        sizes=_sizes(_CONVNEXT_SIZES, T=0.1, S=0.4, B=0.5, L=0.5),
    ),
    Recipe(
        "convnext-in22k",
        "ConvNeXt-B/L/XL, ImageNet-22k pre-training",
        "linear",
        _CONVNEXT,
        sizes=_sizes(_CONVNEXT_SIZES, B=0.1, L=0.1, XL=0.2),
    ),
    Recipe(
        "convnext-in22k-ft",
        "ConvNeXt-B/L/XL, ImageNet-1k fine-tuning (224 px) after 22k pre-training",
        "linear",
        _CONVNEXT,
        sizes=_sizes(_CONVNEXT_SIZES, B=0.2, L=0.3, XL=0.4),
    ),
    Recipe(
        "swin",
        "Swin-T/S/B, ImageNet-1k training (224 px, window 7)",
        "linear",
        _SWIN,
        sizes=_sizes(_SWIN_SIZES, T=0.2, S=0.3, B=0.5),
    ),
    Recipe(
        "dinov2",
        "DINOv2 self-supervised ViT pre-training (S/B: default config, L/g: train configs)",
        "uniform",
        _DINOV2,
        sizes=_sizes(_VIT, S=0.3, B=0.3, L=0.4, g=0.4),
        skip=True,
        notes="DINOv2 computes a dropped residual only on the kept samples (skip=True); "
        "its released ViT-S/B were distilled from ViT-g, so their 0.3 is the "
        "default config's, not a published run's",
    ),
    Recipe(
        "huang-cifar",
        "ResNet-110 on CIFAR-10/100 (Huang et al.'s stochastic depth)",
        "huang",
        _HUANG,
        max_rate=0.5,
        mode="batch",
        scaling="expected",
    ),
    Recipe(
        "early-sd-vit-t",
        "ViT-T, early stochastic depth, ImageNet-1k basic recipe (300 epochs)",
        "linear",
        _LIU,
        max_rate=0.5,
        time=TimeSchedule("early", "linear", cutoff_epochs=50, epochs=300),
        notes="early stochastic depth uses --drop_path 0.5; the 0.1 of the same README is "
        "early *dropout*, which dpatch does not do. With the improved recipe (600 epochs) "
        "the cutoff stays at epoch 50",
    ),
    Recipe(
        "late-sd-vit-b",
        "ViT-B, late stochastic depth, ImageNet-1k basic recipe (300 epochs)",
        "linear",
        _LIU,
        max_rate=0.4,
        time=TimeSchedule("late", cutoff_epochs=50, epochs=300),
    ),
    Recipe(
        "composer-resnet",
        "ResNet-50/101 on ImageNet, block-wise stochastic depth (Composer)",
        "huang",
        _COMPOSER,
        sizes=_sizes(_RESNET, **{"50": 0.2, "101": 0.4}),
        mode="batch",
        scaling="expected",
        notes="Composer's suggested hyperparameters use no drop warm-up (drop_warmup=0); "
        "add one with DropPathScheduler(kind='warmup') if wanted",
    ),
)

RECIPES: Mapping[str, Recipe] = MappingProxyType({r.name: r for r in _RECIPES})


# --------------------------------------------------------------------------- lookup
def list_recipes() -> tuple[Recipe, ...]:
    """Every recipe, in listing order."""
    return _RECIPES


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (case-insensitive).

    Raises:
        InvalidValueError: no such recipe (the message lists them).
    """
    key = str(name).strip().lower()
    if key not in RECIPES:
        raise InvalidValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[key]


def resolve_recipe(
    name: str | Recipe,
    model: nn.Module | None = None,
    size: str | None = None,
    *,
    example_inputs: Sequence[Any] | None = None,
) -> ResolvedRecipe:
    """A recipe's ``inject`` and scheduler arguments for one model size.

    Args:
        name: a recipe name (or a :class:`Recipe`).
        model: where the size is read from when ``size`` is not given (a meta-device
            probe, as ``inspect`` runs): the number of residual blocks and the width of
            the first one must match exactly one of the recipe's sizes.
        size: the size (``"S"``, ``"base"``, ``"ViT-L"``, ``"50"``, ...); wins over the model.
        example_inputs: inputs for the probe, for models that do not take an image.

    Raises:
        InvalidValueError: an unknown recipe or size, or a size-dependent recipe whose size
            is neither given nor readable from the model (the message asks for ``size=``).
    """
    recipe = name if isinstance(name, Recipe) else get_recipe(name)
    if not recipe.sized:
        if size is not None:
            raise InvalidValueError(
                f"recipe {recipe.name!r} has one rate for every model; size={size!r} has no "
                "meaning for it"
            )
        return ResolvedRecipe(recipe, None, "", recipe.rate_for(None))
    if size is not None:
        chosen = recipe.size_rate(size)
        return ResolvedRecipe(recipe, chosen.size, "argument", chosen.max_rate)
    if model is None:
        raise InvalidValueError(
            f"recipe {recipe.name!r} depends on the model size; pass size= (CLI --size), one "
            f"of: {recipe.size_names}, or the model to read it from"
        )
    shape = model_shape(model, example_inputs, recipe=recipe.name)
    matches = [
        s
        for s in recipe.sizes
        if (s.blocks is None or s.blocks == shape.blocks)
        and (s.width is None or s.width == shape.width)
    ]
    if len(matches) != 1:
        which = ", ".join(s.size for s in matches) if matches else "none"
        raise InvalidValueError(
            f"recipe {recipe.name!r} depends on the model size and this model "
            f"({shape.describe()}) matches {which} of {recipe.size_names}; pass size= "
            "(CLI --size)"
        )
    return ResolvedRecipe(recipe, matches[0].size, "model", matches[0].max_rate, shape)


def model_shape(
    model: nn.Module, example_inputs: Sequence[Any] | None = None, *, recipe: str = ""
) -> ModelShape:
    """Residual blocks (distinct ``Site.block``) and the width of the first one.

    The width is the first size-carrying layer in the first residual block's module, in
    registration order: a norm's features, a convolution's or linear layer's input
    channels (ViT ``norm1``, ConvNeXt ``conv_dw``, Swin ``norm1``).

    Raises:
        InvalidValueError: the model could not be probed or has no residual site.
    """
    from dpatch.sites import find_sites  # sites imports the model zoo; keep this lazy

    ask = f" for recipe {recipe!r}" if recipe else ""
    try:
        sites = find_sites(model, example_inputs)
    except DPatchError as exc:
        raise InvalidValueError(
            f"could not read the model size{ask} ({exc}); pass size= (CLI --size)"
        ) from exc
    if not sites:
        raise InvalidValueError(
            f"could not read the model size{ask}: no residual block found; pass size= "
            "(CLI --size), or example_inputs= if the model does not take an image"
        )
    block = model.get_submodule(sites[0].path)
    return ModelShape(len({s.block for s in sites}), _width(block))


def _width(module: nn.Module) -> int | None:
    for m in module.modules():
        if isinstance(m, nn.LayerNorm) and m.normalized_shape:
            return int(m.normalized_shape[-1])
        if isinstance(m, nn.GroupNorm):
            return int(m.num_channels)
        if isinstance(m, nn.modules.batchnorm._NormBase):
            return int(m.num_features)
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
        if isinstance(m, nn.Linear):
            return int(m.in_features)
    return None
