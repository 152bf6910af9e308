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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

from torch import nn

from dpatch.droppath import DropPath
from dpatch.errors import InvalidValueError

__all__ = [
    "EARLY_SHAPES",
    "KINDS",
    "DropPathScheduler",
    "FactorFn",
    "SchedulerConfig",
    "check_config",
]

KINDS: tuple[str, ...] = ("warmup", "progressive", "constant", "early", "late", "step")
EARLY_SHAPES: tuple[str, ...] = ("constant", "linear")
# "linear" was the warm-up's first name; schedule.py's per-layer "linear" is another thing.
_ALIASES = {"linear": "warmup"}
_DEFAULT_GAMMA = 0.001  # DeepSpeed's default
_STATE_VERSION = 2

FactorFn = Callable[[int], float]


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class SchedulerConfig:
    """A validated time schedule (``check_config``'s result): everything a factor depends
    on besides a factor function. ``cutoff`` is in steps (a ``cutoff_fraction`` resolved)."""

    kind: str
    warmup_steps: int = 0
    gamma: float = _DEFAULT_GAMMA
    cutoff: int = 0
    shape: str = "constant"
    milestones: tuple[tuple[int, float], ...] = ()
    total_steps: int | None = None
    steps_per_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "warmup_steps": self.warmup_steps,
            "gamma": self.gamma,
            "cutoff": self.cutoff,
            "shape": self.shape,
            "milestones": [[s, f] for s, f in self.milestones],
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
        }


def _count(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    what = "a positive" if minimum == 1 else "a non-negative"
    raise InvalidValueError(f"{name} must be {what} whole number of steps, but got {value!r}")


def _optional_count(value: object, name: str) -> int | None:
    return None if value is None else _count(value, name, minimum=1)


def check_config(
    kind: str,
    *,
    warmup_steps: int = 0,
    gamma: float | None = None,
    cutoff: int | None = None,
    cutoff_fraction: float | None = None,
    shape: str = "constant",
    milestones: Sequence[tuple[int, float]] | None = None,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
) -> SchedulerConfig:
    """Validate scheduler arguments without a model (the callbacks check them up front).

    ``kind`` is a name here (callables are checked by the scheduler). Arguments that mean
    nothing for ``kind`` are errors, so a typo'd kind does not silently ignore them.

    Raises:
        InvalidValueError: the first bad value, named.
    """
    if not isinstance(kind, str) or _ALIASES.get(kind, kind) not in KINDS:
        raise InvalidValueError(
            f"unknown scheduler kind {kind!r}; choose one of: {', '.join(KINDS)} "
            "(or a function step -> factor)"
        )
    return _check(
        _ALIASES.get(kind, kind),
        warmup_steps=warmup_steps,
        gamma=gamma,
        cutoff=cutoff,
        cutoff_fraction=cutoff_fraction,
        shape=shape,
        milestones=milestones,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )


def _check(
    kind: str,
    *,
    warmup_steps: int = 0,
    gamma: float | None = None,
    cutoff: int | None = None,
    cutoff_fraction: float | None = None,
    shape: str = "constant",
    milestones: Sequence[tuple[int, float]] | None = None,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
) -> SchedulerConfig:
    """``check_config`` for a known kind name, ``"callable"`` included."""
    total = _optional_count(total_steps, "total_steps")
    per_epoch = _optional_count(steps_per_epoch, "steps_per_epoch")

    def unused(name: str, value: object, default: object = None) -> None:
        if value != default:
            raise InvalidValueError(f"{name}={value!r} has no meaning for scheduler kind {kind!r}")

    cfg = SchedulerConfig(kind=kind, total_steps=total, steps_per_epoch=per_epoch)
    if kind == "warmup":
        cfg = replace(cfg, warmup_steps=_count(warmup_steps, "warmup_steps", minimum=1))
    else:
        unused("warmup_steps", warmup_steps, 0)
    if kind == "progressive":
        g = _DEFAULT_GAMMA if gamma is None else gamma
        if not _is_number(g) or not math.isfinite(g) or g <= 0:
            raise InvalidValueError(f"gamma must be a positive number, but got {gamma!r}")
        cfg = replace(cfg, gamma=float(g))
    else:
        unused("gamma", gamma)
    if kind in ("early", "late"):
        cfg = replace(cfg, cutoff=_cutoff(cutoff, cutoff_fraction, total))
    else:
        unused("cutoff", cutoff)
        unused("cutoff_fraction", cutoff_fraction)
    if kind == "early":
        if shape not in EARLY_SHAPES:
            raise InvalidValueError(
                f"unknown early shape {shape!r}; choose one of: {', '.join(EARLY_SHAPES)}"
            )
        cfg = replace(cfg, shape=shape)
    else:
        unused("shape", shape, "constant")
    if kind == "step":
        cfg = replace(cfg, milestones=_milestones(milestones, total))
    else:
        unused("milestones", milestones)
    return cfg


def _cutoff(cutoff: object, fraction: object, total: int | None) -> int:
    if (cutoff is None) == (fraction is None):
        raise InvalidValueError(
            "early/late stochastic depth needs exactly one of cutoff= (steps) or "
            f"cutoff_fraction= (of total_steps), but got cutoff={cutoff!r}, "
            f"cutoff_fraction={fraction!r}"
        )
    if fraction is not None:
        if not _is_number(fraction) or not 0.0 < fraction <= 1.0:
            raise InvalidValueError(f"cutoff_fraction must be in (0, 1], but got {fraction!r}")
        if total is None:
            raise InvalidValueError(
                f"cutoff_fraction={fraction!r} needs total_steps= (the optimizer steps of the run)"
            )
        # Half up, and at least one step: a smoke test of a few steps still sees both phases.
        steps = max(1, math.floor(fraction * total + 0.5))
    else:
        steps = _count(cutoff, "cutoff", minimum=1)
    if total is not None and steps > total:
        raise InvalidValueError(
            f"cutoff {steps} is beyond total_steps {total}; the schedule would never switch"
        )
    return steps


def _milestones(value: object, total: int | None) -> tuple[tuple[int, float], ...]:
    if value is None or isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidValueError(
            f"kind 'step' needs milestones=[(step, factor), ...], but got {value!r}"
        )
    if not value:
        raise InvalidValueError("milestones is empty; give at least one (step, factor) pair")
    out: list[tuple[int, float]] = []
    for item in value:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise InvalidValueError(f"a milestone must be a (step, factor) pair, but got {item!r}")
        step = _count(item[0], "a milestone step", minimum=0)
        factor = item[1]
        if not _is_number(factor) or not 0.0 <= factor < math.inf:
            raise InvalidValueError(
                f"milestone factor at step {step} must be a number >= 0, but got {factor!r}"
            )
        if out and step <= out[-1][0]:
            raise InvalidValueError(
                f"milestones out of order: step {step} comes after step {out[-1][0]}; "
                "list them by increasing step"
            )
        if total is not None and step > total:
            raise InvalidValueError(f"milestone step {step} is beyond total_steps {total}")
        out.append((step, float(factor)))
    return tuple(out)


def _factor(cfg: SchedulerConfig, t: int) -> float:
    kind = cfg.kind
    if kind == "warmup":
        return min(1.0, t / cfg.warmup_steps)
    if kind == "progressive":
        return 1.0 - math.exp(-cfg.gamma * t)
    if kind == "early":
        if t >= cfg.cutoff:
            return 0.0
        if cfg.shape == "constant" or cfg.cutoff == 1:
            return 1.0
        return 1.0 - t / (cfg.cutoff - 1)  # np.linspace(1, 0, cutoff)[t]
    if kind == "late":
        return 0.0 if t < cfg.cutoff else 1.0
    if kind == "step":
        current = 1.0
        for step, f in cfg.milestones:
            if step > t:
                break
            current = f
        return current
    return 1.0  # constant


class DropPathScheduler:
    """Scale every DropPath rate of a model by a factor of the training step.

    Args:
        model: a model with dpatch DropPath modules (after ``inject``/``retune``); their
            current rates become the targets.
        kind: ``"warmup"`` (alias ``"linear"``), ``"progressive"``, ``"constant"``,
            ``"early"``, ``"late"``, ``"step"``, or a function ``step -> factor``.
        warmup_steps: steps of the warm-up ramp (``"warmup"``), > 0.
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
        fn: FactorFn | None = None
        if callable(kind):
            fn = kind
            cfg = _check(
                "callable",
                warmup_steps=warmup_steps,
                gamma=gamma,
                cutoff=cutoff,
                cutoff_fraction=cutoff_fraction,
                shape=shape,
                milestones=milestones,
                total_steps=total_steps,
                steps_per_epoch=steps_per_epoch,
            )
        else:
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
            _check_factor(f, max(targets), f"milestone at step {step}")
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
        return _factor(self._cfg, step)

    # -- advancing ----------------------------------------------------------------------
    def step(self) -> None:
        """Advance one optimizer step and set the rates."""
        self._go(self.last_step + 1)

    def step_update(self, num_updates: int) -> None:
        """Set the rates for ``num_updates`` optimizer steps taken (timm's ``step_update``).

        Idempotent, so a training loop (or a framework callback) can call it with its own
        step counter and never drift from it.
        """
        self._go(_count(num_updates, "num_updates", minimum=0))

    def step_epoch(self, epoch: int) -> None:
        """Set the rates for the start of ``epoch`` (0-based): ``epoch * steps_per_epoch``
        steps taken. timm calls ``scheduler.step(epoch + 1)`` after epoch ``epoch``; the
        same call here is ``step_epoch(epoch + 1)``."""
        epoch = _count(epoch, "epoch", minimum=0)
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
            return _factor(self._cfg, t)
        return _check_factor(self._fn(t), max(self._targets), f"factor function at step {t}")

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
            "version": _STATE_VERSION,
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
        new_targets = [_check_target(targets[n], n) for n in names]
        kind = state.get("kind", "warmup")
        if kind == "callable":
            if self._fn is None:
                raise InvalidValueError(
                    "scheduler state was saved with a factor function; pass the same function "
                    "as kind= to the scheduler you load it into"
                )
            cfg = _check(
                "callable",
                total_steps=state.get("total_steps"),
                steps_per_epoch=state.get("steps_per_epoch"),
            )
            fn: FactorFn | None = self._fn
        else:
            cfg = check_config(kind, **_config_args(state, kind))
            fn = None
        for step, f in cfg.milestones:
            _check_factor(f, max(new_targets), f"milestone at step {step}")
        t = _count(state["last_step"], "last_step", minimum=0)
        f_now = (
            _check_factor(fn(t), max(new_targets), f"factor function at step {t}")
            if fn is not None
            else _factor(cfg, t)
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


def _config_args(state: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The arguments of ``check_config`` that ``kind`` uses, read from a state dict (states
    of dpatch 0.1 carry only warmup_steps and gamma)."""
    kind = _ALIASES.get(kind, kind) if isinstance(kind, str) else kind
    args: dict[str, Any] = {
        "total_steps": state.get("total_steps"),
        "steps_per_epoch": state.get("steps_per_epoch"),
    }
    if kind == "warmup":
        args["warmup_steps"] = state.get("warmup_steps", 0)
    elif kind == "progressive":
        args["gamma"] = state.get("gamma")
    elif kind in ("early", "late"):
        args["cutoff"] = state.get("cutoff")
        if kind == "early":
            args["shape"] = state.get("shape", "constant")
    elif kind == "step":
        args["milestones"] = [tuple(m) for m in state.get("milestones") or []]
    return args


def _check_target(value: object, name: str) -> float:
    if _is_number(value) and 0.0 <= value < 1.0:
        return float(value)
    raise InvalidValueError(f"saved target rate of {name} must be in [0, 1), but got {value!r}")


def _check_factor(value: object, max_target: float, where: str) -> float:
    """A factor must keep every rate in [0, 1): ``0 <= f < 1 / max_target``."""
    limit = math.inf if max_target == 0.0 else 1.0 / max_target
    if _is_number(value) and 0.0 <= value < limit:
        return float(value)
    raise InvalidValueError(
        f"{where}: factor {value!r} is outside [0, {limit:.6g}); with the largest target "
        f"rate {max_target:.6g} it must keep every rate in [0, 1)"
    )
