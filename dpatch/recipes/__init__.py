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

from collections.abc import Sequence
from typing import Any

from torch import nn

from dpatch.analysis import find_sites
from dpatch.errors import DPatchError, InvalidValueError
from dpatch.recipes._book import RECIPES
from dpatch.recipes._records import (
    ModelShape,
    Recipe,
    ResolvedRecipe,
    SizeRate,
    Source,
    TimeSchedule,
)

__all__ = [
    "RECIPES",
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


# --------------------------------------------------------------------------- lookup
def list_recipes() -> tuple[Recipe, ...]:
    """Every recipe, in listing order."""
    return tuple(RECIPES.values())


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
