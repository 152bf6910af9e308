"""Coverage of the zoos: for every torchvision classification model and one model of every
timm family (tests/timm_families.json), how many residual sites dpatch finds, how many are
fused (rewritten forward), how many can skip compute, and what was left out and why.

Models are built with their large tensors on the meta device, so this needs no weights
and little time:

    python benchmarks/zoo_coverage.py [--json out.json]
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from _common import base_parser, environment, print_table, setup, write_json

import dpatch
from dpatch.zoo import build_light

ROOT = Path(__file__).resolve().parents[1]


def entries() -> list[tuple[str, str, Any, tuple[int, ...]]]:
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        size = 299 if name == "inception_v3" else 224
        out.append(
            ("torchvision", name, lambda n=name: torchvision.models.get_model(n), (3, size, size))
        )
    fams = json.loads((ROOT / "tests" / "timm_families.json").read_text())
    for f in fams:
        out.append(
            (
                f"timm/{f['module']}",
                f["model"],
                lambda f=f: timm.create_model(f["model"], **f["kwargs"]),
                tuple(f["input_size"]),
            )
        )
    return out


def main() -> None:
    p = base_parser(__doc__ or "")
    args = p.parse_args()
    device = setup(args)
    warnings.filterwarnings("ignore")
    rows, reasons = [], Counter()
    totals = Counter()
    for source, name, build, size in entries():
        x = torch.empty((2, *size), device="meta")
        model = build_light(build)
        report = dpatch.inject(model, 0.2, skip=True, example_inputs=(x,))
        sites = report.sites
        n, fused, skip = len(sites), sum(s.fused for s in sites), sum(s.skip for s in sites)
        kinds = "/".join(sorted({s.kind for s in sites})) or "-"
        rows.append([source, name, n, kinds, fused, skip, len(report.skipped)])
        for s in report.skipped:
            reasons[s.reason.split(":")[0][:70]] += 1
        group = "torchvision" if source == "torchvision" else "timm"
        totals[f"{group} models"] += 1
        totals[f"{group} models with sites"] += bool(n)
        totals[f"{group} sites"] += n
        totals[f"{group} fused"] += fused
        totals[f"{group} skip"] += skip
    env = environment(device)
    header = ["source", "model", "sites", "kind", "fused", "can skip", "notes"]
    print_table(
        f"zoo coverage: dpatch {env['dpatch']}, torch {env['torch']}, timm {env['timm']}",
        header,
        rows,
    )
    print_table("totals", ["what", "count"], sorted(totals.items()))
    print_table("notes by reason", ["reason", "count"], reasons.most_common())
    write_json(
        args.json,
        {
            "benchmark": "zoo_coverage",
            **env,
            "totals": dict(totals),
            "reasons": dict(reasons),
            "rows": [dict(zip(header, r, strict=True)) for r in rows],
        },
    )


if __name__ == "__main__":
    main()
