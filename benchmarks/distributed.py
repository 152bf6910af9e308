"""Training step time under DDP: no stochastic depth, masking, row skip and batch skip.

Two processes (gloo on CPU, NCCL with ``--device cuda``) train a residual MLP on token
vectors (pre-norm blocks ``x + fc2(gelu(fc1(norm(x))))``; the shape of a transformer's MLP
half) wrapped in ``DistributedDataParallel(find_unused_parameters=False)``, at a uniform
rate (0.4 by default):

- ``none``: the model without stochastic depth;
- ``mask``: ``dpatch.inject`` (row mode, fused residual add: every branch computed);
- ``row skip``: ``skip=True`` (each branch computed on a fixed 1-p share of the samples);
- ``batch skip``: ``mode="batch", skip=True`` (a dropped branch is not computed at all; its
  parameters still get zero gradients, so DDP needs no ``find_unused_parameters``).

All four models live in each process and are stepped in interleaved rounds (the order
rotates every round), so load drifts hit them alike. A step's time is the slowest rank's
(each step starts at a barrier; the all-reduce makes the ranks wait for each other). The
table shows the median, the min-max range and the ratio of medians to ``none``.

    python benchmarks/distributed.py                 # 2 CPU processes, 1 thread each
    python benchmarks/distributed.py --device cuda   # 2 GPUs, NCCL

It prints through the shared harness (``_common.py``): the header, the table with the
command under it, and ``--json`` with every raw sample.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import Run, Timing, parser

CONFIGS = ("none", "mask", "row skip", "batch skip")
TARGETS = {"mask": 1.02, "batch skip": 0.75}


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, width: int, depth: int, classes: int = 100) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def _build(config: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    import dpatch

    torch.manual_seed(0)  # the same weights on every rank
    model = ResidualMLP(args.width, args.depth).to(device)
    if config != "none":
        dpatch.inject(
            model,
            args.rate,
            schedule="uniform",
            mode="batch" if config == "batch skip" else "row",
            skip=config != "mask",
            seed=0,
            example_inputs=(torch.randn(2, args.tokens, args.width, device=device),),
        )
    return model.train()


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    gpu = args.device == "cuda"
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=args.world)
    torch.set_num_threads(args.per_process_threads)
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    steps = {}
    for config in CONFIGS:
        model = _build(config, args, device)
        ddp = DDP(model, find_unused_parameters=False)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
        torch.manual_seed(100 + rank)  # each rank its own batch
        x = torch.randn(args.batch, args.tokens, args.width, device=device)
        y = torch.randint(0, 100, (args.batch,), device=device)

        def step(ddp: nn.Module = ddp, opt: Any = opt, x: Any = x, y: Any = y) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[config] = step
    for step in steps.values():
        for _ in range(args.steps_warmup):
            step()
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    orders: list[list[str]] = []
    for r in range(args.steps_rounds):
        order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
        orders.append(list(order))
        for config in order:
            dist.barrier()
            if gpu:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            steps[config]()
            if gpu:
                torch.cuda.synchronize(device)
            ms = torch.tensor([(time.perf_counter() - t0) * 1e3], dtype=torch.float64)
            if gpu:
                ms = ms.to(device)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the slowest rank's step
            times[config].append(float(ms.item()))
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "order": orders}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    p = parser(__doc__ or "", rounds=(16, 3), warmup=(2, 1))
    p.add_argument("--world", type=int, default=2, help="processes (default 2)")
    p.add_argument("--rate", type=float, default=0.4, help="uniform drop rate (default 0.4)")
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="samples per rank")
    args = p.parse_args()
    run = Run("distributed", args)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"error: --device cuda needs {args.world} GPUs")
    settings = argparse.Namespace(
        **vars(args), steps_rounds=run.rounds, steps_warmup=run.warmup,
        per_process_threads=args.threads or 1,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "times.json"))
        mp.spawn(_worker, args=(_free_port(), settings, out), nprocs=args.world)
        doc = json.loads(Path(out).read_text())
    timing = Timing(
        CONFIGS,
        {c: tuple(doc["times"][c]) for c in CONFIGS},
        tuple(tuple(r) for r in doc["order"]),
        run.warmup,
    )
    run.record("ddp_step", timing)
    rows = []
    for config in CONFIGS:
        ratio = timing.ratio(config, "none")
        target = TARGETS.get(config)
        verdict = "" if target is None else (
            f"<= {target}x: {'met' if ratio.median <= target else 'NOT met'}"
        )  # fmt: skip
        rows.append([config, timing.spread(config), ratio.ratio_cell(), verdict])
    backend = "NCCL" if args.device == "cuda" else "gloo"
    run.table(
        f"DDP train step, {args.world} processes ({backend}), find_unused_parameters=False",
        ["config", "ms per step", "vs none", "target"],
        rows,
        note=f"residual MLP width {args.width}, depth {args.depth}, {args.batch}x{args.tokens} "
        f"tokens per rank, AdamW, uniform rate {args.rate}, {settings.per_process_threads} "
        f"thread(s) per process; a step is the slowest rank's; median [min-max] of "
        f"{run.rounds} interleaved rounds, ratios paired within a round",
    )
    run.finish()


if __name__ == "__main__":
    main()
