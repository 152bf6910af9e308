"""The manifest format on its own: build, parse, read a report back (no model built)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import PlainRes, example

import dpatch
from dpatch.errors import ManifestError
from dpatch.files._manifest import FORMAT, build_manifest, parse_manifest, report_from_manifest
from dpatch.models import ModelSpec


def _report() -> dpatch.PatchReport:
    torch.manual_seed(0)
    model = torch.nn.Sequential(PlainRes(), PlainRes(), PlainRes())
    return dpatch.inject(model, 0.2, schedule="cosine", per="branch", example_inputs=(example(),))


def test_round_trip_keeps_sites_schedule_and_exact_rates() -> None:
    report = _report()
    manifest = build_manifest(report, ModelSpec("python", "m:f", {"c": 8}))
    assert manifest["format"] == FORMAT and manifest["model"] == {"spec": "m:f", "kwargs": {"c": 8}}
    parsed = parse_manifest(json.dumps(manifest), "x.safetensors")
    back = report_from_manifest(parsed)
    assert back.sites == report.sites  # every field, every bit of every rate
    assert (back.schedule, back.per, back.max_rate) == ("cosine", "branch", 0.2)
    assert back.rates == report.rates and back.expected_depth == report.expected_depth
    assert set(manifest["versions"]) >= {"dpatch", "torch", "timm", "torchvision"}


def test_a_manifest_without_a_schedule_reads_as_current() -> None:
    report = report_from_manifest({"format": FORMAT, "sites": []})
    assert report.schedule == "current" and report.sites == () and report.rates == ()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "dpatch/99", "sites": []}), "'dpatch/99'"),
        (json.dumps(["a list"]), "'list'"),
    ],
)
def test_bad_manifests_are_one_line_errors(raw: str, needle: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw, "f.safetensors")
    assert needle in str(info.value) and "f.safetensors" in str(info.value)


def test_malformed_sites_are_a_manifest_error() -> None:
    with pytest.raises(ManifestError, match="malformed"):
        report_from_manifest({"format": FORMAT, "sites": [{"path": "a"}]})
