"""What patching costs: dpatch.inject time against model construction time.

For resnet50, vit_base_patch16_224 and convnext_base (timm, random init), interleaved
round by round (``_common.interleave``): building the model (``timm.create_model``, the
baseline), finding its sites (``dpatch.find_sites``, read-only) and injecting
(``dpatch.inject(model, 0.2)``); the last two on a model built untimed just before, a
fresh one every time. Ratios to the build are paired within a round.

    python benchmarks/patch_cost.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import Case, Run, parser, wall_timer

import dpatch

MODELS = ["resnet50", "vit_base_patch16_224", "convnext_base"]


def main() -> None:
    p = parser(__doc__ or "", rounds=(5, 2), warmup=(1, 0))
    p.add_argument("--models", default=None, help=f"comma list (default {','.join(MODELS)})")
    args = p.parse_args()
    run = Run("patch_cost", args)
    device = run.device
    names = args.models.split(",") if args.models else MODELS[:1] if args.quick else MODELS
    rows: list[list[Any]] = []
    for name in names:

        def build(name: str = name) -> torch.nn.Module:
            return timm.create_model(name).to(device)

        timing = run.interleave(
            name,
            [
                Case("build", build),
                Case("find_sites", dpatch.find_sites, setup=build),
                Case("inject", lambda m: dpatch.inject(m, 0.2), setup=build),
            ],
            timer=wall_timer(device),
        )
        rows.append(
            [
                name,
                timing.spread("build"),
                timing.spread("find_sites"),
                timing.spread("inject"),
                timing.ratio("find_sites", "build").ratio_cell(),
                timing.ratio("inject", "build").ratio_cell(),
            ]
        )
    run.table(
        "What patching costs (timm, random init)",
        ["model", "build", "find_sites", "inject", "find_sites / build", "inject / build"],
        rows,
        note=f"median [min-max] of {run.rounds} interleaved rounds, a fresh model each "
        "time; ratios paired within a round",
    )
    run.finish()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
