"""Factors of the training step for :class:`dpatch.DropPathScheduler`: the kinds, their
arguments checked once (:class:`SchedulerConfig`), and the factor each gives at step ``t``.
See :mod:`dpatch.scheduler` for the formulas and their sources."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

from dpatch.errors import InvalidValueError

__all__ = [
    "EARLY_SHAPES",
    "KINDS",
    "STATE_VERSION",
    "FactorFn",
    "SchedulerConfig",
    "check_config",
    "check_count",
    "check_factor",
    "check_target",
    "config_args",
    "factor_at",
    "needs_total_steps",
]

KINDS: tuple[str, ...] = ("warmup", "exp-ramp", "progressive", "constant", "early", "late", "step")
EARLY_SHAPES: tuple[str, ...] = ("constant", "linear")
# "linear" was the warm-up's first name; schedule.py's per-layer "linear" is another thing.
_ALIASES = {"linear": "warmup"}
_DEFAULT_GAMMA = 0.001  # DeepSpeed's default
STATE_VERSION = 2

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


def check_count(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    what = "a positive" if minimum == 1 else "a non-negative"
    raise InvalidValueError(f"{name} must be {what} whole number of steps, but got {value!r}")


def _optional_count(value: object, name: str) -> int | None:
    return None if value is None else check_count(value, name, minimum=1)


def check_config(
    kind: str | FactorFn,
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

    ``kind`` is a name or a function ``step -> factor`` (its values are checked when the
    scheduler calls it). Arguments that mean nothing for ``kind`` are errors, so a typo'd
    kind does not silently ignore them.

    Raises:
        InvalidValueError: the first bad value, named.
    """
    if callable(kind):
        kind = "callable"
    elif not isinstance(kind, str) or _ALIASES.get(kind, kind) not in KINDS:
        raise InvalidValueError(
            f"unknown scheduler kind {kind!r}; choose one of: {', '.join(KINDS)} "
            "(or a function step -> factor)"
        )
    kind = _ALIASES.get(kind, kind)
    total = _optional_count(total_steps, "total_steps")
    per_epoch = _optional_count(steps_per_epoch, "steps_per_epoch")

    def unused(name: str, value: object, default: object = None) -> None:
        if value != default:
            raise InvalidValueError(f"{name}={value!r} has no meaning for scheduler kind {kind!r}")

    cfg = SchedulerConfig(kind=kind, total_steps=total, steps_per_epoch=per_epoch)
    if kind == "warmup":
        cfg = replace(cfg, warmup_steps=check_count(warmup_steps, "warmup_steps", minimum=1))
    elif kind == "exp-ramp":
        # LayerSkip's S(t) spans the whole run unless told a shorter ramp
        if warmup_steps == 0 and total is None:
            raise InvalidValueError(
                "kind 'exp-ramp' needs total_steps= (the ramp spans the run, LayerSkip's "
                "curriculum) or warmup_steps= (a shorter ramp)"
            )
        ramp = total if warmup_steps == 0 else warmup_steps
        cfg = replace(cfg, warmup_steps=check_count(ramp, "warmup_steps", minimum=1))
        if total is not None and cfg.warmup_steps > total:
            raise InvalidValueError(
                f"warmup_steps {cfg.warmup_steps} is beyond total_steps {total}; the ramp "
                "would never reach the targets"
            )
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
        steps = check_count(cutoff, "cutoff", minimum=1)
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
        step = check_count(item[0], "a milestone step", minimum=0)
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


def factor_at(cfg: SchedulerConfig, t: int) -> float:
    kind = cfg.kind
    if kind == "warmup":
        return min(1.0, t / cfg.warmup_steps)
    if kind == "exp-ramp":  # LayerSkip's S(t) = e^(t ln2 / T) - 1, then 1
        return 1.0 if t >= cfg.warmup_steps else 2.0 ** (t / cfg.warmup_steps) - 1.0
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


def config_args(state: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The arguments of ``check_config`` that ``kind`` uses, read from a state dict (states
    of dpatch 0.1 carry only warmup_steps and gamma)."""
    kind = _ALIASES.get(kind, kind) if isinstance(kind, str) else kind
    args: dict[str, Any] = {
        "total_steps": state.get("total_steps"),
        "steps_per_epoch": state.get("steps_per_epoch"),
    }
    if kind in ("warmup", "exp-ramp"):
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


def needs_total_steps(kwargs: Mapping[str, Any]) -> bool:
    """True when scheduler arguments need ``total_steps`` (a cutoff given as a fraction, or
    an ``exp-ramp`` over the whole run)."""
    if kwargs.get("cutoff_fraction") is not None:
        return True
    return kwargs.get("kind") == "exp-ramp" and not kwargs.get("warmup_steps")


def check_target(value: object, name: str) -> float:
    if _is_number(value) and 0.0 <= value < 1.0:
        return float(value)
    raise InvalidValueError(f"saved target rate of {name} must be in [0, 1), but got {value!r}")


def check_factor(value: object, max_target: float, where: str) -> float:
    """A factor must keep every rate in [0, 1): ``0 <= f < 1 / max_target``."""
    limit = math.inf if max_target == 0.0 else 1.0 / max_target
    if _is_number(value) and 0.0 <= value < limit:
        return float(value)
    raise InvalidValueError(
        f"{where}: factor {value!r} is outside [0, {limit:.6g}); with the largest target "
        f"rate {max_target:.6g} it must keep every rate in [0, 1)"
    )
