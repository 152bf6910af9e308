"""DDP and FSDP2 on two CPU processes (gloo, localhost), as real training would run them.

Each worker builds the same model, patches it, wraps it, trains a few steps on its own
data and writes what it saw; the test compares the ranks. Every spawn has a hard timeout:
a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

WORLD = 2
# (name, mode, skip, find_unused_parameters): batch mode with skipping leaves whole
# branches out of the compute of some steps, yet their parameters still get (zero)
# gradients, so no mode needs DDP's find_unused_parameters=True.
MODES = [
    ("row-mask", "row", False, False),
    ("row-skip", "row", True, False),
    ("batch-mask", "batch", False, False),
    ("batch-skip", "batch", True, False),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(fn: Callable[..., None], *args: Any, timeout: float = 240.0) -> None:
    """Run ``fn(rank, *args)`` on every rank; a rank that raises fails the test, and so
    does a run still going after ``timeout`` seconds (a hang: the ranks are killed)."""
    ctx = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} was still running after {timeout:g} s: a hang")


def _done() -> None:
    """End a rank that finished: its results are written, its process group destroyed.
    ``os._exit`` skips the interpreter's teardown, where a gloo thread still being joined
    can abort the process ("terminate called without an active exception", seen once in
    CI after every step had run)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    torch.set_num_threads(1)


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)


def _ddp_worker(rank: int, port: int, name: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dpatch

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    try:
        for label, mode, skip, unused in MODES:
            model = _build(name)
            dpatch.inject(
                model, 0.5, schedule="uniform", mode=mode, skip=skip, seed=7,
                example_inputs=(torch.randn(2, 3, 32, 32),),
            )  # fmt: skip
            decisions: list[bool] = []
            for m in model.modules():
                if isinstance(m, dpatch.DropPath):
                    real = m.keep_batch

                    def logged(real=real, log=decisions) -> bool:  # type: ignore[no-untyped-def]
                        keep = real()
                        log.append(keep)
                        return keep

                    m.keep_batch = logged  # type: ignore[method-assign]
            ddp = DDP(model, find_unused_parameters=unused)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            torch.manual_seed(100 + rank)  # different data and row masks on each rank
            losses, grads_equal = [], []
            for _ in range(3):
                x = torch.randn(4, 3, 32, 32)
                loss = ddp(x).logsumexp(dim=1).mean()
                loss.backward()
                flat = torch.cat([p.grad.flatten() for p in ddp.parameters() if p.grad is not None])
                gathered = [torch.empty_like(flat) for _ in range(WORLD)]
                dist.all_gather(gathered, flat)
                grads_equal.append(all(torch.equal(gathered[0], g) for g in gathered))
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            results[label] = {"losses": losses, "grads_equal": grads_equal, "decisions": decisions}
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    _done()


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    import dpatch

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    try:
        for skip in (False, True):
            model = _build("resnet18")
            dpatch.inject(
                model, 0.5, schedule="uniform", skip=skip,
                example_inputs=(torch.randn(2, 3, 32, 32),),
            )  # fmt: skip
            for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
                fully_shard(stage)
            fully_shard(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            torch.manual_seed(100 + rank)
            losses = []
            for _ in range(3):
                loss = model(torch.randn(4, 3, 32, 32)).logsumexp(dim=1).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            # Parameters stay identical across ranks: gather the full weights and compare.
            full = torch.cat([p.full_tensor().flatten() for p in model.parameters()])
            gathered = [torch.empty_like(full) for _ in range(WORLD)]
            dist.all_gather(gathered, full)
            results["skip" if skip else "mask"] = {
                "losses": losses,
                "params_equal": all(torch.equal(gathered[0], g) for g in gathered),
            }
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    _done()


def _read(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_ddp_two_processes(name: str, tmp_path: Path) -> None:
    _spawn(_ddp_worker, _free_port(), name, str(tmp_path))
    ranks = _read(tmp_path)
    for label, _mode, _skip, _unused in MODES:
        for r in ranks:
            assert all(math.isfinite(v) for v in r[label]["losses"]), label
            assert all(r[label]["grads_equal"]), label
        if label.startswith("batch"):
            seen = [r[label]["decisions"] for r in ranks]
            assert seen[0] == seen[1], f"{label}: ranks drew different batch decisions"
            assert True in seen[0] and False in seen[0], label  # rate 0.5: both happen
    # Row masks come from each rank's own generator: the losses differ between ranks.
    assert ranks[0]["row-mask"]["losses"] != ranks[1]["row-mask"]["losses"]


@pytest.mark.slow
def test_fsdp2_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard")
    _spawn(_fsdp_worker, _free_port(), str(tmp_path))
    for r in _read(tmp_path):
        for label in ("mask", "skip"):
            assert all(math.isfinite(v) for v in r[label]["losses"])
            assert r[label]["params_equal"]


# --------------------------------------------------------------------------- at scale
# A residual MLP: each block has one branch, so a site's parameters are its block's. Small
# enough that a dozen configurations train in one spawn on two shared cores.
RATE = 0.4
DEPTH = 6
STEPS = 6


class MLPBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ResMLP(nn.Module):
    """``checkpointing``: "" (none), "non-reentrant" or "reentrant", around each block
    (timm's and transformers' gradient checkpointing: the site runs inside the region)."""

    def __init__(self, width: int = 32, depth: int = DEPTH) -> None:
        super().__init__()
        self.stem = nn.Linear(16, width)
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 5)
        self.checkpointing = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            if self.checkpointing:
                reentrant = self.checkpointing == "reentrant"
                x = checkpoint(block, x, use_reentrant=reentrant)
            else:
                x = block(x)
        return nn.functional.cross_entropy(self.head(x), torch.arange(len(x)) % 5)


def _resmlp(mode: str, skip: bool, seed: int = 7) -> ResMLP:
    import dpatch

    torch.manual_seed(0)  # the same initial weights on every rank
    model = ResMLP()
    dpatch.inject(
        model, RATE, schedule="uniform", mode=mode, skip=skip, seed=seed,
        example_inputs=(torch.randn(2, 16),),
    )  # fmt: skip
    return model


@contextmanager
def _decisions(model: nn.Module) -> Iterator[list[list[bool]]]:
    """Log each block's batch decisions, one list per forward (replays inside backward,
    by activation checkpointing, are not new decisions and are left out)."""
    import dpatch
    from dpatch.ranks import in_backward

    log: list[list[bool]] = []
    slots = [m for m in model.modules() if isinstance(m, dpatch.DropPath)]
    for i, slot in enumerate(slots):
        real = slot.keep_batch

        def logged(real: Callable[[], bool] = real, i: int = i) -> bool:
            keep = real()
            if not in_backward():
                if i == 0:
                    log.append([])
                log[-1].append(keep)
            return keep

        slot.keep_batch = logged  # type: ignore[method-assign]
    try:
        yield log
    finally:
        for slot in slots:
            del slot.keep_batch


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _is_zero(grad: torch.Tensor | None) -> bool:
    """A gradient of exactly zero (None is not: DDP and FSDP need a gradient). FSDP2's is
    a shard: zero on every rank means zero in full."""
    if grad is None:
        return False
    local = grad.to_local() if hasattr(grad, "to_local") else grad
    return bool((local == 0).all())


def _all_equal(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(gathered, t)
    return all(torch.equal(gathered[0], g) for g in gathered)


# (label, mode, skip, DDP keyword arguments, checkpointing, micro-batches per step)
DDP_RUNS: list[tuple[str, str, bool, dict[str, Any], str, int]] = [
    ("batch-mask", "batch", False, {}, "", 1),
    ("batch-skip", "batch", True, {}, "", 1),
    ("batch-skip-static", "batch", True, {"static_graph": True}, "", 1),
    ("batch-skip-bucket-view", "batch", True, {"gradient_as_bucket_view": True}, "", 1),
    ("batch-skip-no-sync", "batch", True, {}, "", 2),
    ("batch-skip-checkpoint", "batch", True, {}, "non-reentrant", 1),
    ("batch-skip-checkpoint-reentrant", "batch", True, {"static_graph": True}, "reentrant", 1),
    ("row-skip", "row", True, {}, "", 1),
]


def _ddp_scale_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, port)
    results: dict[str, Any] = {}
    try:
        for label, mode, skip, ddp_kwargs, checkpointing, micro in DDP_RUNS:
            model = _resmlp(mode, skip)
            model.checkpointing = checkpointing
            ddp = DDP(model, find_unused_parameters=False, **ddp_kwargs)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            torch.manual_seed(100 + rank)  # each rank its own data
            losses, grads_equal, dropped_zero, kept_nonzero = [], [], [], []
            with _decisions(model) as log:
                for _ in range(STEPS):
                    for j in range(micro):
                        sync = j == micro - 1
                        with nullcontext() if sync else ddp.no_sync():
                            loss = ddp(torch.randn(8, 16))
                            loss.backward()
                    grads_equal.append(_all_equal(_flat_grads(model)))
                    if micro == 1 and mode == "batch":
                        for block, keep in zip(model.blocks, log[-1], strict=True):
                            zero = all(_is_zero(p.grad) for p in block.parameters())
                            (kept_nonzero if keep else dropped_zero).append(keep != zero)
                    opt.step()
                    opt.zero_grad()
                    losses.append(loss.item())
            params = torch.cat([p.detach().flatten() for p in model.parameters()])
            results[label] = {
                "losses": losses,
                "decisions": log,
                "grads_equal": grads_equal,
                "dropped_zero": dropped_zero,
                "kept_nonzero": kept_nonzero,
                "params_equal": _all_equal(params),
            }
        # torch.compile of the DDP model: batch skip masks inside the graph (device draws),
        # so every parameter is used; no graph break, no host draw, no hang.
        model = _resmlp("batch", True)
        compiled = torch.compile(DDP(model), backend="aot_eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        torch.manual_seed(100 + rank)
        losses = []
        for _ in range(3):
            loss = compiled(torch.randn(8, 16))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        results["compiled"] = {
            "losses": losses,
            "params_equal": _all_equal(params),
            "host_draws": sum(m.draws for m in model.modules() if hasattr(m, "draws")),
        }
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    _done()


def _binomial_ok(dropped: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(dropped - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.slow
def test_ddp_batch_skip_without_find_unused_parameters(tmp_path: Path) -> None:
    """Batch skip under DDP(find_unused_parameters=False): plain, static_graph, no_sync
    accumulation, checkpointing (both kinds), torch.compile; every rank takes the same
    decisions, a dropped branch's gradients are exactly zero, parameters stay equal across
    ranks, and the loss curve is masking's, step for step (same seed: same decisions)."""
    _spawn(_ddp_scale_worker, _free_port(), str(tmp_path))
    ranks = _read(tmp_path)
    for label, mode, _skip, _kw, _ckpt, micro in DDP_RUNS:
        for r in ranks:
            res = r[label]
            assert all(math.isfinite(v) for v in res["losses"]), label
            assert all(res["grads_equal"]) and res["params_equal"], label
            if mode == "batch":
                assert len(res["decisions"]) == STEPS * micro, label
        if mode != "batch":
            continue
        decisions = [r[label]["decisions"] for r in ranks]
        assert decisions[0] == decisions[1], f"{label}: ranks drew different decisions"
        flat = [keep for step in decisions[0] for keep in step]
        assert _binomial_ok(flat.count(False), len(flat), RATE), (label, flat.count(False))
        if micro == 1:
            for r in ranks:
                assert r[label]["dropped_zero"] and all(r[label]["dropped_zero"]), label
                assert r[label]["kept_nonzero"] and all(r[label]["kept_nonzero"]), label
    for r in ranks:
        compiled = r["compiled"]
        assert all(math.isfinite(v) for v in compiled["losses"]) and compiled["params_equal"]
        assert compiled["host_draws"] == 0
        # Same seed, same data: skipping takes masking's decisions and gives its losses.
        reference = r["batch-mask"]
        for label in ("batch-skip", "batch-skip-static", "batch-skip-bucket-view",
                      "batch-skip-checkpoint", "batch-skip-checkpoint-reentrant"):  # fmt: skip
            assert r[label]["decisions"] == reference["decisions"], label
            assert r[label]["losses"] == pytest.approx(reference["losses"], rel=1e-5), label


def _fsdp_block_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    _init(rank, port)
    results: dict[str, Any] = {}
    try:
        for label, mode, skip in (
            ("batch-mask", "batch", False),
            ("batch-skip", "batch", True),
            ("row-skip", "row", True),
        ):
            model = _resmlp(mode, skip)
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            torch.manual_seed(100 + rank)
            losses, dropped_zero, kept_nonzero = [], [], []
            with _decisions(model) as log:
                for _ in range(STEPS):
                    loss = model(torch.randn(8, 16))
                    loss.backward()
                    if mode == "batch":
                        for block, keep in zip(model.blocks, log[-1], strict=True):
                            # Each rank holds a shard: zero everywhere iff zero in full.
                            zero = all(_is_zero(p.grad) for p in block.parameters())
                            (kept_nonzero if keep else dropped_zero).append(keep != zero)
                    opt.step()
                    opt.zero_grad()
                    losses.append(loss.item())
            full = torch.cat([p.full_tensor().flatten() for p in model.parameters()])
            results[label] = {
                "losses": losses,
                "decisions": log,
                "dropped_zero": dropped_zero,
                "kept_nonzero": kept_nonzero,
                "params_equal": _all_equal(full),
            }
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    _done()


@pytest.mark.slow
def test_fsdp2_per_block_batch_skip(tmp_path: Path) -> None:
    """fully_shard on every block: a dropped block's all-gather and reduce-scatter still
    run on every rank (no hang), its gradients are zero, and the losses are masking's."""
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard")
    _spawn(_fsdp_block_worker, _free_port(), str(tmp_path))
    ranks = _read(tmp_path)
    for r in ranks:
        for label in ("batch-mask", "batch-skip", "row-skip"):
            assert all(math.isfinite(v) for v in r[label]["losses"]), label
            assert r[label]["params_equal"], label
        skip = r["batch-skip"]
        assert skip["dropped_zero"] and all(skip["dropped_zero"])
        assert skip["kept_nonzero"] and all(skip["kept_nonzero"])
        assert skip["decisions"] == r["batch-mask"]["decisions"]
        assert skip["losses"] == pytest.approx(r["batch-mask"]["losses"], rel=1e-5)
    assert ranks[0]["batch-skip"]["decisions"] == ranks[1]["batch-skip"]["decisions"]


def _mismatch_worker(rank: int, port: int, out_dir: str) -> None:
    """Ranks patched differently: each case must raise at the first step on every rank."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dpatch
    from dpatch import ranks as dranks

    # Before the process group exists (no check yet), rank 0 runs an extra training
    # forward: its generators are one draw ahead of rank 1's from then on.
    ahead = _resmlp("batch", True)
    if rank == 0:
        ahead(torch.randn(8, 16))
    _init(rank, port)
    seen: dict[str, str] = {}

    def first_step(model: nn.Module, case: str) -> None:
        ddp = DDP(model)
        try:
            ddp(torch.randn(8, 16)).backward()
            seen[case] = "no error"
        except dpatch.DPatchError as exc:
            seen[case] = f"{type(exc).__name__}: {exc}"

    first_step(_resmlp("batch", True, seed=7 + 10 * rank), "seed")
    model = _resmlp("batch", True)
    if rank == 1:  # patched block by block: other site names, one check per block
        dpatch.strip(model)
        for block in model.blocks:
            dpatch.inject(block, RATE, schedule="uniform", mode="batch", skip=True,
                          example_inputs=(torch.randn(2, 32),))  # fmt: skip
    first_step(model, "sites")
    first_step(ahead, "draws")
    # Last: a rank without batch-mode sites never joins the check; the other gives up.
    dranks.RANK_CHECK_TIMEOUT = datetime.timedelta(seconds=3)
    model = _resmlp("batch" if rank == 0 else "row", True)
    try:
        model(torch.randn(8, 16))
        seen["absent"] = "no error"
    except dpatch.DPatchError as exc:
        seen["absent"] = f"{type(exc).__name__}: {exc}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    # Rank 1 stays until rank 0 has given up (its leaving would end the wait another
    # way); the timed-out collective is still pending on rank 0: no teardown.
    deadline = time.monotonic() + 60
    while rank == 1 and not Path(out_dir, "rank0.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(0)


@pytest.mark.slow
def test_ranks_patched_differently_fail_at_the_first_step(tmp_path: Path) -> None:
    _spawn(_mismatch_worker, _free_port(), str(tmp_path))
    ranks = _read(tmp_path)
    for r in ranks:
        for case in ("seed", "sites", "draws"):
            assert r[case].startswith("RankMismatchError: "), (case, r[case])
            assert "\n" not in r[case]
        assert "seed of site 'blocks.0.drop_path' is 7 on rank 0 but 17 on rank 1" in r["seed"]
        assert "rank 1 patched other sites than rank 0" in r["sites"]
        assert "'drop_path'" in r["sites"]
        assert "drawn 1 batch decisions on rank 0 but 0 on rank 1" in r["draws"]
    assert "waited 3 s" in ranks[0]["absent"] and "DPATCH_RANK_CHECK=0" in ranks[0]["absent"]
    assert ranks[1]["absent"] == "no error"


# --------------------------------------------------------------------------- tied blocks
class TwoBranchBlock(nn.Module):
    """A pre-norm transformer-style layer: two residual branches, tied into one decision."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TiedNet(nn.Module):
    def __init__(self, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(16, width)
        self.blocks = nn.ModuleList(TwoBranchBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x), torch.arange(len(x)) % 5)


def _ddp_tie_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dpatch

    _init(rank, port)
    results: dict[str, Any] = {}
    try:
        for mode in ("row", "batch"):
            torch.manual_seed(0)
            model = TiedNet()
            dpatch.inject(model, RATE, schedule="uniform", mode=mode, skip=True, tie="block",
                          seed=7, example_inputs=(torch.randn(2, 16),))  # fmt: skip
            ddp = DDP(model, find_unused_parameters=False)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            torch.manual_seed(100 + rank)
            grads_equal, losses = [], []
            with _decisions(model) as log:
                for _ in range(STEPS):
                    loss = ddp(torch.randn(8, 16))
                    loss.backward()
                    grads_equal.append(_all_equal(_flat_grads(model)))
                    opt.step()
                    opt.zero_grad()
                    losses.append(loss.item())
            params = torch.cat([p.detach().flatten() for p in model.parameters()])
            results[mode] = {
                "losses": losses,
                "grads_equal": grads_equal,
                "params_equal": _all_equal(params),
                "decisions": log,
            }
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    _done()


@pytest.mark.slow
def test_ddp_tied_blocks_skip_without_find_unused_parameters(tmp_path: Path) -> None:
    """tie='block' with skip under DDP(find_unused_parameters=False): the whole layer on
    the kept rows (row mode) or one decision per layer for the batch (batch mode); no
    error or hang, gradients and parameters equal across ranks, a layer's two branches
    dropped together and the ranks' decisions the same."""
    _spawn(_ddp_tie_worker, _free_port(), str(tmp_path))
    ranks = _read(tmp_path)
    for r in ranks:
        for mode in ("row", "batch"):
            res = r[mode]
            assert all(math.isfinite(v) for v in res["losses"]), mode
            assert all(res["grads_equal"]) and res["params_equal"], mode
        per_step = r["batch"]["decisions"]
        assert len(per_step) == STEPS
        for step in per_step:  # both branches of each layer: one decision
            assert step[0::2] == step[1::2], step
    assert ranks[0]["batch"]["decisions"] == ranks[1]["batch"]["decisions"]
