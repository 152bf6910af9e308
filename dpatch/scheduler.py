"""Rates that change with training time: warm-up and progressive layer drop.

:class:`DropPathScheduler` keeps each DropPath's target rate and sets ``rate * factor(t)``
every ``step()``, like a learning-rate scheduler. Setting a rate is a host float plus a
0-dim device tensor fill: cheap, no synchronisation, and compiled graphs (masking sites)
pick it up without recompiling.

Factors:

- ``"linear"`` (Composer's ``drop_warmup``): ``min(1, t / warmup_steps)``.
- ``"progressive"`` (DeepSpeed's progressive layer drop, Zhang & He 2020): the global keep
  probability ``theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar`` and layer ``i`` of
  ``L`` keeps with ``1 - i/L * (1 - theta(t))``. With per-layer targets ``i/L * (1 -
  theta_bar)`` (``schedule="huang"``, ``max_rate = 1 - theta_bar``) that is the factor
  ``(1 - theta(t)) / (1 - theta_bar) = 1 - exp(-gamma * t)``.
- ``"constant"``: 1 (targets as they are).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from dpatch.droppath import DropPath
from dpatch.errors import InvalidValueError

__all__ = ["DropPathScheduler"]

KINDS = ("linear", "progressive", "constant")


class DropPathScheduler:
    """Scale every DropPath rate of a model by a factor of the training step.

    Args:
        model: a model with dpatch DropPath modules (after ``inject``/``retune``).
        kind: ``"linear"``, ``"progressive"`` or ``"constant"``.
        warmup_steps: steps of the linear ramp (``kind="linear"``), > 0.
        gamma: decay speed of progressive layer drop (DeepSpeed's default 0.001).

    Example::

        report = dpatch.inject(model, 0.2)
        sched = dpatch.DropPathScheduler(model, kind="linear", warmup_steps=1000)
        for batch in loader:
            ...
            optimizer.step()
            sched.step()
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str = "linear",
        *,
        warmup_steps: int = 0,
        gamma: float = 0.001,
    ) -> None:
        if kind not in KINDS:
            raise InvalidValueError(f"unknown scheduler kind {kind!r}; choose one of {KINDS}")
        if kind == "linear" and (isinstance(warmup_steps, bool) or warmup_steps <= 0):
            raise InvalidValueError(
                f"warmup_steps must be a positive number of steps, but got {warmup_steps!r}"
            )
        if kind == "progressive" and not (isinstance(gamma, int | float) and gamma > 0):
            raise InvalidValueError(f"gamma must be a positive number, but got {gamma!r}")
        self.slots: list[tuple[str, DropPath]] = [
            (n, m) for n, m in model.named_modules() if isinstance(m, DropPath)
        ]
        if not self.slots:
            raise InvalidValueError(
                "the model has no dpatch DropPath to schedule; call dpatch.inject first"
            )
        self.targets = [m.drop_prob for _, m in self.slots]
        self.kind = kind
        self.warmup_steps = int(warmup_steps)
        self.gamma = float(gamma)
        self.last_step = 0
        self._apply()

    def factor(self, step: int) -> float:
        """The multiplier of every target rate at ``step``."""
        if self.kind == "linear":
            return min(1.0, step / self.warmup_steps)
        if self.kind == "progressive":
            return 1.0 - math.exp(-self.gamma * step)
        return 1.0

    def step(self) -> None:
        """Advance one training step and set the rates."""
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        f = self.factor(self.last_step)
        for (_, m), target in zip(self.slots, self.targets, strict=True):
            m.drop_prob = target * f

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: the step and the targets by module name."""
        return {
            "kind": self.kind,
            "last_step": self.last_step,
            "warmup_steps": self.warmup_steps,
            "gamma": self.gamma,
            "targets": {n: t for (n, _), t in zip(self.slots, self.targets, strict=True)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: restores the step and targets, then sets the rates."""
        targets = state["targets"]
        names = [n for n, _ in self.slots]
        if sorted(targets) != sorted(names):
            raise InvalidValueError(
                "scheduler state does not match this model's DropPath modules "
                f"({len(targets)} saved vs {len(names)} here)"
            )
        self.kind = state["kind"]
        self.last_step = int(state["last_step"])
        self.warmup_steps = int(state["warmup_steps"])
        self.gamma = float(state["gamma"])
        self.targets = [float(targets[n]) for n in names]
        self._apply()
