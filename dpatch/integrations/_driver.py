"""What the framework callbacks share, with no framework imported: settings from a recipe
and explicit arguments, patching the model once, the scheduler, and its checkpoint state.

A callback only maps its framework's events onto :class:`DropPathDriver`: ``patch`` when
the model is known, ``start`` when the number of optimizer steps is known, ``sync`` with
the framework's optimizer-step counter before each step, ``state_dict``/``load_state_dict``
for checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from dpatch import PatchReport, inject, retune
from dpatch.errors import InvalidValueError
from dpatch.recipes import Recipe, ResolvedRecipe, get_recipe, resolve_recipe
from dpatch.scheduler import DropPathScheduler, FactorFn, check_config, needs_total_steps
from dpatch.settings import Settings

ACTIONS: tuple[str, ...] = ("inject", "retune")

# A stand-in run length to check the other arguments of a schedule that needs the run's
# length (a cutoff_fraction, an exp-ramp over the run) before the real one is known (the
# real check runs in ``start``).
_PROBE_TOTAL = 1_000_000


class DropPathDriver:
    """Patch a model once, then keep a :class:`DropPathScheduler` in step with training.

    Precedence of settings: ``inject``'s defaults, then the recipe's, then every argument
    given explicitly (not None). Scheduler arguments work the same way: a recipe's time
    schedule unless ``kind`` names another, with any given argument replacing the
    recipe's (``cutoff`` replaces ``cutoff_fraction`` and the other way round).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        scheduler_args: Mapping[str, Any],
        recipe: str | Recipe | None,
        size: str | None,
        action: str,
        example_inputs: Sequence[Any] | None,
        keep_layerdrop: bool = False,
    ) -> None:
        if action not in ACTIONS:
            raise InvalidValueError(f"unknown action {action!r}; choose one of: inject, retune")
        if isinstance(recipe, str):
            recipe = get_recipe(recipe)
        if size is not None and recipe is None:
            raise InvalidValueError(f"size={size!r} needs recipe= (the size picks its rate)")
        if recipe is not None and size is not None:
            recipe.size_rate(size)  # an unknown size fails now, not when training starts
        self.recipe = recipe
        self.size = size
        self.action = action
        self.example_inputs = example_inputs
        self.keep_layerdrop = keep_layerdrop
        self._settings = settings
        self._scheduler_args = {k: v for k, v in scheduler_args.items() if v is not None}
        base = recipe.time.scheduler_kwargs() if recipe is not None else {"kind": "constant"}
        self._check_scheduler(self._merge_scheduler(base), self._scheduler_args.get("total_steps"))
        self.resolved: ResolvedRecipe | None = None
        self.report: PatchReport | None = None
        self.scheduler: DropPathScheduler | None = None
        self._model: nn.Module | None = None
        self._pending: dict[str, Any] | None = None

    # -- settings -----------------------------------------------------------------------
    def _merge_scheduler(self, base: Mapping[str, Any]) -> dict[str, Any]:
        given = dict(self._scheduler_args)
        given.pop("total_steps", None)
        kind = given.get("kind", base["kind"])
        out: dict[str, Any] = dict(base) if kind == base["kind"] else {}
        if "cutoff" in given:
            out.pop("cutoff_fraction", None)
        if "cutoff_fraction" in given:
            out.pop("cutoff", None)
        out.update(given)
        out["kind"] = kind
        return out

    @staticmethod
    def _check_scheduler(args: Mapping[str, Any], total_steps: int | None) -> None:
        if callable(args["kind"]):
            return  # checked on the model, where the function is first called
        checked = dict(args)
        if total_steps is None and needs_total_steps(checked):
            total_steps = _PROBE_TOTAL
        check_config(**checked, total_steps=total_steps)

    def settings(self) -> Settings:
        """The settings ``patch`` passes to ``inject``/``retune``: the recipe's (after
        ``patch``, with its size resolved), then the caller's; what neither gives takes
        ``inject``'s default (``retune``: each site's own)."""
        base = Settings.of(self.resolved.inject_kwargs) if self.resolved else Settings()
        return self._settings.over(base)

    def scheduler_kwargs(self, total_steps: int | None) -> dict[str, Any]:
        """The arguments ``start`` passes to ``DropPathScheduler``."""
        base = self.resolved.scheduler_kwargs if self.resolved is not None else {"kind": "constant"}
        out = self._merge_scheduler(base)
        out["total_steps"] = self._scheduler_args.get("total_steps", total_steps)
        return out

    # -- training events ----------------------------------------------------------------
    def patch(self, model: nn.Module) -> PatchReport:
        """Inject (or retune) ``model`` in place, once per model object."""
        if self._model is model and self.report is not None:
            return self.report
        if self.recipe is not None:
            self.resolved = resolve_recipe(self.recipe, model, self.size,
                                           example_inputs=self.example_inputs)  # fmt: skip
        settings = self.settings()
        if self.action == "inject":
            report = inject(
                model,
                settings=settings,
                example_inputs=self.example_inputs,
                allow_empty=False,
                keep_layerdrop=self.keep_layerdrop,
            )
        else:
            report = retune(model, settings=settings, example_inputs=self.example_inputs)
        self._model, self.report, self.scheduler = model, report, None
        return report

    def start(self, model: nn.Module, total_steps: int | None) -> DropPathScheduler:
        """Build the scheduler (after ``patch``), resuming from a state loaded earlier."""
        self.patch(model)
        if self.scheduler is None:
            kwargs = self.scheduler_kwargs(total_steps)
            kind: str | FactorFn = kwargs.pop("kind")
            sched = DropPathScheduler(model, kind, **kwargs)
            if self._pending is not None:
                sched.load_state_dict(self._pending)
                self._pending = None
            self.scheduler = sched
        return self.scheduler

    def sync(self, optimizer_steps: int) -> None:
        """Set the rates for ``optimizer_steps`` steps taken (the framework's counter)."""
        if self.scheduler is None:
            raise InvalidValueError("the drop-path scheduler has not started; call start first")
        self.scheduler.step_update(optimizer_steps)

    @property
    def mean_rate(self) -> float:
        """Mean current rate over the model's DropPath modules (0 before ``start``)."""
        return self.scheduler.mean_rate if self.scheduler is not None else 0.0

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state (or one loaded but not applied yet); ``{}`` before start."""
        if self.scheduler is not None:
            return {"scheduler": self.scheduler.state_dict()}
        if self._pending is not None:
            return {"scheduler": dict(self._pending)}
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore now if the scheduler runs, else when ``start`` builds it."""
        if not state:
            return
        if "scheduler" not in state:
            raise InvalidValueError(
                "not a dpatch callback state (no 'scheduler' entry); was it saved by "
                "DropPathCallback.state_dict()?"
            )
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            self._pending = dict(state["scheduler"])
