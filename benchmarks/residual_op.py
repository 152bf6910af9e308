"""The residual op alone: plain ``x + b`` vs timm ``x + DropPath(p)(b)`` vs dpatch ``drop_add``.

Shapes: transformer (B, 197, 768) and conv (B, 256, 56, 56) channels_last; fp32 and bf16;
training mode (the drop is drawn every call). Ratios are against the plain add measured in
the same run. Forward only by default; ``--backward`` times forward + backward.

    python benchmarks/residual_op.py                 # CPU, reduced batch
    python benchmarks/residual_op.py --device cuda   # full batch (256 / 64)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import base_parser, environment, print_table, setup, time_ms, write_json

from dpatch import drop_add


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--rate", type=float, default=0.2)
    p.add_argument("--batch-transformer", type=int, default=None)
    p.add_argument("--batch-conv", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--backward", action="store_true")
    args = p.parse_args()
    device = setup(args)
    gpu = device.type == "cuda"
    bt = args.batch_transformer or (256 if gpu else 32)
    bc = args.batch_conv or (64 if gpu else 8)
    repeat = args.repeat or (100 if gpu else 30)

    from timm.layers import DropPath as TimmDropPath

    timm_dp = TimmDropPath(args.rate).train()
    rate = args.rate

    cases = [
        ("transformer", (bt, 197, 768), torch.contiguous_format),
        ("conv", (bc, 256, 56, 56), torch.channels_last),
    ]
    rows = []
    for shape_name, shape, fmt in cases:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            b = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            if args.backward:
                x.requires_grad_(True)
                b.requires_grad_(True)
            grad = torch.ones_like(x)

            def run(fn, grad=grad):  # type: ignore[no-untyped-def]
                def call() -> None:
                    out = fn()
                    if args.backward:
                        out.backward(grad)

                return call

            impls = {
                "plain x + b": run(lambda x=x, b=b: x + b),
                "timm x + DropPath(b)": run(lambda x=x, b=b: x + timm_dp(b)),
                "dpatch drop_add": run(lambda x=x, b=b: drop_add(x, b, rate, True)),
            }
            times = {k: time_ms(f, device, warmup=5, repeat=repeat) for k, f in impls.items()}
            plain = times["plain x + b"]
            nbytes = 3 * x.numel() * x.element_size()  # read x, read b, write out
            for k, ms in times.items():
                rows.append(
                    [
                        shape_name,
                        "x".join(map(str, shape)),
                        str(dtype).replace("torch.", ""),
                        k,
                        ms,
                        nbytes / ms / 1e9,
                        ms / plain,
                    ]
                )
    env = environment(device)
    mode = "forward+backward" if args.backward else "forward"
    title = f"residual op, training mode, rate {rate}, {mode}: {env['device']} (torch {env['torch']}, timm {env['timm']})"
    header = ["shape", "size", "dtype", "implementation", "ms", "TB/s (3 passes)", "vs plain"]
    print_table(title, header, rows)
    write_json(
        args.json,
        {
            "benchmark": "residual_op",
            "mode": mode,
            "rate": rate,
            **env,
            "rows": [dict(zip(header, r, strict=False)) for r in rows],
        },
    )


if __name__ == "__main__":
    main()
