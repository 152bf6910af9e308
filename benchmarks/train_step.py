"""A full training step (forward, backward, optimizer) with and without stochastic depth.

Models: ResNet-50 (SGD, channels_last) and a ViT (AdamW); on CUDA with bf16 autocast at
224 px (ViT-B/16, batch 256 / ResNet-50 batch 256), on CPU reduced (ViT-S/16 at 112 px,
ResNet-50 at 112 px, smaller batches, fp32). Configurations, at linear 0.2 and uniform 0.4:

- ``none``: the timm model without DropPath (drop_path_rate=0);
- ``timm``: timm's own DropPath (create_model(drop_path_rate=r); uniform rates set on it);
- ``dpatch mask``: dpatch.inject on the model without DropPath (fused residual add);
- ``dpatch skip``: dpatch.inject(..., skip=True) (dropped rows not computed).

Step times are measured with all four configurations in one process, in interleaved
rounds (the median per configuration), so load drifts hit them alike. Peak memory is
measured with each configuration alone in its own process (CUDA: max_memory_allocated;
CPU: peak resident set size).

    python benchmarks/train_step.py                    # CPU
    python benchmarks/train_step.py --device cuda      # GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import base_parser, environment, print_table, setup, sync, time_ms, write_json

CONFIGS = ["none", "timm", "dpatch mask", "dpatch skip"]
SCHEDULES = [("linear", 0.2), ("uniform", 0.4)]


def model_settings(name: str, gpu: bool) -> dict[str, Any]:
    if name == "resnet50":
        return {
            "arch": "resnet50",
            "batch": 256 if gpu else 16,
            "size": 224 if gpu else 112,
            "kwargs": {},
        }
    if gpu:
        return {"arch": "vit_base_patch16_224", "batch": 256, "size": 224, "kwargs": {}}
    return {"arch": "vit_small_patch16_224", "batch": 32, "size": 112, "kwargs": {"img_size": 112}}


def build(
    arch: str, kwargs: dict[str, Any], config: str, schedule: str, rate: float
) -> torch.nn.Module:
    import timm

    import dpatch

    if config == "timm":
        model = timm.create_model(arch, drop_path_rate=rate, **kwargs)
        if schedule == "uniform":
            _timm_uniform(model, rate)
        return model
    model = timm.create_model(arch, drop_path_rate=0.0, **kwargs)
    if config.startswith("dpatch"):
        dpatch.inject(model, rate, schedule=schedule, skip=config == "dpatch skip")
    return model


def _timm_uniform(model: torch.nn.Module, rate: float) -> None:
    """Every timm slot at ``rate``, including the rate-0 ones timm left as Identity/None."""
    from timm.layers import DropPath

    from dpatch.analysis import SLOT_ATTRS

    for m in list(model.modules()):
        for attr in SLOT_ATTRS:
            current = m._modules.get(attr, m.__dict__.get(attr, 0))
            if isinstance(current, DropPath):
                current.drop_prob = rate
            elif isinstance(current, torch.nn.Identity) or current is None:
                if current is None:
                    del m.__dict__[attr]
                setattr(m, attr, DropPath(rate))


def make_step(args: Any, config: str, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """A closure running one training step of (model, config, schedule)."""
    gpu = device.type == "cuda"
    s = model_settings(args.model, gpu)
    torch.manual_seed(0)
    model = build(s["arch"], s["kwargs"], config, args.schedule, args.rate).to(device)
    model.train()
    if args.model == "resnet50":
        model = model.to(memory_format=torch.channels_last)
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
    x = torch.randn(s["batch"], 3, s["size"], s["size"], device=device)
    if args.model == "resnet50":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (s["batch"],), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, s


def measure_memory(args: Any) -> dict[str, Any]:
    """Peak memory of one configuration, alone in this process."""
    device = setup(args)
    step, s = make_step(args, args.config, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):
        step()
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"peak_gib": peak, "batch": s["batch"], "size": s["size"], "arch": s["arch"]}


def measure_time(args: Any) -> dict[str, float]:
    """Step time of every configuration, measured in interleaved rounds in this process so
    that machine load drifts affect all of them alike; the median over rounds is kept."""
    device = setup(args)
    steps = {c: make_step(args, c, device)[0] for c in CONFIGS}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(args.repeat):
        for c, step in steps.items():
            times[c].append(time_ms(step, device, warmup=0, repeat=1))
    return {c: statistics.median(v) for c, v in times.items()}


def run_child(
    args: Any, mode: str, model: str, schedule: str, rate: float, config: str = ""
) -> Any:
    cmd = [
        sys.executable, __file__, mode, "--device", args.device, "--model", model,
        "--schedule", schedule, "--rate", str(rate), "--warmup", str(args.warmup),
        "--repeat", str(args.repeat), "--config", config or "none",
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{model}/{schedule}/{config or 'timing'} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--models", default="resnet50,vit", help="comma list: resnet50,vit")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None, help="interleaved timing rounds")
    hidden = argparse.SUPPRESS
    p.add_argument("--memory-one", action="store_true", help=hidden)
    p.add_argument("--time-all", action="store_true", help=hidden)
    p.add_argument("--model", default=None, help=hidden)
    p.add_argument("--config", default=None, help=hidden)
    p.add_argument("--schedule", default=None, help=hidden)
    p.add_argument("--rate", type=float, default=None, help=hidden)
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    args.repeat = args.repeat if args.repeat is not None else (20 if gpu else 6)
    if args.memory_one:
        print(json.dumps(measure_memory(args)))
        return
    if args.time_all:
        print(json.dumps(measure_time(args)))
        return

    device = setup(args)
    rows = []
    for model in args.models.split(","):
        for schedule, rate in SCHEDULES:
            ms = run_child(args, "--time-all", model, schedule, rate)
            mem = {c: run_child(args, "--memory-one", model, schedule, rate, c) for c in CONFIGS}
            for c in CONFIGS:
                r = mem[c]
                rows.append(
                    [
                        f"{r['arch']} b{r['batch']} {r['size']}px",
                        f"{schedule} {rate}",
                        c,
                        ms[c],
                        ms[c] / ms["none"],
                        r["peak_gib"],
                        r["peak_gib"] / mem["none"]["peak_gib"],
                    ]
                )
                print(f"  {rows[-1][0]} {schedule} {rate} {c}: {ms[c]:.1f} ms", file=sys.stderr)
    env = environment(device)
    prec = "bf16 autocast" if gpu else "fp32"
    title = (
        f"train step (forward+backward+optimizer, {prec}, median of {args.repeat} interleaved "
        f"rounds): {env['device']} (torch {env['torch']}, timm {env['timm']})"
    )
    mem_label = "peak GiB (CUDA alloc)" if gpu else "peak RSS GiB"
    header = ["model", "schedule", "config", "ms/step", "vs none", mem_label, "mem vs none"]
    print_table(title, header, rows)
    write_json(
        args.json,
        {
            "benchmark": "train_step",
            "precision": prec,
            **env,
            "rows": [dict(zip(header, r, strict=False)) for r in rows],
        },
    )


if __name__ == "__main__":
    main()
