"""One GPU run: the residual op and two training steps, with and without stochastic depth.

Everything is measured in one process, side by side, and printed as one table:

- op: ``x + b`` (plain add), dpatch ``drop_add`` through its Triton kernel and through
  ``torch.addcmul`` (``DPATCH_KERNELS=0``), timm ``x + DropPath(0.2)(b)`` eager and under
  ``torch.compile``; training mode, rate 0.2, forward; ViT-B tokens (256, 197, 768) and the
  four ResNet-50 stage outputs (256, C, H, W) in channels_last; float32 and bfloat16.
  TB/s counts the bytes of the plain add (read x, read b, write out) for every
  implementation; device time of back-to-back calls (CUDA events, the stream held until
  the host has queued them), median of rounds; "host us" is what the host spends queueing
  one call.
- train step (forward, backward, optimizer), timm ViT-B/16, batch 256, 224 px, bfloat16
  autocast, fused AdamW: none / timm DropPath at uniform 0.4 / dpatch masking / dpatch
  skip (``dpatch.inject(model, 0.4, schedule="uniform"[, skip=True])``).
- train step, timm ResNet-50, batch 256, 224 px, channels_last, bfloat16 autocast, SGD:
  none / timm ``drop_path_rate=0.2`` / dpatch masking and skip at linear 0.2.

Step times: CUDA events around each step, configurations interleaved round by round (so
clock drift hits them alike), median. Peak memory: each configuration's own parameters,
optimizer state and inputs plus the most its step allocates on top
(``torch.cuda.max_memory_allocated``), which is what it would peak at alone.

A failing measurement is reported in its row (and on stderr) and the run goes on.

    python benchmarks/gpu_suite.py --json gpu_suite.json      # one H100/H200, < 6 min
    python benchmarks/gpu_suite.py --quick                    # GPU smoke run
    python benchmarks/gpu_suite.py --device cpu --quick       # CPU smoke run, tiny shapes
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    base_parser,
    device_time_ms,
    event_time_ms,
    print_table,
    setup,
    sync,
    versions,
    write_json,
)
from train_step import build

from dpatch import drop_add

OP_RATE = 0.2
CONFIGS = ("none", "timm", "dpatch mask", "dpatch skip")
CL = torch.channels_last
CONTIG = torch.contiguous_format


@dataclass(frozen=True)
class Model:
    label: str
    arch: str
    kwargs: dict[str, Any]
    batch: int
    size: int
    schedule: str
    rate: float
    channels_last: bool
    optimizer: str


@dataclass(frozen=True)
class Plan:
    op_shapes: tuple[tuple[str, tuple[int, ...], torch.memory_format], ...]
    dtypes: tuple[torch.dtype, ...]
    op_warmup: int
    op_repeat: int
    op_calls: int
    models: tuple[Model, ...]
    train_warmup: int
    train_rounds: int


def _vit(batch: int, size: int, arch: str = "vit_base_patch16_224") -> Model:
    kwargs = {} if size == 224 else {"img_size": size}
    label = "ViT-B/16" if arch == "vit_base_patch16_224" else arch
    return Model(label, arch, kwargs, batch, size, "uniform", 0.4, False, "adamw")


def _resnet(batch: int, size: int) -> Model:
    return Model("ResNet-50", "resnet50", {}, batch, size, "linear", 0.2, True, "sgd")


def plan_for(device: torch.device, quick: bool) -> Plan:
    dtypes = (torch.float32, torch.bfloat16)
    if device.type != "cuda":  # smoke run: every code path, tiny shapes
        return Plan(
            op_shapes=(("ViT tokens", (4, 197, 96), CONTIG), ("R50 stage", (4, 64, 14, 14), CL)),
            dtypes=dtypes,
            op_warmup=1,
            op_repeat=2,
            op_calls=1,
            # ViT-Ti runs the same code as ViT-B (timm's VisionTransformer), at a CPU's pace
            models=(_vit(2, 32, "vit_tiny_patch16_224"), _resnet(2, 32)),
            train_warmup=1,
            train_rounds=2,
        )
    shapes = (
        ("ViT-B tokens", (256, 197, 768), CONTIG),
        ("R50 stage 1", (256, 256, 56, 56), CL),
        ("R50 stage 2", (256, 512, 28, 28), CL),
        ("R50 stage 3", (256, 1024, 14, 14), CL),
        ("R50 stage 4", (256, 2048, 7, 7), CL),
    )
    if quick:
        return Plan(shapes[::4], dtypes, 2, 3, 3, (_vit(256, 224), _resnet(256, 224)), 2, 3)
    return Plan(shapes, dtypes, 5, 15, 10, (_vit(256, 224), _resnet(256, 224)), 5, 20)


# --------------------------------------------------------------------------- helpers
@contextmanager
def kernels_setting(value: str) -> Iterator[None]:
    """``DPATCH_KERNELS=value`` for the duration (dpatch reads it on every call)."""
    old = os.environ.get("DPATCH_KERNELS")
    os.environ["DPATCH_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["DPATCH_KERNELS"]
        else:
            os.environ["DPATCH_KERNELS"] = old


class _OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def ops_called(fn: Callable[[], Any]) -> set[str]:
    with _OpNames() as mode:
        fn()
    return mode.names


def short(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- op
def op_rows(plan: Plan, device: torch.device) -> list[dict[str, Any]]:
    from timm.layers import DropPath as TimmDropPath

    timm_dp = TimmDropPath(OP_RATE).train()

    def timm_expr(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x + timm_dp(b)

    # On CPU the kernel runs in Triton's interpreter: the smoke run checks the plumbing.
    triton_setting = "1" if device.type == "cuda" else "interpret"
    rows: list[dict[str, Any]] = []
    for label, shape, fmt in plan.op_shapes:
        for dtype in plan.dtypes:
            torch.manual_seed(0)
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            b = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            nbytes = 3 * x.numel() * x.element_size()
            torch._dynamo.reset()
            compiled = torch.compile(timm_expr, dynamic=False)
            impls: list[tuple[str, str, Callable[[], Any]]] = [
                ("plain add", "1", lambda x=x, b=b: x + b),
                (
                    "drop_add (Triton)",
                    triton_setting,
                    lambda x=x, b=b: drop_add(x, b, OP_RATE, True),
                ),
                ("drop_add (addcmul)", "0", lambda x=x, b=b: drop_add(x, b, OP_RATE, True)),
                ("timm x + DropPath(b)", "1", lambda x=x, b=b: timm_expr(x, b)),
                ("timm compiled", "1", lambda x=x, b=b, c=compiled: c(x, b)),
            ]
            plain = math.nan
            for name, setting, fn in impls:
                row: dict[str, Any] = {
                    "section": "op",
                    "case": f"{label} {'x'.join(map(str, shape))}" + (" CL" if fmt == CL else ""),
                    "dtype": str(dtype).removeprefix("torch."),
                    "config": name,
                }
                try:
                    with kernels_setting(setting):
                        t0 = time.perf_counter()
                        fn()  # compiles what needs compiling
                        sync(device)
                        first_s = time.perf_counter() - t0
                        if name == "drop_add (Triton)":
                            used = ops_called(fn)
                            if "dpatch.drop_add.default" not in used:
                                raise RuntimeError("drop_add did not run the Triton kernel")
                        ms, host_us = device_time_ms(
                            fn, device, plan.op_warmup, plan.op_repeat, plan.op_calls
                        )
                    if name == "plain add":
                        plain = ms
                    row.update(
                        ms=ms, tbps=nbytes / ms / 1e9, ratio=ms / plain, host_us=host_us, note=""
                    )
                    if first_s > 2.0:
                        row["note"] = f"first call {first_s:.1f} s"
                except Exception as exc:  # reported in the row and on stderr; the run goes on
                    row.update(ms=math.nan, tbps=math.nan, ratio=math.nan, host_us=math.nan)
                    row["note"] = short(exc)
                print(
                    f"  op {row['case']} {row['dtype']} {name}: {row['ms']:.4f} ms {row['note']}",
                    file=sys.stderr,
                )
                rows.append(row)
            del x, b, compiled
            release(device)
    torch._dynamo.reset()
    return rows


# --------------------------------------------------------------------------- train step
@dataclass
class _Run:
    step: Callable[[], None]
    static_bytes: int
    times: list[float]
    extra_peak: int


def _tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def make_run(m: Model, config: str, device: torch.device) -> _Run:
    torch.manual_seed(0)
    model = build(m.arch, m.kwargs, config, m.schedule, m.rate).to(device).train()
    gpu = device.type == "cuda"
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt: torch.optim.Optimizer
    if m.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
    x = torch.randn(m.batch, 3, m.size, m.size, device=device)
    if m.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (m.batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on

    def static() -> Iterator[torch.Tensor]:
        yield from model.parameters()
        yield from model.buffers()
        for state in opt.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        yield from (x, y)

    return _Run(step, _tensor_bytes(static()), [], 0)


def train_rows(plan: Plan, m: Model, device: torch.device) -> list[dict[str, Any]]:
    gpu = device.type == "cuda"
    runs: dict[str, _Run] = {}
    rows: dict[str, dict[str, Any]] = {}
    case = f"{m.label} b{m.batch} {m.size}px" + (" CL" if m.channels_last else "")
    for config in CONFIGS:
        rows[config] = {
            "section": "train",
            "case": case,
            "dtype": "bf16 autocast" if gpu else "fp32",
        }
        rows[config]["config"] = f"{config} ({m.schedule} {m.rate})" if config != "none" else config
        try:
            t0 = time.perf_counter()
            runs[config] = make_run(m, config, device)
            print(f"  {case} {config}: built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        except Exception as exc:
            rows[config]["note"] = short(exc)
            print(f"  {case} {config}: {rows[config]['note']}", file=sys.stderr)
    for run in runs.values():
        for _ in range(plan.train_warmup):
            run.step()
    sync(device)
    for _ in range(plan.train_rounds):
        for config, run in list(runs.items()):
            try:
                if gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                run.times.append(event_time_ms(run.step, device))
                if gpu:
                    extra = torch.cuda.max_memory_allocated(device) - before
                    run.extra_peak = max(run.extra_peak, extra)
            except Exception as exc:
                rows[config]["note"] = short(exc)
                print(f"  {case} {config}: {rows[config]['note']}", file=sys.stderr)
                del runs[config]
    base = runs.get("none")
    base_ms = statistics.median(base.times) if base and base.times else math.nan
    base_gib = (base.static_bytes + base.extra_peak) / 2**30 if base and gpu else math.nan
    out = []
    for config in CONFIGS:
        row = rows[config]
        run = runs.get(config)
        if run is not None and run.times:
            ms = statistics.median(run.times)
            gib = (run.static_bytes + run.extra_peak) / 2**30 if gpu else math.nan
            row.update(ms=ms, ratio=ms / base_ms, peak_gib=gib, mem_ratio=gib / base_gib)
            row.setdefault("note", "")
        else:
            row.update(ms=math.nan, ratio=math.nan, peak_gib=math.nan, mem_ratio=math.nan)
        out.append(row)
    del runs
    release(device)
    return out


# --------------------------------------------------------------------------- main
HEADER = [
    "section",
    "case",
    "dtype",
    "config",
    "ms",
    "TB/s",
    "vs plain/none",
    "host us",
    "peak GiB",
    "mem vs none",
    "note",
]
KEYS = [
    "section",
    "case",
    "dtype",
    "config",
    "ms",
    "tbps",
    "ratio",
    "host_us",
    "peak_gib",
    "mem_ratio",
    "note",
]


def _cell(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, float) and value < 0.1:
        return f"{value:.4f}"
    return value


def _json(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main() -> None:
    p = base_parser(__doc__ or "")
    p.set_defaults(device="cuda")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer shapes and rounds")
    p.add_argument("--skip-train", action="store_true", help="op section only")
    p.add_argument("--skip-op", action="store_true", help="train-step section only")
    args = p.parse_args()
    device = setup(args)
    plan = plan_for(device, args.quick)
    env = versions(device)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if not args.skip_op:
        rows += op_rows(plan, device)
        print(f"op section: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not args.skip_train:
        for m in plan.models:
            t0 = time.perf_counter()
            rows += train_rows(plan, m, device)
            print(f"{m.label} train steps: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    elapsed = time.perf_counter() - start
    title = (
        f"dpatch GPU suite{' (quick)' if args.quick else ''}: {env['device']} | torch "
        f"{env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | timm {env['timm']} "
        f"| dpatch {env['dpatch']} | {elapsed:.0f} s"
    )
    if device.type != "cuda":
        title += "\n(CPU smoke run: the Triton rows run in Triton's interpreter; no figure here is a measurement)"
    print_table(title, HEADER, [[_cell(r.get(k, math.nan)) for k in KEYS] for r in rows])
    write_json(
        args.json,
        {
            "benchmark": "gpu_suite",
            "quick": args.quick,
            "op_rate": OP_RATE,
            "elapsed_s": elapsed,
            **env,
            "rows": [{k: _json(r.get(k)) for k in KEYS} for r in rows],
        },
    )


if __name__ == "__main__":
    main()
