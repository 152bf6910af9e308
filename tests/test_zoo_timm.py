"""One model of every timm family (98 modules): invariants, native rates, linear rule.

``timm_families.json`` lists, per timm model module, its cheapest model, the input size it
runs at, whether the family takes ``drop_path_rate`` and the per-block rule timm applies
(read off the rates timm builds: ``linear`` = r*i/(N-1) over blocks in forward order).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from helpers import check_invariants, split_families

from dpatch import find_sites, inject
from dpatch.analysis import is_slot_module, probe, slot_settings
from dpatch.models import ModelSpec, build_light, set_model_spec

#: The families the installed timm has; the others are named by
#: ``test_families_the_installed_timm_lacks``.
FAMILIES, MISSING = split_families(
    json.loads((Path(__file__).parent / "timm_families.json").read_text()),
    lambda f: timm.is_model(f["model"]),
)
IDS = [f["module"] for f in FAMILIES]
NATIVE = [f for f in FAMILIES if f["drop_path_rate"]]
# HRNet takes no drop_path_rate, but its blocks are timm ResNet blocks with a
# ``drop_path = None`` slot, so their sites are native slots found through the graph.
NONE_SLOTS = {"hrnet"}

# Families whose timm rule is r*i/(N-1) but over a different set of N "blocks" than the
# residual blocks dpatch counts: there, only schedule='native' reproduces timm.
LINEAR_ELSEWHERE = {
    "hgnet": "timm counts the first block of each stage, which has no residual",
    "rexnet": "timm counts blocks without a residual (stride or width change)",
    "xception_aligned": "timm counts the last block, which has no residual",
    "nextvit": "timm splits a block's rate 0.75/0.25 between its two attention branches",
}
LINEAR = [f for f in NATIVE if f["rate_rule"] == "linear" and f["module"] not in LINEAR_ELSEWHERE]


def meta_input(fam: dict[str, Any]) -> torch.Tensor:
    return torch.empty((2, *fam["input_size"]), device="meta")


def light_model(fam: dict[str, Any], **extra: Any) -> torch.nn.Module:
    kwargs = {**fam["kwargs"], **extra}
    model = build_light(lambda: timm.create_model(fam["model"], **kwargs))
    set_model_spec(model, ModelSpec("timm", fam["model"], dict(fam["kwargs"])))
    return model


def called_slot_rates(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Rates of the slots a forward actually calls (hooks on a meta-device pass)."""
    seen = probe(model, (x,)).order
    return {
        name: slot_settings(m).rate
        for name, m in model.named_modules()
        if id(m) in seen and is_slot_module(m, name.rsplit(".", 1)[-1])
    }


def test_families_the_installed_timm_lacks() -> None:
    if MISSING:
        pytest.skip(
            f"timm {timm.__version__} lacks {len(MISSING)} families, left out of the sweeps: "
            + ", ".join(f"{f['module']} ({f['model']})" for f in MISSING)
        )
    assert all(timm.is_model(f["model"]) for f in FAMILIES)


@pytest.mark.zoo
@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_invariants_and_site_kinds(fam: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = timm.create_model(fam["model"], **fam["kwargs"])
    x = torch.randn(2, *fam["input_size"])
    problems = list(check_invariants(model, x, lambda m: inject(m, 0.2, example_inputs=(x,))))
    assert problems == []
    sites = find_sites(model, (x,))
    assert any(s.residual for s in sites) == fam["residual"]
    kinds = {s.kind for s in sites}
    if fam["drop_path_rate"] or fam["module"] in NONE_SLOTS:
        assert kinds <= {"native"}
    else:
        assert kinds <= {"graph"}


@pytest.mark.zoo
@pytest.mark.parametrize("fam", NATIVE, ids=[f["module"] for f in NATIVE])
def test_native_schedule_reproduces_timm(fam: dict[str, Any]) -> None:
    """inject(schedule='native', 0.3) == timm.create_model(..., drop_path_rate=0.3)."""
    x = meta_input(fam)
    model = light_model(fam)
    report = inject(model, 0.3, schedule="native", example_inputs=(x,))
    timm_rates = called_slot_rates(light_model(fam, drop_path_rate=0.3), x)
    mine = {s.origin: s.rate for s in report.sites}
    for s in report.sites:
        assert s.rate == pytest.approx(timm_rates.get(s.origin, 0.0), abs=1e-6), s.name
    # Every slot timm gives a rate is a site, those on no residual addition included
    # (MobileViT and VoVNet drop a block's whole output, RDNet concatenated features).
    missing = {k for k, r in timm_rates.items() if r > 0 and k not in mine}
    assert missing == set()


@pytest.mark.zoo
@pytest.mark.parametrize("fam", LINEAR, ids=[f["module"] for f in LINEAR])
def test_linear_schedule_matches_timm_rule(fam: dict[str, Any]) -> None:
    x = meta_input(fam)
    native = inject(light_model(fam), 0.3, schedule="native", example_inputs=(x,))
    linear = inject(light_model(fam), 0.3, schedule="linear", example_inputs=(x,))
    assert [s.name for s in linear.sites] == [s.name for s in native.sites]
    assert [s.rate for s in linear.sites] == pytest.approx([s.rate for s in native.sites], abs=1e-6)
