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

Self-contained: it imports nothing from the other benchmark scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

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
    torch.set_num_threads(args.threads)
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
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
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
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--world", type=int, default=2, help="processes (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process on CPU")
    p.add_argument("--rate", type=float, default=0.4, help="uniform drop rate (default 0.4)")
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="samples per rank")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"error: --device cuda needs {args.world} GPUs")

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "times.json"))
        mp.spawn(_worker, args=(_free_port(), args, out), nprocs=args.world)
        times: dict[str, list[float]] = json.loads(Path(out).read_text())

    import dpatch

    base = statistics.median(times["none"])
    rows = []
    for config in CONFIGS:
        med = statistics.median(times[config])
        target = TARGETS.get(config)
        verdict = (
            ""
            if target is None
            else f"<= {target}x: {'met' if med / base <= target else 'NOT met'}"
        )
        rows.append(
            {
                "config": config,
                "median_ms": med,
                "min_ms": min(times[config]),
                "max_ms": max(times[config]),
                "vs_none": med / base,
                "target": verdict,
            }
        )
    where = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"{_cpu_name()}, {args.threads} thread(s) per process"
    )
    print(
        f"DDP train step, {args.world} processes ({'NCCL' if args.device == 'cuda' else 'gloo'}), "
        f"find_unused_parameters=False; residual MLP width {args.width}, depth {args.depth}, "
        f"{args.batch}x{args.tokens} tokens per rank, AdamW, uniform rate {args.rate}; "
        f"median of {args.rounds} interleaved rounds; {where}; torch {torch.__version__}, "
        f"dpatch {dpatch.__version__}"
    )
    print()
    print("| config | ms/step (median) | min-max | vs none | target |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} "
            f"| {r['vs_none']:.3f}x | {r['target']} |"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"benchmark": "distributed", "settings": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(doc | {"rows": rows, "times": times}, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
