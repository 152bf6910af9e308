"""A full training step (forward, backward, optimizer) with and without stochastic depth.

Models: ResNet-50 (SGD, channels_last) and a ViT (AdamW); on CUDA with bf16 autocast at
224 px (ViT-B/16, batch 256 / ResNet-50 batch 256), on CPU reduced (ViT-S/16 at 112 px,
ResNet-50 at 112 px, smaller batches, fp32). Configurations, at linear 0.2 and uniform 0.4:

- ``none``: the timm model without DropPath (drop_path_rate=0): the baseline;
- ``timm``: timm's own DropPath (create_model(drop_path_rate=r); uniform rates set on it);
- ``dpatch mask``: dpatch.inject on the model without DropPath (fused residual add);
- ``dpatch skip``: dpatch.inject(..., skip=True) (dropped rows not computed);
- ``subset``: the hand-written way to skip dropped rows, for comparison with ``dpatch
  skip``: each block's forward rewritten here to gather a random subset of
  k = max(round(B (1-p)), 1) rows, run the branch on them and ``index_add`` the result back
  scaled by B/k (DINOv2's ``drop_add_residual_stochastic_depth``), same rates as dpatch.

Step times: all five configurations in one process, interleaved round by round
(``_common.interleave``), ratios to ``none`` paired within a round. Peak memory: each
configuration alone in a fresh process (CUDA: max_memory_allocated; CPU: peak resident set
size, VmHWM, of a process forked from a server that has imported torch, timm and dpatch),
``--memory-rounds`` times, round by round.

    python benchmarks/train_step.py                    # CPU
    python benchmarks/train_step.py --device cuda      # GPU
"""

from __future__ import annotations

import copy
import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import Case, Run, Timing, event_timer, interleave, parser, sync

CONFIGS = ["none", "timm", "dpatch mask", "dpatch skip", "subset"]
SCHEDULES = [("linear", 0.2), ("uniform", 0.4)]


def model_settings(name: str, gpu: bool, quick: bool = False) -> dict[str, Any]:
    if name == "resnet50":
        return {
            "arch": "resnet50",
            "label": "ResNet-50",
            "batch": 256 if gpu else 4 if quick else 16,
            "size": 224 if gpu else 64 if quick else 112,
            "kwargs": {},
        }
    if gpu:
        return {
            "arch": "vit_base_patch16_224",
            "label": "ViT-B/16",
            "batch": 256,
            "size": 224,
            "kwargs": {},
        }
    size = 64 if quick else 112
    return {
        "arch": "vit_small_patch16_224",
        "label": "ViT-S/16",
        "batch": 8 if quick else 32,
        "size": size,
        "kwargs": {"img_size": size},
    }


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
    elif config == "subset":
        report = dpatch.inject(copy.deepcopy(model), rate, schedule=schedule)
        subset_blocks(model, {s.slot: s.rate for s in report.sites})
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


# --------------------------------------------------------------------------- subset baseline
def subset_add(
    shortcut: torch.Tensor,
    x: torch.Tensor,
    branch: Callable[[torch.Tensor], torch.Tensor],
    rate: float,
    training: bool,
) -> torch.Tensor:
    """``shortcut + branch(x)``, in training with the branch run on a random subset of
    k = max(round(B (1-rate)), 1) rows and added back scaled by B/k: DINOv2's
    ``drop_add_residual_stochastic_depth``, written the plain way (indexing, index_add)."""
    if not training or rate == 0:
        return shortcut + branch(x)
    b = x.shape[0]
    k = max(round(b * (1 - rate)), 1)
    rows = torch.randperm(b, device=x.device)[:k]
    return torch.index_add(shortcut, 0, rows, branch(x[rows]).to(shortcut.dtype), alpha=b / k)


class SubsetBottleneck(nn.Module):
    """timm's ResNet ``Bottleneck`` forward with ``subset_add`` for its residual."""

    def __init__(self, block: nn.Module, rate: float) -> None:
        super().__init__()
        self.block = block
        self.rate = rate

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = b.act1(b.bn1(b.conv1(x)))
        x = b.aa(b.act2(b.drop_block(b.bn2(b.conv2(x)))))
        x = b.bn3(b.conv3(x))
        return b.se(x) if b.se is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        shortcut = b.downsample(x) if b.downsample is not None else x
        return b.act3(subset_add(shortcut, x, self._branch, self.rate, self.training))


class SubsetViTBlock(nn.Module):
    """timm's ViT ``Block`` forward with ``subset_add`` for both residuals."""

    def __init__(self, block: nn.Module, rate1: float, rate2: float) -> None:
        super().__init__()
        self.block = block
        self.rates = (rate1, rate2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = subset_add(x, x, lambda t: b.ls1(b.attn(b.norm1(t))), self.rates[0], self.training)
        return subset_add(x, x, lambda t: b.ls2(b.mlp(b.norm2(t))), self.rates[1], self.training)


def subset_blocks(model: nn.Module, rates: dict[str, float]) -> None:
    """Every ResNet bottleneck / ViT block of ``model`` replaced by its subset version, at
    the rates ``rates`` gives its slots (``layer1.0.drop_path``, ``blocks.0.drop_path1``)."""
    from timm.models.resnet import Bottleneck
    from timm.models.vision_transformer import Block

    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, Bottleneck | Block)]
    for name, m in blocks:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(m, Bottleneck):
            setattr(parent, attr, SubsetBottleneck(m, rates[f"{name}.drop_path"]))
        elif isinstance(m, Block):
            rate1, rate2 = rates[f"{name}.drop_path1"], rates[f"{name}.drop_path2"]
            setattr(parent, attr, SubsetViTBlock(m, rate1, rate2))


# --------------------------------------------------------------------------- one config
def make_step(
    model_name: str, config: str, schedule: str, rate: float, device: torch.device, quick: bool
) -> tuple[Callable[[], None], dict[str, Any]]:
    """A closure running one training step of (model, config, schedule)."""
    gpu = device.type == "cuda"
    s = model_settings(model_name, gpu, quick)
    torch.manual_seed(0)
    model = build(s["arch"], s["kwargs"], config, schedule, rate).to(device)
    model.train()
    if model_name == "resnet50":
        model = model.to(memory_format=torch.channels_last)
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
    x = torch.randn(s["batch"], 3, s["size"], s["size"], device=device)
    if model_name == "resnet50":
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


def _peak_rss_gib() -> float:
    """This process's peak resident set size (VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_memory(
    model_name: str, config: str, schedule: str, rate: float, device_name: str, threads: int,
    quick: bool,
) -> float:  # fmt: skip
    """Peak memory (GiB) of one configuration, alone in this (fresh) process."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    step, _ = make_step(model_name, config, schedule, rate, device, quick)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # the second step runs with the optimizer state in place
        step()
    sync(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return _peak_rss_gib()


def measure_time(
    model_name: str, schedule: str, rate: float, device_name: str, threads: int, quick: bool,
    rounds: int, warmup: int,
) -> dict[str, Any]:  # fmt: skip
    """Step times of every configuration, interleaved round by round in this process."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    cases = [Case(c, make_step(model_name, c, schedule, rate, device, quick)[0]) for c in CONFIGS]

    def progress(s: str) -> None:
        print(f"  {model_name} {schedule} {rate} {s}", file=sys.stderr, flush=True)

    timing = interleave(
        cases, rounds=rounds, warmup=warmup, timer=event_timer(device), progress=progress
    )
    return timing.as_dict()


def fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new process forked from a server that has imported torch, timm
    and dpatch already (a process per measurement without paying the imports each time)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "dpatch", "train_step"])
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


# --------------------------------------------------------------------------- main
def main() -> None:
    p = parser(__doc__ or "", rounds=(6, 2), warmup=(1, 1))
    p.add_argument("--models", default="resnet50,vit", help="comma list: resnet50,vit")
    p.add_argument("--memory-rounds", type=int, default=None, help="default 2 (quick: 1)")
    args = p.parse_args()
    run = Run("train_step", args)
    gpu = run.device.type == "cuda"
    mem_rounds = args.memory_rounds or (1 if args.quick else 2)
    threads = torch.get_num_threads()
    time_rows: list[list[Any]] = []
    mem_rows: list[list[Any]] = []
    for model in args.models.split(","):
        s = model_settings(model, gpu, args.quick)
        for schedule, rate in SCHEDULES:
            key = f"{model} {schedule} {rate}"
            doc = fresh_process(
                measure_time, model, schedule, rate, args.device, threads, args.quick,
                run.rounds, run.warmup,
            )  # fmt: skip
            timing = Timing.from_dict(doc)
            run.record(key, timing)
            label = f"{s['label']} b{s['batch']} {s['size']}px"
            time_rows.append(
                [
                    label,
                    f"{schedule} {rate}",
                    timing.spread("none"),
                    *(timing.ratio(c, "none").ratio_cell() for c in CONFIGS[1:]),
                ]
            )
            # memory: each configuration alone in a fresh process, round-robin
            peaks: dict[str, list[float]] = {c: [] for c in CONFIGS}
            order = []
            for r in range(mem_rounds):
                turn = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
                for c in turn:
                    where = (model, c, schedule, rate, args.device, threads, args.quick)
                    peaks[c].append(fresh_process(measure_memory, *where))
                order.append(tuple(turn))
                run.note(
                    f"{key} memory round {r + 1}: "
                    + ", ".join(f"{c} {v[-1]:.3f} GiB" for c, v in peaks.items())
                )
            mem = Timing(tuple(CONFIGS), {c: tuple(v) for c, v in peaks.items()}, tuple(order), 0)
            run.record(f"{key} memory", mem, unit="GiB")
            mem_rows.append(
                [
                    label,
                    f"{schedule} {rate}",
                    mem.spread("none").cell("GiB"),
                    *(mem.ratio(c, "none").ratio_cell() for c in CONFIGS[1:]),
                ]
            )
    prec = "bf16 autocast" if gpu else "fp32"
    header = ["model", "schedule", "none", *(f"{c} / none" for c in CONFIGS[1:])]
    run.table(
        f"Train step time (forward + backward + optimizer, {prec})",
        header,
        time_rows,
        note=f"median [min-max] of {run.rounds} interleaved rounds after {run.warmup} "
        "warm-up step(s); ratios paired within a round",
    )
    what = "CUDA max_memory_allocated" if gpu else "peak RSS of a process running it alone"
    run.table(
        f"Train step peak memory ({what})",
        header,
        mem_rows,
        note=f"median [min-max] of {mem_rounds} round(s), one fresh process per "
        "configuration and round",
    )
    run.finish()


if __name__ == "__main__":
    main()
