"""The residual op alone: plain ``x + b`` vs timm ``x + DropPath(p)(b)`` vs dpatch ``drop_add``.

Shapes: transformer (B, 197, 768) and conv (B, 256, 56, 56) channels_last; fp32 and bf16;
training mode (the drop is drawn every call), rate 0.2. The three implementations are
timed interleaved, round by round (``_common.interleave``); a sample is the mean of
``--calls`` back-to-back calls; ratios against the plain add are taken within each round.
Forward only by default; ``--backward`` times forward + backward. One torch thread unless
``--threads`` says otherwise: an elementwise op of a millisecond on two OpenMP threads
measures the scheduler whenever anything else runs on a 2-core machine (samples of 8 ms
for a 0.1 ms add), one thread measures the op. On Linux the script runs itself again with
glibc keeping freed memory in the heap (``_common.HELD_HEAP``): under glibc's defaults a
19 MB temporary goes back to the OS when freed and is faulted in again at the next call in
some processes and not others, so timm's fp32 expression (two temporaries) took 5 ms in one
run and 26 ms in the next; ``--system-malloc`` keeps the defaults.

    python benchmarks/residual_op.py                 # CPU, reduced batch (32 / 8)
    python benchmarks/residual_op.py --device cuda   # full batch (256 / 64)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import Case, Run, heap_held, hold_freed_memory, parser, wall_timer

from dpatch import drop_add

IMPLS = ("plain x + b", "timm x + DropPath(b)", "dpatch drop_add")


def main() -> None:
    p = parser(__doc__ or "", rounds=(30, 3), warmup=(5, 1))
    p.set_defaults(threads=1)
    p.add_argument("--rate", type=float, default=0.2)
    p.add_argument("--batch-transformer", type=int, default=None)
    p.add_argument("--batch-conv", type=int, default=None)
    p.add_argument("--calls", type=int, default=None, help="calls per sample (default 10)")
    p.add_argument("--backward", action="store_true")
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's defaults (by default the script runs again with freed memory "
        "held in the heap, so page faults do not decide timm's two-temporary expression)",
    )
    args = p.parse_args()
    if not args.system_malloc:
        hold_freed_memory()
    run = Run("residual_op", args)
    device = run.device
    gpu = device.type == "cuda"
    bt = args.batch_transformer or (256 if gpu else 4 if args.quick else 32)
    bc = args.batch_conv or (64 if gpu else 2 if args.quick else 8)
    calls = args.calls or (2 if args.quick else 10)

    from timm.layers import DropPath as TimmDropPath

    timm_dp = TimmDropPath(args.rate).train()
    rate = args.rate
    cases = [
        ("transformer", (bt, 197, 768), torch.contiguous_format),
        ("conv", (bc, 256, 56, 56), torch.channels_last),
    ]
    rows: list[list[Any]] = []
    for shape_name, shape, fmt in cases:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            b = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            if args.backward:
                x.requires_grad_(True)
                b.requires_grad_(True)
            grad = torch.ones_like(x)

            def op(fn: Callable[[], torch.Tensor], grad: torch.Tensor = grad) -> Callable[[], None]:
                def call() -> None:
                    out = fn()
                    if args.backward:
                        out.backward(grad)

                return call

            fns = [
                lambda x=x, b=b: x + b,
                lambda x=x, b=b: x + timm_dp(b),
                lambda x=x, b=b: drop_add(x, b, rate, True),
            ]
            size = "x".join(map(str, shape)) + (
                " channels_last" if fmt == torch.channels_last else ""
            )
            dt = (
                str(dtype)
                .removeprefix("torch.")
                .replace("float32", "fp32")
                .replace("bfloat16", "bf16")
            )
            timing = run.interleave(
                f"{shape_name} {size} {dt}",
                [Case(name, op(fn)) for name, fn in zip(IMPLS, fns, strict=True)],
                timer=wall_timer(device, calls),
            )
            plain, timm_name, dpatch_name = IMPLS
            rows.append(
                [
                    size,
                    dt,
                    timing.spread(plain),
                    timing.spread(timm_name),
                    timing.spread(dpatch_name),
                    timing.ratio(timm_name, plain).ratio_cell(),
                    timing.ratio(dpatch_name, plain).ratio_cell(),
                ]
            )
            del x, b, grad
    mode = "forward + backward" if args.backward else "forward"
    run.table(
        f"Residual op, training mode, rate {rate}, {mode}",
        [
            "shape",
            "dtype",
            "plain `x + b`",
            "timm `x + DropPath(b)`",
            "dpatch `drop_add`",
            "timm / plain",
            "drop_add / plain",
        ],
        rows,
        note=f"median [min-max] of {run.rounds} interleaved rounds, a sample = mean of "
        f"{calls} calls; ratios paired within a round; "
        + ("freed memory held in the heap" if heap_held() else "glibc's default malloc"),
    )
    run.finish()


if __name__ == "__main__":
    main()
