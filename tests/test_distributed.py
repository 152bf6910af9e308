"""DDP and FSDP2 on two CPU processes (gloo, localhost), as real training would run them.

Each worker builds the same model, patches it, wraps it, trains a few steps on its own
data and writes what it saw; the test compares the ranks.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
# (name, mode, skip, find_unused_parameters): batch mode with skipping leaves whole
# branches out of some steps, the one case that needs DDP's find_unused_parameters=True.
MODES = [
    ("row-mask", "row", False, False),
    ("row-skip", "row", True, False),
    ("batch-mask", "batch", False, False),
    ("batch-skip", "batch", True, True),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def _read(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_ddp_two_processes(name: str, tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), name, str(tmp_path)), nprocs=WORLD)
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
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    for r in _read(tmp_path):
        for label in ("mask", "skip"):
            assert all(math.isfinite(v) for v in r[label]["losses"])
            assert r[label]["params_equal"]
