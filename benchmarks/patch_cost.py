"""What patching costs: dpatch.inject time against model construction time.

For resnet50, vit_base_patch16_224 and convnext_base (timm, random init): the median time
to build the model, to find its sites (read-only) and to inject (fresh model each time),
and inject as a share of construction.

    python benchmarks/patch_cost.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import base_parser, environment, print_table, setup, write_json

import dpatch

MODELS = ["resnet50", "vit_base_patch16_224", "convnext_base"]


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args()
    device = setup(args)
    rows = []
    for name in args.models.split(","):
        build, find, inject = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            model = timm.create_model(name).to(device)
            build.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dpatch.find_sites(model)
            find.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dpatch.inject(model, 0.2)
            inject.append(time.perf_counter() - t0)
        b, f, i = (statistics.median(v) * 1e3 for v in (build, find, inject))
        rows.append([name, b, f, i, i / b])
        print(f"  {name}: build {b:.0f} ms, inject {i:.0f} ms", file=sys.stderr)
    env = environment(device)
    title = f"patch cost (median of {args.repeat}): {env['device']} (torch {env['torch']}, timm {env['timm']})"
    header = ["model", "build ms", "find_sites ms", "inject ms", "inject / build"]
    print_table(title, header, rows)
    write_json(
        args.json,
        {
            "benchmark": "patch_cost",
            **env,
            "rows": [dict(zip(header, r, strict=False)) for r in rows],
        },
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
