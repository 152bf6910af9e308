"""``DropPathCallback`` for Lightning: patch the LightningModule, schedule its rates per
optimizer step, log the mean rate, and keep the schedule in Lightning checkpoints.

Uses ``lightning.pytorch`` when installed, else ``pytorch_lightning`` (``pip install
dpatch[lightning]``).

Events (Lightning 2.x):

- ``setup(stage="fit")``: ``inject`` (or ``retune``) the LightningModule itself, before the
  strategy wraps it (DDP) and before the optimizers are built; a recipe's size is read here.
- ``on_fit_start``: build the :class:`dpatch.DropPathScheduler`; ``total_steps`` is
  ``trainer.estimated_stepping_batches`` (epochs, accumulation and ``max_steps``).
- ``on_train_batch_start``: ``step_update(trainer.global_step)``. Lightning's
  ``global_step`` counts optimizer steps, so with ``accumulate_grad_batches=k`` the k
  micro-batches of one step share its rates, and a resumed run (whose ``global_step`` is
  restored) continues the schedule exactly.
- ``on_train_batch_end``: ``pl_module.log("droppath/mean_rate", ...)`` per batch, then
  ``step_update`` again, so a checkpoint saved after this step holds its step count.
- ``state_dict``/``load_state_dict``: the scheduler state rides in the checkpoint's
  ``callbacks`` entry; loading it before ``on_fit_start`` (Lightning's order) defers it
  until the scheduler exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dpatch import PatchReport
from dpatch.integrations._driver import DropPathDriver
from dpatch.recipes import Recipe, ResolvedRecipe
from dpatch.scheduler import DropPathScheduler, FactorFn
from dpatch.settings import Settings

try:  # the unified package first; the standalone one where only it is installed
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    import pytorch_lightning as pl  # type: ignore[no-redef]

__all__ = ["DropPathCallback"]


class DropPathCallback(pl.Callback):
    """Stochastic depth for a LightningModule, scheduled over optimizer steps.

    Args:
        max_rate, schedule, min_rate, rates, mode, scaling, per, skip, seed, tie: as in
            :func:`dpatch.inject`; None takes the recipe's value, else inject's default.
        recipe: a recipe name (``dpatch.recipes.list_recipes()``) or ``Recipe``: its rate,
            per-layer schedule, mode and time schedule, unless given explicitly.
        size: the recipe's model size; read from the model when not given.
        keep_layerdrop: keep the model's own LayerDrop (``config.layerdrop``, ...) where
            dpatch puts sites on its layers (default: turned off, with a note).
        action: ``"inject"`` (any model; idempotent) or ``"retune"`` (only existing slots).
        example_inputs: inputs for the meta-device probe (a tuple of positional inputs of
            ``pl_module.forward``); needed when it does not take an image batch.
        kind: the time schedule (see :class:`dpatch.DropPathScheduler`); None: the
            recipe's, else ``"constant"``.
        warmup_steps, gamma, cutoff, cutoff_fraction, shape, milestones, total_steps,
            steps_per_epoch: as in :class:`dpatch.DropPathScheduler`; ``total_steps``
            defaults to the trainer's.
        log_name: the metric logged each step (None: do not log).

    Attributes:
        report: the ``PatchReport`` of the patch (after ``setup``).
        scheduler: the ``DropPathScheduler`` (after ``on_fit_start``).
        resolved: the ``ResolvedRecipe`` used, if any.

    Raises:
        InvalidValueError: bad settings, at construction (a recipe's size at ``setup``).
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
        super().__init__()
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

    @property
    def report(self) -> PatchReport | None:
        return self._driver.report

    @property
    def scheduler(self) -> DropPathScheduler | None:
        return self._driver.scheduler

    @property
    def resolved(self) -> ResolvedRecipe | None:
        return self._driver.resolved

    # -- events -------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._driver.patch(pl_module)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._driver.start(pl_module, _total_steps(trainer))

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._driver.sync(trainer.global_step)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.log_name:  # the rates this batch trained with
            pl_module.log(
                self.log_name, self._driver.mean_rate, on_step=True, on_epoch=False, batch_size=1
            )
        # After an optimizer step ``global_step`` has moved on: set the next step's rates
        # now, so a checkpoint saved at this step (ModelCheckpoint runs after this hook)
        # holds the step count it is named after.
        self._driver.sync(trainer.global_step)

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self._driver.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._driver.load_state_dict(state_dict)


def _total_steps(trainer: Any) -> int | None:
    """Optimizer steps of the run (Lightning's estimate: epochs, batches, accumulation and
    ``max_steps``); None for an unbounded run."""
    estimate = trainer.estimated_stepping_batches
    if estimate is None or estimate == float("inf") or estimate <= 0:
        return None
    return int(estimate)
