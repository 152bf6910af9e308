"""Model specs: parsing, building without downloads, listing, and the module layout
(``dpatch.models``)."""

from __future__ import annotations

import json

import pytest
import torchvision
from test_cli import cli

import dpatch
from dpatch import models as zoo
from dpatch.models import ModelSpec, create_model, list_models, parse_spec
from dpatch.models import _native as native


@pytest.mark.parametrize(
    ("text", "source", "name"),
    [
        ("tv:fasterrcnn_resnet50_fpn", "torchvision", "fasterrcnn_resnet50_fpn"),
        ("torchvision:r3d_18", "torchvision", "r3d_18"),
        ("tv:raft_small", "torchvision", "raft_small"),
        ("tv:quantized_resnet18", "torchvision", "quantized_resnet18"),
        ("timm:resnet18", "timm", "resnet18"),
        ("hf-hub:timm/resnet18.a1_in1k", "hf-hub", "timm/resnet18.a1_in1k"),
    ],
)
def test_parse_spec(text: str, source: str, name: str) -> None:
    spec, note = parse_spec(text)
    assert (spec.source, spec.name, note) == (source, name, None)


def test_spec_text_round_trips() -> None:
    for spec in (
        ModelSpec("torchvision", "r3d_18"),
        ModelSpec("transformers", "google/vit-base-patch16-224"),
        ModelSpec("hf-hub", "timm/resnet18.a1_in1k"),
        ModelSpec("timm", "resnet18"),
    ):
        assert spec.text.split(":", 1)[0] in ("tv", "hf", "hf-hub", "timm")
    assert ModelSpec("transformers", "org/name").text == "hf:org/name"


def test_unknown_tv_name_suggests_detection_builders_too() -> None:
    with pytest.raises(dpatch.ModelNotFoundError, match="fasterrcnn_resnet50_fpn"):
        parse_spec("tv:fasterrcnn_resnet50")


def test_detection_model_builds_offline_without_backbone_weights() -> None:
    """tv:NAME never downloads without pretrained (weights_backbone=None): this machine
    and CI have no network, so a download attempt would raise DownloadError."""
    model = create_model("tv:fasterrcnn_mobilenet_v3_large_320_fpn")
    assert type(model).__name__ == "FasterRCNN"
    assert zoo.spec_of(model) == ModelSpec("torchvision", "fasterrcnn_mobilenet_v3_large_320_fpn")


def test_list_shows_every_torchvision_builder() -> None:
    entries = list_models(source="tv")
    assert {e.spec[3:] for e in entries} == set(torchvision.models.list_models())
    tasks = {e.task for e in entries}
    assert {"classification", "detection", "segmentation", "video", "optical_flow"} <= tasks
    native_tv = {e.spec for e in entries if e.native}
    assert {"tv:swin3d_t", "tv:mvit_v2_s", "tv:convnext_tiny"} <= native_tv
    assert "tv:r3d_18" not in native_tv


def test_models_exports_the_native_builders() -> None:
    # _native.py reads rates and builds light; _zoo picks the reader by the model's library
    assert zoo.build_light is native.build_light
    assert zoo.tv_build_kwargs is native.tv_build_kwargs
    assert not hasattr(native, "native_rates")


def test_tv_native_rates_of_a_video_model() -> None:
    """Swin3D's builder fixes stochastic_depth_prob=0.1: rates are scaled from it."""
    model = create_model("tv:swin3d_t")
    rates = zoo.native_rates(model, 0.2)
    assert max(rates.values()) == pytest.approx(0.2) and min(rates.values()) == 0.0
    assert len(rates) == 12


# ------------------------------------------------------------------- inputs of every kind
def test_cli_inspect_video_model_finds_its_blocks() -> None:
    """The probe feeds a video model (B, 3, T, H, W) without --input-shape."""
    code, out, err = cli("inspect", "tv:r3d_18", "--json")
    assert code == 0, err
    assert json.loads(out)["summary"]["sites"] == 8


def test_cli_inspect_detection_model_finds_its_backbone_blocks() -> None:
    """Detection models need targets in training; the probe still finds the backbone's
    blocks without --input-shape."""
    code, out, err = cli("inspect", "tv:fasterrcnn_mobilenet_v3_large_320_fpn", "--json")
    assert code == 0, err
    assert json.loads(out)["summary"]["sites"] == 10
