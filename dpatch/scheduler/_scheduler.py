"""Rates that change with training time: warm-up, progressive layer drop, early/late
stochastic depth, milestones, or any function of the step.

:class:`DropPathScheduler` keeps each DropPath's target rate and sets ``target * factor(t)``
where ``t`` counts optimizer steps taken, like a learning-rate scheduler. Setting a rate is a
host float plus a 0-dim tensor fill: cheap, no synchronisation, and compiled graphs
(masking sites) pick it up without recompiling.

Factors (``t`` = optimizer steps taken so far; the rates a step trains with are set before
it, by the constructor or the previous ``step()``):

- ``"warmup"`` (Composer's ``drop_warmup``; ``"linear"`` is an older name for it, not the
  per-layer ``schedule="linear"``): ``min(1, t / warmup_steps)``.
- ``"exp-ramp"`` (LayerSkip's curriculum ``S(t)``, Elhoushi et al. 2024): ``2^(t / T) - 1``
  (``e^(t ln 2 / T) - 1``), rising from 0 to 1 over ``T`` steps and 1 after; ``T`` is
  ``warmup_steps`` when given, else ``total_steps`` (the whole run, as LayerSkip's curriculum).
- ``"progressive"`` (DeepSpeed's progressive layer drop, Zhang & He 2020): the global keep
  probability ``theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar`` and layer ``i`` of
  ``L`` keeps with ``1 - i/L * (1 - theta(t))``. With per-layer targets ``i/L * (1 -
  theta_bar)`` (``schedule="huang"``, ``max_rate = 1 - theta_bar``) that is the factor
  ``(1 - theta(t)) / (1 - theta_bar) = 1 - exp(-gamma * t)``.
- ``"constant"``: 1 (targets as they are).
- ``"early"`` (Liu et al. 2023, "Dropout Reduces Underfitting", facebookresearch/dropout
  ``drop_scheduler``): the targets for the first ``cutoff`` steps, then 0. ``shape=
  "constant"`` holds them; ``shape="linear"`` decays them as ``np.linspace(1, 0, cutoff)``,
  i.e. ``1 - t / (cutoff - 1)``, reaching 0 on the last early step.
- ``"late"`` (same source): 0 for the first ``cutoff`` steps, then the targets.
- ``"step"``: ``milestones=[(step, factor), ...]``; the factor of the last milestone at or
  before ``t``, 1 before the first one (as ``torch.optim.lr_scheduler.MultiStepLR`` keeps the
  base rate before its first milestone).
- a callable ``t -> factor``: anything else. Its state is only the step: pass the same
  function again when resuming.

Steps or epochs: ``step()`` once per optimizer step; or timm's convention,
``step_update(num_updates)`` after each update and ``step_epoch(epoch)`` at the start of
epoch ``epoch`` (timm calls ``scheduler.step(epoch + 1)`` at the end of an epoch), which
needs ``steps_per_epoch``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from dpatch.droppath import DropPath
from dpatch.errors import InvalidValueError
from dpatch.scheduler._factors import (
    STATE_VERSION,
    FactorFn,
    check_config,
    check_count,
    check_factor,
    check_target,
    config_args,
    factor_at,
)

__all__ = ["DropPathScheduler"]


class DropPathScheduler:
    """Scale every DropPath rate of a model by a factor of the training step.

    Args:
        model: a model with dpatch DropPath modules (after ``inject``/``retune``); their
            current rates become the targets.
        kind: ``"warmup"`` (alias ``"linear"``), ``"exp-ramp"``, ``"progressive"``,
            ``"constant"``, ``"early"``, ``"late"``, ``"step"``, or a function
            ``step -> factor``.
        warmup_steps: steps of the warm-up ramp (``"warmup"``), > 0; of the exponential
            ramp (``"exp-ramp"``; default ``total_steps``).
        gamma: decay speed of progressive layer drop (DeepSpeed's default 0.001).
        cutoff: ``"early"``/``"late"``: the step where stochastic depth ends / starts.
        cutoff_fraction: the cutoff as a fraction of ``total_steps`` instead (rounded half
            up, at least 1 step), e.g. 50/300 for Liu et al.'s 50 of 300 epochs.
        shape: ``"early"`` only: ``"constant"`` or ``"linear"`` (decaying to 0).
        milestones: ``"step"`` only: ``[(step, factor), ...]`` by increasing step.
        total_steps: optimizer steps of the whole run; checked against cutoff and
            milestones, needed by ``cutoff_fraction``.
        steps_per_epoch: optimizer steps per epoch, needed by ``step_epoch``.

    Raises:
        InvalidValueError: an unknown kind, an argument that means nothing for the kind, a
            cutoff or milestone beyond ``total_steps``, milestones out of order, a factor
            that would push a target to 1 or above (or below 0), or a model without dpatch
            DropPath modules. Nothing is changed when it raises.

    Example::

        report = dpatch.inject(model, 0.2)
        sched = dpatch.DropPathScheduler(model, kind="warmup", warmup_steps=1000)
        for batch in loader:
            ...
            optimizer.step()
            sched.step()
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str | FactorFn = "warmup",
        *,
        warmup_steps: int = 0,
        gamma: float | None = None,
        cutoff: int | None = None,
        cutoff_fraction: float | None = None,
        shape: str = "constant",
        milestones: Sequence[tuple[int, float]] | None = None,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        fn: FactorFn | None = kind if callable(kind) else None
        cfg = check_config(
            kind,
            warmup_steps=warmup_steps,
            gamma=gamma,
            cutoff=cutoff,
            cutoff_fraction=cutoff_fraction,
            shape=shape,
            milestones=milestones,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
        )
        slots = [(n, m) for n, m in model.named_modules() if isinstance(m, DropPath)]
        if not slots:
            raise InvalidValueError(
                "the model has no dpatch DropPath to schedule; call dpatch.inject (or "
                "dpatch.retune) first"
            )
        targets = [m.drop_prob for _, m in slots]
        for step, f in cfg.milestones:
            check_factor(f, max(targets), f"milestone at step {step}")
        self._fn = fn
        self._cfg = cfg
        self._slots = slots
        self._targets = targets
        self.last_step = 0
        self._factor_now = self._checked_factor(0)
        self._apply(self._factor_now)

    # -- reading ------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The schedule kind (``"callable"`` for a function)."""
        return self._cfg.kind

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps of the whole run, when given."""
        return self._cfg.total_steps

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps per epoch, when given."""
        return self._cfg.steps_per_epoch

    @property
    def cutoff(self) -> int:
        """``"early"``/``"late"``: the switching step (0 for other kinds)."""
        return self._cfg.cutoff

    @property
    def current_factor(self) -> float:
        """The multiplier of every target rate now (at ``last_step``)."""
        return self._factor_now

    @property
    def current_rates(self) -> dict[str, float]:
        """Each DropPath's rate now, by module name (for logging)."""
        return {n: m.drop_prob for n, m in self._slots}

    @property
    def target_rates(self) -> dict[str, float]:
        """Each DropPath's target rate (the rate at factor 1), by module name."""
        return {n: t for (n, _), t in zip(self._slots, self._targets, strict=True)}

    @property
    def mean_rate(self) -> float:
        """Mean of the current rates (one number to log)."""
        return sum(m.drop_prob for _, m in self._slots) / len(self._slots)

    def factor(self, step: int) -> float:
        """The multiplier of every target rate at ``step`` (not checked; for plotting)."""
        if self._fn is not None:
            return float(self._fn(step))
        return factor_at(self._cfg, step)

    # -- advancing ----------------------------------------------------------------------
    def step(self) -> None:
        """Advance one optimizer step and set the rates."""
        self._go(self.last_step + 1)

    def step_update(self, num_updates: int) -> None:
        """Set the rates for ``num_updates`` optimizer steps taken (timm's ``step_update``).

        Idempotent, so a training loop (or a framework callback) can call it with its own
        step counter and never drift from it.
        """
        self._go(check_count(num_updates, "num_updates", minimum=0))

    def step_epoch(self, epoch: int) -> None:
        """Set the rates for the start of ``epoch`` (0-based): ``epoch * steps_per_epoch``
        steps taken. timm calls ``scheduler.step(epoch + 1)`` after epoch ``epoch``; the
        same call here is ``step_epoch(epoch + 1)``."""
        epoch = check_count(epoch, "epoch", minimum=0)
        if self._cfg.steps_per_epoch is None:
            raise InvalidValueError(
                "step_epoch needs steps_per_epoch= (optimizer steps per epoch) on the scheduler"
            )
        self._go(epoch * self._cfg.steps_per_epoch)

    def _go(self, t: int) -> None:
        f = self._checked_factor(t)  # raises before anything changes
        self.last_step = t
        self._factor_now = f
        self._apply(f)

    def _checked_factor(self, t: int) -> float:
        if self._fn is None:
            return factor_at(self._cfg, t)
        return check_factor(self._fn(t), max(self._targets), f"factor function at step {t}")

    def _apply(self, f: float) -> None:
        for (_, m), target in zip(self._slots, self._targets, strict=True):
            m.drop_prob = target * f

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: the step, the time schedule and the targets by module name.

        Plain JSON types only. A function kind saves ``kind="callable"`` and its step; the
        function itself is not saved, so pass it again to the scheduler you resume into.
        """
        return {
            "version": STATE_VERSION,
            **self._cfg.to_dict(),
            "last_step": self.last_step,
            "targets": self.target_rates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: restore the time schedule, step and targets, then set the rates.

        Raises:
            InvalidValueError: a state of another model (other DropPath names), a function
                kind loaded into a scheduler built without a function, or bad values.
                Nothing is changed when it raises.
        """
        if not isinstance(state, Mapping) or "targets" not in state or "last_step" not in state:
            raise InvalidValueError(
                "not a DropPathScheduler state (needs 'targets' and 'last_step'); was it saved "
                "by DropPathScheduler.state_dict()?"
            )
        targets = state["targets"]
        names = [n for n, _ in self._slots]
        if not isinstance(targets, Mapping) or set(targets) != set(names):
            saved = set(targets) if isinstance(targets, Mapping) else set()
            missing = sorted(set(names) - saved)
            extra = sorted(saved - set(names))
            raise InvalidValueError(
                "scheduler state is from another model: "
                f"{len(saved)} DropPath saved vs {len(names)} here "
                f"(missing {', '.join(missing[:3]) or '-'}; unknown {', '.join(extra[:3]) or '-'})"
            )
        new_targets = [check_target(targets[n], n) for n in names]
        kind = state.get("kind", "warmup")
        if kind == "callable":
            if self._fn is None:
                raise InvalidValueError(
                    "scheduler state was saved with a factor function; pass the same function "
                    "as kind= to the scheduler you load it into"
                )
            cfg = check_config(
                self._fn,
                total_steps=state.get("total_steps"),
                steps_per_epoch=state.get("steps_per_epoch"),
            )
            fn: FactorFn | None = self._fn
        else:
            cfg = check_config(kind, **config_args(state, kind))
            fn = None
        for step, f in cfg.milestones:
            check_factor(f, max(new_targets), f"milestone at step {step}")
        t = check_count(state["last_step"], "last_step", minimum=0)
        f_now = (
            check_factor(fn(t), max(new_targets), f"factor function at step {t}")
            if fn is not None
            else factor_at(cfg, t)
        )
        # Everything is checked: only now change the scheduler and the model.
        self._fn = fn
        self._cfg = cfg
        self._targets = new_targets
        self.last_step = t
        self._factor_now = f_now
        self._apply(f_now)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, last_step={self.last_step}, "
            f"factor={self._factor_now:.4g}, slots={len(self._slots)})"
        )
