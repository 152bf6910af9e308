"""A full training step (forward, backward, optimizer) with and without stochastic depth.

Models: ResNet-50 (SGD, channels_last) and a ViT (AdamW); on CUDA with bf16 autocast at
224 px (ViT-B/16, batch 256 / ResNet-50 batch 256), on CPU reduced (ViT-S/16 and ResNet-50
at 112 px, batch 16, fp32). Configurations, at uniform 0.4 (``--schedules`` adds others,
such as linear 0.2):

- ``none``: the timm model without DropPath (drop_path_rate=0): the baseline;
- ``timm``: timm's own DropPath (create_model(drop_path_rate=r); uniform rates set on it);
- ``dpatch mask``: dpatch.inject on the model without DropPath (fused residual add);
- ``dpatch skip``: dpatch.inject(..., skip=True) (dropped rows not computed);
- ``subset``: the hand-written way to skip dropped rows, for comparison with ``dpatch
  skip``: each block's forward rewritten here to gather a random subset of
  k = max(round(B (1-p)), 1) rows, run the branch on them and ``index_add`` the result back
  scaled by B/k (DINOv2's ``drop_add_residual_stochastic_depth``), same rates as dpatch.

A tiny Llama (transformers' ``LlamaForCausalLM``, random weights, next-token loss on random
ids; CPU: 8 layers, width 256, 128 tokens, batch 8; CUDA: 16 layers, width 1024, 512
tokens, batch 32), at uniform 0.4, each decoder layer dropped as one unit
(``tie="block"``, LayerDrop's and LayerSkip's scheme):

- ``none``: no layer dropout;
- ``dpatch mask``: ``dpatch.inject(model, 0.4, schedule="uniform", tie="block")``;
- ``dpatch skip``: the same with ``skip=True`` (a layer runs on its kept rows only);
- ``layer subset``: torchtune's ``LayerDropout`` written out here: each layer runs on the
  rows a per-sample draw keeps (``out = x.clone(); out[kept] = layer(x[kept])``), the peer
  for skipping whole layers.

Step times: all configurations in one process, interleaved round by round
(``_common.interleave``), ratios to ``none`` paired within a round. Peak memory: each
configuration alone in a fresh process (CUDA: max_memory_allocated; CPU: peak resident set
size, VmHWM, of a process forked from a server that has imported torch, timm and dpatch),
``--memory-rounds`` times, round by round. On CPU two such processes run at once (``--memory-jobs``):
each one's peak is its own, and nothing is timed while they run.

    python benchmarks/train_step.py                    # CPU
    python benchmarks/train_step.py --device cuda      # GPU
"""

from __future__ import annotations

import copy
import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    Case,
    Run,
    Timing,
    event_timer,
    hold_freed_memory_here,
    interleave,
    parser,
    sync,
)

CONFIGS = ["none", "timm", "dpatch mask", "dpatch skip", "subset"]
SCHEDULES = "uniform:0.4"  # the image models' default; --schedules linear:0.2,uniform:0.4
LLAMA_CONFIGS = ["none", "dpatch mask", "dpatch skip", "layer subset"]
LLAMA_SCHEDULES = [("uniform", 0.4)]


def configs_for(model_name: str) -> list[str]:
    return LLAMA_CONFIGS if model_name == "llama" else CONFIGS


def parse_schedules(text: str) -> list[tuple[str, float]]:
    """``"linear:0.2,uniform:0.4"`` -> ``[("linear", 0.2), ("uniform", 0.4)]``."""
    out = []
    for part in text.split(","):
        name, _, rate = part.partition(":")
        try:
            if name not in ("linear", "uniform"):
                raise ValueError
            out.append((name, float(rate)))
        except ValueError:
            raise SystemExit(
                f"error: --schedules takes SCHEDULE:RATE pairs (linear or uniform), "
                f"but got {part!r}"
            ) from None
    return out


def schedules_for(model_name: str, image: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The Llama's schedules, or ``image`` (``--schedules``, parsed) for the image models."""
    return LLAMA_SCHEDULES if model_name == "llama" else image


def model_settings(name: str, gpu: bool, quick: bool = False) -> dict[str, Any]:
    if name == "llama":
        layers, width, length, batch = (16, 1024, 512, 32) if gpu else (8, 256, 128, 8)
        if quick:
            layers, width, length, batch = 4, 64, 32, 4
        return {
            "arch": "llama",
            "label": f"Llama {layers}x{width}",
            "batch": batch,
            "size": length,
            "kwargs": {"layers": layers, "width": width, "length": length},
        }
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
        "batch": 8 if quick else 16,
        "size": size,
        "kwargs": {"img_size": size},
    }


def build(
    arch: str, kwargs: dict[str, Any], config: str, schedule: str, rate: float
) -> torch.nn.Module:
    import timm

    import dpatch

    if arch == "llama":
        return build_llama(config, rate, **kwargs)
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


def build_llama(config: str, rate: float, layers: int, width: int, length: int) -> nn.Module:
    """A random tiny ``LlamaForCausalLM`` with ``config``'s layer dropout at ``rate``."""
    import transformers

    import dpatch

    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(width // 64, 1),
        num_key_value_heads=max(width // 64, 1),
        max_position_embeddings=length,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    if config.startswith("dpatch"):
        dpatch.inject(model, rate, schedule="uniform", tie="block", skip=config == "dpatch skip")
    elif config == "layer subset":
        decoder = model.model
        decoder.layers = nn.ModuleList(SubsetLayer(layer, rate) for layer in decoder.layers)
    return model


class SubsetLayer(nn.Module):
    """torchtune's ``LayerDropout`` around one decoder layer: in training, a per-sample draw
    keeps each row with probability 1 - rate; the layer runs on the kept rows only, the
    dropped rows pass through unchanged (no rescaling, as torchtune's default). Other
    arguments are passed as they are, so they must broadcast over the batch (true here: no
    padding mask, position embeddings of batch 1)."""

    def __init__(self, layer: nn.Module, rate: float) -> None:
        super().__init__()
        self.layer, self.rate = layer, rate

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.training or self.rate == 0:
            return self.layer(hidden_states, *args, **kwargs)
        keep = torch.rand(hidden_states.shape[0], device=hidden_states.device) >= self.rate
        kept = keep.nonzero().flatten()
        out = hidden_states.clone()
        if kept.numel():
            result = self.layer(hidden_states[kept], *args, **kwargs)
            out[kept] = result[0] if isinstance(result, tuple) else result
        return out


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
    if model_name == "llama":
        ids = torch.randint(0, 256, (s["batch"], s["size"] + 1), device=device)
        x, y = ids[:, :-1], ids[:, 1:]
    else:
        x = torch.randn(s["batch"], 3, s["size"], s["size"], device=device)
        y = torch.randint(0, 1000, (s["batch"],), device=device)
    if model_name == "resnet50":
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = torch.nn.CrossEntropyLoss()

    def logits(x: torch.Tensor) -> torch.Tensor:
        if model_name == "llama":
            return model(input_ids=x).logits.flatten(0, 1)
        out: torch.Tensor = model(x)
        return out

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = loss_fn(logits(x), y.flatten() if model_name == "llama" else y)
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
    """Step times of every configuration, interleaved round by round in this process, with
    freed memory held in the heap (page faults from glibc's moving mmap threshold otherwise
    hit some configurations and processes and not others; see ``_common.HELD_HEAP``)."""
    held = hold_freed_memory_here()
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    cases = [
        Case(c, make_step(model_name, c, schedule, rate, device, quick)[0])
        for c in configs_for(model_name)
    ]

    def progress(s: str) -> None:
        print(f"  {model_name} {schedule} {rate} {s}", file=sys.stderr, flush=True)

    timing = interleave(
        cases, rounds=rounds, warmup=warmup, timer=event_timer(device), progress=progress
    )
    return {**timing.as_dict(), "heap_held": held}


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
    p.add_argument("--models", default="resnet50,vit,llama", help="comma list: resnet50,vit,llama")
    p.add_argument(
        "--schedules", default=SCHEDULES,
        help=f"the image models' schedules, comma list of SCHEDULE:RATE (default {SCHEDULES}; "
        "the Llama always runs uniform:0.4)",
    )  # fmt: skip
    p.add_argument("--memory-rounds", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument(
        "--memory-jobs", type=int, default=None,
        help="memory processes at once (default: 2 on CPU, 1 on CUDA: they share the GPU)",
    )  # fmt: skip
    args = p.parse_args()
    image_schedules = parse_schedules(args.schedules)  # a bad value stops here, before any work
    run = Run("train_step", args)
    gpu = run.device.type == "cuda"
    mem_rounds = args.memory_rounds or (1 if args.quick else 2)
    mem_jobs = args.memory_jobs or (1 if gpu else 2)
    threads = torch.get_num_threads()
    # one pair of tables per set of configurations (image models, the Llama)
    rows: dict[tuple[str, ...], tuple[list[list[Any]], list[list[Any]]]] = {}
    for model in args.models.split(","):
        s = model_settings(model, gpu, args.quick)
        configs = configs_for(model)
        time_rows, mem_rows = rows.setdefault(tuple(configs), ([], []))
        for schedule, rate in schedules_for(model, image_schedules):
            key = f"{model} {schedule} {rate}"
            doc = fresh_process(
                measure_time, model, schedule, rate, args.device, threads, args.quick,
                run.rounds, run.warmup,
            )  # fmt: skip
            held = doc.pop("heap_held")
            timing = Timing.from_dict(doc)
            run.record(key, timing)
            unit = "tokens" if model == "llama" else "px"
            label = f"{s['label']} b{s['batch']} {s['size']}{unit}"
            time_rows.append(
                [
                    label,
                    f"{schedule} {rate}",
                    timing.spread("none"),
                    *(timing.ratio(c, "none").ratio_cell() for c in configs[1:]),
                ]
            )
            # memory: each configuration alone in a fresh process, round-robin
            peaks: dict[str, list[float]] = {c: [] for c in configs}
            order = []
            for r in range(mem_rounds):
                turn = configs[r % len(configs) :] + configs[: r % len(configs)]
                with ThreadPoolExecutor(mem_jobs) as jobs:  # each job its own fresh process
                    where = (schedule, rate, args.device, threads, args.quick)
                    done = {
                        c: jobs.submit(fresh_process, measure_memory, model, c, *where)
                        for c in turn
                    }
                for c in turn:
                    peaks[c].append(done[c].result())
                order.append(tuple(turn))
                run.note(
                    f"{key} memory round {r + 1}: "
                    + ", ".join(f"{c} {v[-1]:.3f} GiB" for c, v in peaks.items())
                )
            mem = Timing(tuple(configs), {c: tuple(v) for c, v in peaks.items()}, tuple(order), 0)
            run.record(f"{key} memory", mem, unit="GiB")
            mem_rows.append(
                [
                    label,
                    f"{schedule} {rate}",
                    mem.spread("none").cell("GiB"),
                    *(mem.ratio(c, "none").ratio_cell() for c in configs[1:]),
                ]
            )
    prec = "bf16 autocast" if gpu else "fp32"
    what = "CUDA max_memory_allocated" if gpu else "peak RSS of a process running it alone"
    for configs, (time_rows, mem_rows) in rows.items():
        header = ["model", "schedule", "none", *(f"{c} / none" for c in configs[1:])]
        whole = " (each decoder layer one unit, tie=block)" if "layer subset" in configs else ""
        run.table(
            f"Train step time (forward + backward + optimizer, {prec}){whole}",
            header,
            time_rows,
            note=f"median [min-max] of {run.rounds} interleaved rounds after {run.warmup} "
            "warm-up step(s); ratios paired within a round"
            + ("; freed memory held in the heap" if held else ""),
        )
        run.table(
            f"Train step peak memory ({what}){whole}",
            header,
            mem_rows,
            note=f"median [min-max] of {mem_rounds} round(s), one fresh process per "
            f"configuration and round, {mem_jobs} at a time",
        )
    run.finish()


if __name__ == "__main__":
    main()
