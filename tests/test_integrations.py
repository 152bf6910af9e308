"""Lightning and transformers callbacks, each in real (tiny) CPU training runs: the rates
follow the schedule step by step, a resumed run continues it, logging, and every parameter
gets a gradient every step in masking mode (what DDP's find_unused_parameters=False needs).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import PlainRes
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dpatch import DropPath
from dpatch.errors import InvalidValueError

# Each framework's tests skip (not the whole file) where it is not installed; the dev extra
# installs both. The transformers Trainer also needs accelerate.
LIGHTNING = importlib.util.find_spec("lightning") is not None
HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "accelerate"))
needs_lightning = pytest.mark.skipif(not LIGHTNING, reason="needs lightning")
needs_hf = pytest.mark.skipif(not HF, reason="needs transformers and accelerate")

EXAMPLE = (torch.randn(2, 4, 8),)
N = 48  # samples; batch 4 -> 12 batches an epoch


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 4, 8, generator=g), torch.randint(0, 2, (N,), generator=g)


def slot_rates(model: nn.Module) -> list[float]:
    return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


# ============================================================================ shared
def test_explicit_arguments_override_the_recipe() -> None:
    """inject's defaults < the recipe < explicit arguments, for inject and the scheduler;
    an explicit cutoff replaces the recipe's cutoff_fraction."""
    from helpers import example

    from dpatch.integrations._driver import DropPathDriver
    from dpatch.settings import Settings

    def driver(**scheduler_args: Any) -> DropPathDriver:
        return DropPathDriver(
            settings=Settings(max_rate=0.2),
            scheduler_args=scheduler_args,
            recipe="late-sd-vit-b",
            size=None,
            action="inject",
            example_inputs=(example(),),
        )

    torch.manual_seed(0)
    model = nn.Sequential(*[PlainRes() for _ in range(3)])
    d = driver(cutoff=2)
    d.patch(model)
    sched = d.start(model, total_steps=12)
    assert d.settings().max_rate == 0.2 and d.settings().schedule == "linear"
    assert (sched.kind, sched.cutoff, sched.total_steps) == ("late", 2, 12)
    assert sched.target_rates == pytest.approx({f"{i}.drop_path": 0.1 * i for i in range(3)})
    other = driver(kind="warmup", warmup_steps=3)
    other.patch(model)
    assert other.start(model, total_steps=12).kind == "warmup"
    with pytest.raises(InvalidValueError, match=r"cutoff_fraction must be in \(0, 1\], but got 2"):
        driver(cutoff_fraction=2)


# ============================================================================ Lightning
if LIGHTNING:
    import lightning.pytorch as pl

    from dpatch.integrations.lightning import DropPathCallback as LitCallback

    class LitRes(pl.LightningModule):  # type: ignore[misc, name-defined]
        """Three residual MLP blocks and a head."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.Sequential(*[PlainRes() for _ in range(3)])
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.blocks(x).mean(1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(*data()), batch_size=4, shuffle=False)

    class LitRecorder(pl.Callback):  # type: ignore[misc, name-defined]
        """Rates in effect for each batch, and whether every parameter had a gradient at each
        optimizer step (DDP with find_unused_parameters=False requires it)."""

        def __init__(self) -> None:
            self.seen: list[tuple[int, list[float]]] = []
            self.all_grads: list[bool] = []
            self.zero_grads: list[bool] = []

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
            self.seen.append((trainer.global_step, slot_rates(module)))

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            grads = [p.grad for p in module.parameters()]
            self.all_grads.append(all(g is not None for g in grads))
            self.zero_grads.append(any(g is not None and not g.any() for g in grads))


def lit_fit(
    callback: LitCallback, tmp_path: Path, ckpt_path: str | None = None, **trainer_kwargs: Any
) -> tuple[LitRes, LitRecorder, Any]:
    module, recorder = LitRes(), LitRecorder()
    kwargs: dict[str, Any] = {
        "max_steps": 6,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
        **trainer_kwargs,
    }
    callbacks = [callback, recorder, *kwargs.pop("callbacks", [])]
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, recorder, trainer


@needs_lightning
def test_lightning_rates_follow_schedule_and_are_logged(tmp_path: Path) -> None:
    cb = LitCallback(0.4, "uniform", kind="early", shape="linear", cutoff=4, example_inputs=EXAMPLE)
    _, rec, trainer = lit_fit(cb, tmp_path)
    assert [s for s, _ in rec.seen] == [0, 1, 2, 3, 4, 5]
    factors = [1, 2 / 3, 1 / 3, 0, 0, 0]  # linspace(1, 0, 4), then 0
    for (_, got), f in zip(rec.seen, factors, strict=True):
        assert got == pytest.approx([0.4 * f] * 3)
    assert cb.report is not None and len(cb.report.sites) == 3
    assert float(trainer.callback_metrics["droppath/mean_rate"]) == 0.0  # the last step's


@needs_lightning
def test_lightning_total_steps_and_recipe_from_trainer(tmp_path: Path) -> None:
    """late-sd-vit-b: off for the first 50/300 of the run (1 of 6 steps), then the linear
    targets 0, 0.2, 0.4; the run length comes from the trainer."""
    cb = LitCallback(recipe="late-sd-vit-b", example_inputs=EXAMPLE)
    _, rec, _ = lit_fit(cb, tmp_path)
    assert cb.scheduler is not None and cb.scheduler.total_steps == 6 and cb.scheduler.cutoff == 1
    assert rec.seen[0][1] == [0.0, 0.0, 0.0]
    assert all(r == pytest.approx([0.0, 0.2, 0.4]) for _, r in rec.seen[1:])


@needs_lightning
def test_lightning_gradient_accumulation_steps_per_optimizer_step(tmp_path: Path) -> None:
    cb = LitCallback(0.4, "uniform", kind="warmup", warmup_steps=4, example_inputs=EXAMPLE)
    _, rec, _ = lit_fit(cb, tmp_path, max_steps=4, accumulate_grad_batches=2)
    assert [s for s, _ in rec.seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    for step, got in rec.seen:
        assert got == pytest.approx([0.4 * step / 4] * 3)


@needs_lightning
def test_lightning_resume_continues_the_schedule(tmp_path: Path) -> None:
    """Train 6 steps saving at 3; a new trainer resumes from step 3 with a callback built
    with another rate: the checkpoint's scheduler state wins and steps 3-5 equal the
    uninterrupted run's."""
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    args = {"kind": "warmup", "warmup_steps": 5, "example_inputs": EXAMPLE}
    first = LitCallback(0.4, "uniform", **args)
    _, rec_a, _ = lit_fit(first, tmp_path, enable_checkpointing=True, callbacks=[ckpt])
    path = tmp_path / "ckpt" / "step=3.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "DropPathCallback" in k]
    assert state["scheduler"]["last_step"] == 3

    second = LitCallback(0.2, "uniform", **args)  # other targets: the state must win
    _, rec_b, _ = lit_fit(second, tmp_path, ckpt_path=str(path))
    assert [s for s, _ in rec_b.seen] == [3, 4, 5]
    assert rec_b.seen == rec_a.seen[3:]


@needs_lightning
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_lightning_masking_uses_every_parameter_every_step(tmp_path: Path, mode: str) -> None:
    """Dropped branches stay in the graph (a zero gradient, not none), so DDP needs no
    find_unused_parameters; batch mode at 0.9 drops whole branches on some steps."""
    cb = LitCallback(0.9, "uniform", mode=mode, kind="constant", example_inputs=EXAMPLE)
    _, rec, _ = lit_fit(cb, tmp_path)
    assert rec.all_grads == [True] * 6
    if mode == "batch":
        assert any(rec.zero_grads)


@needs_lightning
def test_lightning_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(InvalidValueError, match="'cosine'"):
        LitCallback(kind="cosine")
    with pytest.raises(InvalidValueError, match="'nope'"):
        LitCallback(recipe="nope")
    with pytest.raises(InvalidValueError, match="needs recipe"):
        LitCallback(size="B")
    with pytest.raises(InvalidValueError, match="unknown size"):
        LitCallback(recipe="swin", size="XXL")
    with pytest.raises(InvalidValueError, match="cutoff=3 has no meaning"):
        LitCallback(kind="warmup", warmup_steps=2, cutoff=3)


# ============================================================================ transformers
if HF:
    import transformers

    from dpatch.integrations.transformers import STATE_FILE
    from dpatch.integrations.transformers import DropPathCallback as HFCallback

    class HFRes(nn.Module):
        """The same network with the Trainer's interface: keyword inputs, a loss out."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.Sequential(*[PlainRes() for _ in range(3)])
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
            logits = self.head(self.blocks(x).mean(1))
            out: dict[str, Any] = {"logits": logits}
            if labels is not None:
                out["loss"] = F.cross_entropy(logits, labels)
            return out

    class Samples(Dataset):
        def __init__(self) -> None:
            self.x, self.y = data()

        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": self.x[i], "labels": self.y[i]}

    class HFRecorder(transformers.TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.seen: list[tuple[int, list[float]]] = []
            self.micro: list[tuple[int, list[float]]] = []
            self.all_grads: list[bool] = []
            self.zero_grads: list[bool] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):  # type: ignore[no-untyped-def]
            self.seen.append((state.global_step, slot_rates(model)))

        def on_substep_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):  # type: ignore[no-untyped-def]
            self.micro.append((state.global_step, slot_rates(model)))

        def on_pre_optimizer_step(
            self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
        ):  # type: ignore[no-untyped-def]
            grads = [p.grad for p in model.parameters()]
            self.all_grads.append(all(g is not None for g in grads))
            self.zero_grads.append(any(g is not None and not g.any() for g in grads))


def hf_fit(
    callback: HFCallback, out: Path, resume: str | None = None, **arg_overrides: Any
) -> tuple[HFRes, HFRecorder, Any]:
    model, recorder = HFRes(), HFRecorder()
    kwargs: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "learning_rate": 0.1,
        "save_strategy": "steps",
        "save_steps": 3,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **arg_overrides,
    }
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**kwargs),
        train_dataset=Samples(),
        callbacks=[callback, recorder],
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, recorder, trainer


@needs_hf
def test_transformers_rates_follow_schedule_and_are_logged(tmp_path: Path) -> None:
    cb = HFCallback(0.4, "uniform", kind="early", shape="linear", cutoff=4, example_inputs=EXAMPLE)
    _, rec, trainer = hf_fit(cb, tmp_path)
    assert [s for s, _ in rec.seen] == [0, 1, 2, 3, 4, 5]
    factors = [1, 2 / 3, 1 / 3, 0, 0, 0]
    for (_, got), f in zip(rec.seen, factors, strict=True):
        assert got == pytest.approx([0.4 * f] * 3)
    logged = {h["step"]: h["droppath/mean_rate"] for h in trainer.state.log_history if "loss" in h}
    # A log line at step s reports the rates set for the next step (s steps taken).
    assert logged == pytest.approx({s: 0.4 * (factors[s] if s < 6 else 0) for s in range(1, 7)})


@needs_hf
def test_transformers_recipe_uses_the_run_length(tmp_path: Path) -> None:
    cb = HFCallback(recipe="late-sd-vit-b", example_inputs=EXAMPLE)
    _, rec, _ = hf_fit(cb, tmp_path)
    assert cb.scheduler is not None and cb.scheduler.cutoff == 1
    assert rec.seen[0][1] == [0.0, 0.0, 0.0]
    assert all(r == pytest.approx([0.0, 0.2, 0.4]) for _, r in rec.seen[1:])


@needs_hf
def test_transformers_runs_layerskip(tmp_path: Path) -> None:
    """The layerskip recipe: exponential over depth (0 at the first block, 0.2 at the last),
    times S(t) = 2^(t/T) - 1 over the Trainer's max_steps T = 6, kept branches unscaled."""
    cb = HFCallback(recipe="layerskip", example_inputs=EXAMPLE)
    _, rec, trainer = hf_fit(cb, tmp_path)
    assert cb.report is not None and {s.scaling for s in cb.report.sites} == {"none"}
    depth = [0.2 * (2 ** (i / 2) - 1) for i in range(3)]
    assert [s for s, _ in rec.seen] == [0, 1, 2, 3, 4, 5]
    for step, got in rec.seen:
        assert got == pytest.approx([(2 ** (step / 6) - 1) * d for d in depth], rel=1e-9)
    logged = {h["step"]: h["droppath/mean_rate"] for h in trainer.state.log_history if "loss" in h}
    assert logged[6] == pytest.approx(sum(depth) / 3)


@needs_hf
def test_transformers_resume_continues_the_schedule(tmp_path: Path) -> None:
    """Checkpoints at steps 3 and 6 carry the scheduler state as JSON; resuming from
    checkpoint-3 with a callback built with another rate continues the first run."""
    args = {"kind": "warmup", "warmup_steps": 5, "example_inputs": EXAMPLE}
    _, rec_a, _ = hf_fit(HFCallback(0.4, "uniform", **args), tmp_path)
    state_file = tmp_path / "checkpoint-3" / STATE_FILE
    saved = json.loads(state_file.read_text())
    assert (
        saved["scheduler"]["last_step"] == 3 and (tmp_path / "checkpoint-6" / STATE_FILE).exists()
    )
    # the state file gets the mode the Trainer's own files get (0o666 less the umask)
    assert (
        state_file.stat().st_mode & 0o777
        == (tmp_path / "checkpoint-3" / "trainer_state.json").stat().st_mode & 0o777
    )

    second = HFCallback(0.2, "uniform", **args)  # other targets: the state must win
    _, rec_b, _ = hf_fit(second, tmp_path, resume=str(tmp_path / "checkpoint-3"))
    assert second.restored_from == state_file
    assert [s for s, _ in rec_b.seen] == [3, 4, 5]
    assert rec_b.seen == rec_a.seen[3:]


@needs_hf
def test_transformers_resume_from_another_model_fails(tmp_path: Path) -> None:
    args = {"kind": "constant", "example_inputs": EXAMPLE}
    hf_fit(HFCallback(0.4, "uniform", **args), tmp_path)
    state_file = tmp_path / "checkpoint-3" / STATE_FILE
    state = json.loads(state_file.read_text())
    state["scheduler"]["targets"] = {"elsewhere.drop_path": 0.1}
    state_file.write_text(json.dumps(state))
    with pytest.raises(InvalidValueError, match="another model"):
        hf_fit(HFCallback(0.4, "uniform", **args), tmp_path, resume=str(tmp_path / "checkpoint-3"))


@needs_hf
def test_transformers_gradient_accumulation(tmp_path: Path) -> None:
    cb = HFCallback(0.4, "uniform", kind="warmup", warmup_steps=4, example_inputs=EXAMPLE)
    _, rec, _ = hf_fit(cb, tmp_path, max_steps=4, gradient_accumulation_steps=2, save_strategy="no")
    assert [s for s, _ in rec.seen] == [0, 1, 2, 3]  # once per optimizer step
    assert rec.micro == rec.seen  # the first micro-batch of each step ran at its rates
    for step, got in rec.seen:
        assert got == pytest.approx([0.4 * step / 4] * 3)


@needs_hf
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_transformers_masking_uses_every_parameter_every_step(tmp_path: Path, mode: str) -> None:
    cb = HFCallback(0.9, "uniform", mode=mode, example_inputs=EXAMPLE)
    _, rec, _ = hf_fit(cb, tmp_path, save_strategy="no")
    assert rec.all_grads == [True] * 6
    if mode == "batch":
        assert any(rec.zero_grads)


@needs_hf
def test_transformers_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(InvalidValueError, match="'cosine'"):
        HFCallback(kind="cosine")
    with pytest.raises(InvalidValueError, match="unknown action"):
        HFCallback(action="strip")
    with pytest.raises(InvalidValueError, match="unknown size 'XXL'"):
        HFCallback(recipe="deit3-in1k", size="XXL")


if LIGHTNING:

    class RankWriter(pl.Callback):
        """Each DDP rank writes the rates it trained with (spawned ranks share no memory)."""

        def __init__(self, out: str) -> None:
            self.out = out
            self.seen: list[tuple[int, list[float]]] = []

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
            self.seen.append((trainer.global_step, slot_rates(module)))

        def on_train_end(self, trainer: Any, module: Any) -> None:
            path = Path(self.out) / f"rank{trainer.global_rank}.json"
            path.write_text(json.dumps(self.seen))


@needs_lightning
@pytest.mark.slow
def test_lightning_ddp_without_find_unused_parameters(tmp_path: Path) -> None:
    """Two gloo ranks, DDP with find_unused_parameters=False, batch-mode masking at 0.5:
    training finishes (an unused parameter would stop DDP with "Expected to have finished
    reduction"), and both ranks ran the same warm-up rates."""
    from lightning.pytorch.strategies import DDPStrategy

    cb = LitCallback(0.5, "uniform", mode="batch", kind="warmup", warmup_steps=2,
                     example_inputs=EXAMPLE)  # fmt: skip
    trainer = pl.Trainer(
        callbacks=[cb, RankWriter(str(tmp_path))],
        strategy=DDPStrategy(
            find_unused_parameters=False, process_group_backend="gloo", start_method="spawn"
        ),
        accelerator="cpu",
        devices=2,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(LitRes())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert [step for step, _ in ranks[0]] == [0, 1, 2]
    assert [rates[0] for _, rates in ranks[0]] == pytest.approx([0.0, 0.25, 0.5])


def test_callbacks_pass_tie_and_keep_layerdrop_to_inject() -> None:
    """Both callbacks take ``tie`` (a layer as one unit) and ``keep_layerdrop`` (the model's
    own LayerDrop kept where dpatch puts sites); by default that LayerDrop is turned off."""
    from test_layerdrop import Stack, X

    from dpatch.integrations.lightning import DropPathCallback as Lit
    from dpatch.integrations.transformers import DropPathCallback as HF

    for cls in (Lit, HF):
        kept = cls(0.2, "uniform", tie="block", keep_layerdrop=True, example_inputs=X)
        model = Stack()
        report = kept._driver.patch(model)
        assert {s.tie for s in report.sites} == {"block"}
        assert model.layerdrop == 0.2 and report.layerdrop_changes == ()
        plain = cls(0.2, "uniform", example_inputs=X)
        other = Stack()
        report = plain._driver.patch(other)
        assert {s.tie for s in report.sites} == {"branch"}
        assert other.layerdrop == 0.0 and len(report.layerdrop_changes) == 1
