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
  skip (``dpatch.inject(model, 0.4, schedule="uniform"[, skip=True])``) / the hand-written
  subset baseline of ``train_step.py`` (gather kept rows, branch, ``index_add``).
- train step, timm ResNet-50, batch 256, 224 px, channels_last, bfloat16 autocast, SGD:
  none / timm ``drop_path_rate=0.2`` / dpatch masking and skip / subset at linear 0.2.

Every timing goes through ``_common.interleave``: the configurations of one case
interleaved round by round (so clock drift hits them alike), the median with its
[min-max] over rounds, ratios paired within a round. Step times: CUDA events around each
step. Peak memory: each configuration's own parameters,
optimizer state and inputs plus the most its step allocates on top
(``torch.cuda.max_memory_allocated``), which is what it would peak at alone.

A failing measurement is reported in its row (and on stderr) and the run goes on.

    python benchmarks/gpu_suite.py --json gpu_suite.json      # one H100/H200 (designed for < 6 min; not yet run)
    python benchmarks/gpu_suite.py --quick                    # GPU smoke run
    python benchmarks/gpu_suite.py --device cpu --quick       # CPU smoke run, tiny shapes
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    Case,
    Run,
    Spread,
    environ,
    event_timer,
    host_us,
    number,
    parser,
    queued_timer,
    sync,
)
from train_step import build

from dpatch import drop_add

OP_RATE = 0.2
CONFIGS = ("none", "timm", "dpatch mask", "dpatch skip", "subset")
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
    op_rounds: int
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
            op_rounds=2,
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
def kernels_setting(value: str) -> AbstractContextManager[None]:
    """``DPATCH_KERNELS=value`` for the duration (dpatch reads it on every call)."""
    return environ("DPATCH_KERNELS", value)


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


def _failed(row: dict[str, Any], note: str) -> dict[str, Any]:
    row.update(ms=None, tbps=math.nan, ratio=None, host_us=math.nan, note=note)
    return row


# --------------------------------------------------------------------------- op
def op_rows(plan: Plan, run: Run) -> list[dict[str, Any]]:
    from timm.layers import DropPath as TimmDropPath

    device = run.device
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
            case = f"{label} {'x'.join(map(str, shape))}" + (" CL" if fmt == CL else "")
            dt = str(dtype).removeprefix("torch.")
            by_name: dict[str, dict[str, Any]] = {}
            cases: list[Case] = []
            host: dict[str, float] = {}
            for name, setting, fn in impls:
                row: dict[str, Any] = {"section": "op", "case": case, "dtype": dt, "config": name}
                by_name[name] = row
                try:  # the first call compiles what needs compiling; then host queueing time
                    with kernels_setting(setting):
                        t0 = time.perf_counter()
                        fn()
                        sync(device)
                        first_s = time.perf_counter() - t0
                        if name == "drop_add (Triton)":
                            used = ops_called(fn)
                            if "dpatch.drop_add.default" not in used:
                                raise RuntimeError("drop_add did not run the Triton kernel")
                        host[name] = host_us(fn, device, plan.op_calls)
                    row["note"] = f"first call {first_s:.1f} s" if first_s > 2.0 else ""
                    cases.append(Case(name, fn, context=lambda v=setting: kernels_setting(v)))
                except Exception as exc:  # reported in the row and on stderr; the run goes on
                    _failed(row, short(exc))
                    run.note(f"op {case} {dt} {name}: {row['note']}")
            if cases:
                # hold the stream long enough for the slowest host to queue every call
                hold_ms = 2.0 * max(host.values()) * 1e-3 * plan.op_calls + 1.0
                timing = run.interleave(
                    f"op {case} {dt}",
                    cases,
                    rounds=plan.op_rounds,
                    warmup=plan.op_warmup,
                    timer=queued_timer(device, plan.op_calls, hold_ms),
                    keep_going=True,
                )
                for name, row in by_name.items():
                    if name not in timing.names:
                        continue
                    if name in timing.errors:
                        _failed(row, f"error: {timing.errors[name]}")
                        continue
                    ms = timing.spread(name)
                    ratio = timing.ratio(name, "plain add") if "plain add" in timing.names else None
                    row.update(ms=ms, tbps=nbytes / ms.median / 1e9, ratio=ratio)
                    row["host_us"] = host[name]
            rows += by_name.values()
            del x, b, compiled
            release(device)
    torch._dynamo.reset()
    return rows


# --------------------------------------------------------------------------- train step
@dataclass
class _Run:
    step: Callable[[], None]
    static_bytes: int
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

    return _Run(step, _tensor_bytes(static()), 0)


@contextmanager
def _peak_probe(r: _Run, device: torch.device) -> Iterator[None]:
    """Keeps in ``r.extra_peak`` the most the step allocates on top of what is resident."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield
    r.extra_peak = max(r.extra_peak, torch.cuda.max_memory_allocated(device) - before)


def train_rows(plan: Plan, m: Model, run: Run) -> list[dict[str, Any]]:
    device = run.device
    gpu = device.type == "cuda"
    runs: dict[str, _Run] = {}
    rows: dict[str, dict[str, Any]] = {}
    case = f"{m.label} b{m.batch} {m.size}px" + (" CL" if m.channels_last else "")
    for config in CONFIGS:
        label = f"{config} ({m.schedule} {m.rate})" if config != "none" else config
        rows[config] = {
            "section": "train",
            "case": case,
            "dtype": "bf16 autocast" if gpu else "fp32",
            "config": label,
            "note": "",
        }
        try:
            t0 = time.perf_counter()
            runs[config] = make_run(m, config, device)
            run.note(f"{case} {config}: built in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:
            rows[config]["note"] = short(exc)
            run.note(f"{case} {config}: {rows[config]['note']}")
    cases = [Case(c, r.step, context=lambda r=r: _peak_probe(r, device)) for c, r in runs.items()]
    timing = None
    if cases:
        timing = run.interleave(
            f"train {case}",
            cases,
            rounds=plan.train_rounds,
            warmup=plan.train_warmup,
            timer=event_timer(device),
            keep_going=True,
        )
    base = runs.get("none")
    base_gib = (base.static_bytes + base.extra_peak) / 2**30 if base and gpu else math.nan
    out = []
    for config in CONFIGS:
        row = rows[config]
        r = runs.get(config)
        if timing is not None and r is not None and config not in timing.errors:
            gib = (r.static_bytes + r.extra_peak) / 2**30 if gpu else math.nan
            ratio = timing.ratio(config, "none") if "none" in runs else None
            row.update(ms=timing.spread(config), ratio=ratio, peak_gib=gib)
            row["mem_ratio"] = gib / base_gib
        elif timing is not None and config in timing.errors:
            row["note"] = f"error: {timing.errors[config]}"
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


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Spread):
        return value.ratio_cell() if key == "ratio" else value.cell()
    if isinstance(value, float):
        return number(value)
    return str(value)


def main() -> None:
    p = parser(__doc__ or "", device="cuda")
    p.add_argument("--skip-train", action="store_true", help="op section only")
    p.add_argument("--skip-op", action="store_true", help="train-step section only")
    args = p.parse_args()
    run = Run("gpu_suite", args)
    device = run.device
    plan = plan_for(device, args.quick)
    rows: list[dict[str, Any]] = []
    if not args.skip_op:
        t0 = time.perf_counter()
        rows += op_rows(plan, run)
        run.note(f"op section: {time.perf_counter() - t0:.0f} s")
    if not args.skip_train:
        for m in plan.models:
            t0 = time.perf_counter()
            rows += train_rows(plan, m, run)
            run.note(f"{m.label} train steps: {time.perf_counter() - t0:.0f} s")
    title = f"dpatch GPU suite{' (quick)' if args.quick else ''}: {run.env['device']}"
    if device.type == "cuda":
        title += f", Triton {run.env['triton']}, CUDA {run.env['cuda']}"
    note = "median [min-max] of interleaved rounds; ratios paired within a round"
    if device.type != "cuda":
        note += (
            "; CPU smoke run: the Triton rows run in Triton's interpreter, no figure here "
            "is a measurement"
        )
    run.table(title, HEADER, [[_cell(k, r.get(k)) for k in KEYS] for r in rows], note=note)
    run.extra["op_rate"] = OP_RATE
    run.finish()


if __name__ == "__main__":
    main()
