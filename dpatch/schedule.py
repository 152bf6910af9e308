"""Per-layer drop-rate schedules: pure functions from (kind, depth, rates) to a list of floats.

Index ``i`` counts blocks (or branches) from 0 in forward order; ``N`` is the depth.

| kind           | rate of block i                               | convention                        |
|----------------|-----------------------------------------------|-----------------------------------|
| ``linear``     | ``min + (max - min) * i / (N - 1)``           | timm, torchvision ConvNeXt/Swin   |
| ``uniform``    | ``max``                                       | Composer ``uniform``, DINOv2      |
| ``huang``      | ``max * (i + 1) / N``                         | Huang et al. 2016, Composer       |
| ``efficientnet`` | ``max * i / N``                             | timm/torchvision EfficientNet     |
| ``cosine``     | ``min + (max - min) * (1 - cos(pi i/(N-1)))/2`` | smooth ramp                     |
| ``exponential`` | ``max * (2 ** (i / (N - 1)) - 1)``           | LayerSkip ``D(l)``                |
| ``custom``     | ``rates[i]``                                  | explicit list                     |

``exponential`` is LayerSkip's per-layer scale (Elhoushi et al. 2024, arXiv:2404.16710):
``D(l) = e^(l ln 2 / (L - 1)) - 1``, rising from 0 at the first layer to 1 at the last, as
torchtune's ``get_scale(ScaleType.EXP, L - 1, l)`` (``torchtune/modules/layer_dropout.py``)
computes it; one block gets ``max``, as torchtune's ``scale_period == 0`` does.

No torch import: schedules are plain arithmetic and are usable without a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dpatch.errors import InvalidValueError

SCHEDULES: tuple[str, ...] = (
    "linear",
    "uniform",
    "huang",
    "efficientnet",
    "cosine",
    "exponential",
    "custom",
)
#: What one schedule step covers: a block (its branches share a rate, timm's rule) or a branch.
PER: tuple[str, ...] = ("block", "branch")
_USES_MIN = frozenset({"linear", "cosine"})


def check_rate(value: object, name: str = "drop rate", *, allow_one: bool = False) -> float:
    """Return ``value`` as a float in [0, 1) (or [0, 1] with ``allow_one``: one site's own
    rate, as timm and torchvision accept), or raise naming the bad value.

    Raises:
        InvalidValueError: (a ``ValueError``) for non-numbers, NaN, negatives and values >= 1
            (> 1 with ``allow_one``).
    """
    span = "[0, 1]" if allow_one else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValueError(
            f"{name} must be a number in {span}, but got {value!r} ({type(value).__name__})"
        )
    rate = float(value)
    if not (0.0 <= rate <= 1.0 if allow_one else 0.0 <= rate < 1.0):  # also rejects NaN
        why = "" if allow_one else " (1 would drop every branch of every block)"
        raise InvalidValueError(f"{name} has to be in {span}{why}, but got {value!r}")
    return rate


def schedule_rates(
    kind: str,
    depth: int,
    max_rate: float,
    min_rate: float = 0.0,
    rates: Sequence[float] | None = None,
) -> list[float]:
    """Per-block drop rates for ``depth`` blocks.

    Args:
        kind: one of ``SCHEDULES``.
        depth: number of blocks (or branches with ``per="branch"``), >= 0.
        max_rate: rate of the deepest block (every block for ``uniform``).
        min_rate: rate of the first block for ``linear`` and ``cosine``; must be 0 for others
            (``exponential`` starts at 0, as LayerSkip's ``D(0)``).
        rates: the explicit list for ``custom`` (length ``depth``).

    Returns:
        ``depth`` floats, each in [0, 1).

    Raises:
        InvalidValueError: unknown kind, bad depth, rates out of range, or a ``custom``
            list of the wrong length.
    """
    if kind not in SCHEDULES:
        raise InvalidValueError(
            f"unknown schedule {kind!r}; choose one of: {', '.join(SCHEDULES)} "
            "(or 'native' when patching a model)"
        )
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise InvalidValueError(f"depth must be a non-negative integer, but got {depth!r}")
    if kind == "custom":
        if rates is None:
            raise InvalidValueError("schedule 'custom' needs rates=[...], one per block")
        if len(rates) != depth:
            raise InvalidValueError(
                f"custom rates have {len(rates)} values but the model has {depth} "
                f"{'block' if depth == 1 else 'blocks'}; give exactly {depth}"
            )
        return [check_rate(r, f"custom rate #{i}", allow_one=True) for i, r in enumerate(rates)]
    if rates is not None:
        raise InvalidValueError(f"rates=[...] is only used with schedule 'custom', not {kind!r}")

    hi = check_rate(max_rate, "max_rate")
    lo = check_rate(min_rate, "min_rate")
    if kind not in _USES_MIN and lo != 0.0:
        raise InvalidValueError(
            f"min_rate={min_rate!r} has no meaning for schedule {kind!r}; "
            "use it with 'linear' or 'cosine', or leave it at 0"
        )
    if lo > hi:
        raise InvalidValueError(f"min_rate={min_rate!r} is above max_rate={max_rate!r}")

    n = depth
    if kind == "uniform":
        out = [hi] * n
    elif kind == "huang":
        out = [hi * (i + 1) / n for i in range(n)]
    elif kind == "efficientnet":
        out = [hi * i / n for i in range(n)]
    elif n == 1:  # linear, cosine and exponential of one block: the deepest rate
        out = [hi]
    elif kind == "exponential":
        # 2 ** (i / (N-1)) is torchtune's exp(i ln 2 / (N-1)); it is 2 exactly at the last
        # block, so the deepest rate is max_rate bit for bit
        out = [hi * (2.0 ** (i / (n - 1)) - 1.0) for i in range(n)]
    elif kind == "linear":
        out = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    else:  # cosine
        out = [lo + (hi - lo) * (1.0 - math.cos(math.pi * i / (n - 1))) / 2.0 for i in range(n)]
    return [check_rate(r, f"rate of block {i}") for i, r in enumerate(out)]


def expected_depth(rates: Sequence[float]) -> float:
    """Expected number of surviving blocks, ``sum(1 - p)`` (Huang et al. 2016, eq. 3)."""
    return float(sum(1.0 - r for r in rates))
