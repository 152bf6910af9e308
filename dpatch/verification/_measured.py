"""What a slot (or a model's own LayerDrop) was seen to do, summarised: the share of drops
with its Wilson interval, and the scale kept rows carried. No model, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Measured", "wilson"]


def wilson(dropped: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927)."""
    if n == 0:
        return 0.0, 1.0
    p = dropped / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Measured:
    """A slot's realised behaviour, summarised.

    Attributes:
        unit: ``row`` (per-sample drops) or ``batch`` (one decision per call).
        draws: decisions observed (forward passes plus replays).
        dropped: of those, drops.
        share: dropped / draws (None without draws).
        low, high: the Wilson interval of ``share`` (equal to it when ``exact``).
        exact: compute-skipping: the share is a count, not a sample.
        scale: median factor a kept branch carried; ``expected_scale`` what the settings
            call for.
        problems: (code, message) of what does not fit the slot's settings.
    """

    unit: str
    draws: int
    dropped: int
    share: float | None
    low: float | None
    high: float | None
    exact: bool
    scale: float | None
    expected_scale: float | None
    problems: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "draws": self.draws,
            "dropped": self.dropped,
            "share": self.share,
            "interval": None if self.low is None else [self.low, self.high],
            "exact": self.exact,
            "scale": self.scale,
            "expected_scale": self.expected_scale,
        }
