"""``DropPathCallback`` for the transformers ``Trainer``: patch the model, schedule its
rates per optimizer step, log the mean rate, and keep the schedule in checkpoints
(``pip install dpatch[hf]``).

Events (transformers 4.40+):

- ``on_train_begin``: ``inject`` (or ``retune``) ``kwargs["model"]`` in place (the
  unwrapped model; parameters keep their identity, so the optimizer built before stays
  valid), build the :class:`dpatch.DropPathScheduler` with ``total_steps =
  state.max_steps``, restore a resumed run's state, and set the rates for
  ``state.global_step``.
- ``on_step_end``: ``step_update(state.global_step)``; the Trainer fires it once per
  optimizer step, after ``global_step`` is incremented, so gradient accumulation is
  respected and a resumed run (whose ``global_step`` is restored) continues exactly.
- ``on_log``: adds ``droppath/mean_rate`` to the logs and to ``state.log_history``.
  transformers calls the ``report_to`` integrations before user callbacks, so they only
  see the rate if this callback is moved in front of them:
  ``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(DropPathCallback))``.
- ``on_save``: writes the scheduler state as ``dpatch_droppath.json`` into
  ``args.output_dir/checkpoint-{global_step}/`` (the folder the Trainer just wrote; main
  process only; written atomically). On resume, ``on_train_begin`` reads it back from the
  checkpoint of ``state.global_step``; a checkpoint without the file (written without this
  callback) resumes from ``global_step`` with this callback's settings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dpatch import PatchReport
from dpatch.errors import InvalidValueError, OutputError
from dpatch.files import atomic_write
from dpatch.integrations._driver import DropPathDriver
from dpatch.recipes import Recipe, ResolvedRecipe
from dpatch.scheduler import DropPathScheduler, FactorFn
from dpatch.settings import Settings

__all__ = ["STATE_FILE", "DropPathCallback"]

STATE_FILE = "dpatch_droppath.json"
_CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


class DropPathCallback(TrainerCallback):
    """Stochastic depth for a ``transformers.Trainer`` model, scheduled over optimizer
    steps.

    Args:
        max_rate, schedule, min_rate, rates, mode, scaling, per, skip, seed, tie: as in
            :func:`dpatch.inject`; None takes the recipe's value, else inject's default.
        recipe: a recipe name (``dpatch.recipes.list_recipes()``) or ``Recipe``: its rate,
            per-layer schedule, mode and time schedule, unless given explicitly.
        size: the recipe's model size; read from the model when not given.
        keep_layerdrop: keep the model's own LayerDrop (``config.layerdrop``, ...) where
            dpatch puts sites on its layers (default: turned off, with a note).
        action: ``"inject"`` (any model; idempotent) or ``"retune"`` (only existing slots).
        example_inputs: positional inputs of ``model.forward`` for the meta-device probe;
            needed when it does not take an image batch first.
        kind: the time schedule (see :class:`dpatch.DropPathScheduler`); None: the
            recipe's, else ``"constant"``.
        warmup_steps, gamma, cutoff, cutoff_fraction, shape, milestones, total_steps,
            steps_per_epoch: as in :class:`dpatch.DropPathScheduler`; ``total_steps``
            defaults to the Trainer's ``max_steps``.
        log_name: the key added to each log (None: do not log).

    Attributes:
        report, scheduler, resolved: the ``PatchReport``, ``DropPathScheduler`` and
            ``ResolvedRecipe`` (after ``on_train_begin``).
        restored_from: the state file a resumed run read, else None.

    Raises:
        InvalidValueError: bad settings, at construction (a recipe's size, and a resumed
            state that does not fit the model, at ``on_train_begin``).
    """

    def __init__(
        self,
        max_rate: float | None = None,
        schedule: str | None = None,
        *,
        recipe: str | Recipe | None = None,
        size: str | None = None,
        min_rate: float | None = None,
        rates: Sequence[float] | None = None,
        mode: str | None = None,
        scaling: str | None = None,
        per: str | None = None,
        skip: bool | None = None,
        seed: int | None = None,
        tie: str | None = None,
        keep_layerdrop: bool = False,
        action: str = "inject",
        example_inputs: Sequence[Any] | None = None,
        kind: str | FactorFn | None = None,
        warmup_steps: int | None = None,
        gamma: float | None = None,
        cutoff: int | None = None,
        cutoff_fraction: float | None = None,
        shape: str | None = None,
        milestones: Sequence[tuple[int, float]] | None = None,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        log_name: str | None = "droppath/mean_rate",
    ) -> None:
        self._driver = DropPathDriver(
            settings=Settings.of(locals()),
            scheduler_args={
                "kind": kind,
                "warmup_steps": warmup_steps,
                "gamma": gamma,
                "cutoff": cutoff,
                "cutoff_fraction": cutoff_fraction,
                "shape": shape,
                "milestones": milestones,
                "total_steps": total_steps,
                "steps_per_epoch": steps_per_epoch,
            },
            recipe=recipe,
            size=size,
            action=action,
            example_inputs=example_inputs,
            keep_layerdrop=keep_layerdrop,
        )
        self.log_name = log_name
        self.restored_from: Path | None = None

    @property
    def report(self) -> PatchReport | None:
        return self._driver.report

    @property
    def scheduler(self) -> DropPathScheduler | None:
        return self._driver.scheduler

    @property
    def resolved(self) -> ResolvedRecipe | None:
        return self._driver.resolved

    @property
    def mean_rate(self) -> float:
        """Mean current rate (0 before training starts)."""
        return self._driver.mean_rate

    # -- events -------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None:
            raise InvalidValueError(
                "the Trainer passed no model to on_train_begin; DropPathCallback needs it"
            )
        self._driver.patch(model)
        if state.global_step > 0:
            path = _checkpoint_dir(args, state.global_step) / STATE_FILE
            if path.is_file():
                self._driver.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
                self.restored_from = path
        total = int(state.max_steps) if state.max_steps and state.max_steps > 0 else None
        self._driver.start(model, total)
        self._driver.sync(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._driver.sync(state.global_step)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not self.log_name or logs is None or self._driver.scheduler is None:
            return
        rate = self._driver.mean_rate
        logs[self.log_name] = rate
        # Trainer.log appended a copy of ``logs`` just before calling the callbacks.
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1][self.log_name] = rate

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self._driver.scheduler is None:
            return
        folder = _checkpoint_dir(args, state.global_step)
        if not folder.is_dir():
            raise OutputError(
                f"checkpoint folder {str(folder)!r} does not exist after the Trainer saved; "
                "DropPathCallback writes its state next to the Trainer's"
            )
        state_dict = self._driver.state_dict()

        def write(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(state_dict, indent=1), encoding="utf-8")

        atomic_write(folder / STATE_FILE, write, force=True)


def _checkpoint_dir(args: Any, step: int) -> Path:
    return Path(args.output_dir) / f"{_CHECKPOINT_PREFIX}-{step}"
