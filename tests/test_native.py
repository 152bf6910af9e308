"""The native readers on their own: whose model it is, its slots' rates, light builds."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torchvision

import dpatch
from dpatch.errors import InvalidValueError
from dpatch.models import _native as native


def test_library_of_sees_through_a_rewrite() -> None:
    model = torchvision.models.resnet18()
    assert native.library_of(model) == "torchvision"
    assert native.library_of(timm.create_model("resnet18")) == "timm"
    assert native.library_of(torch.nn.Linear(2, 2)) == "other"
    dpatch.inject(model, 0.1)  # blocks become generated subclasses
    assert native.library_of(model.layer1[0]) == "torchvision"


def test_slot_rates_reads_every_slot() -> None:
    model = timm.create_model("vit_tiny_patch16_224", drop_path_rate=0.3, depth=4)
    rates = native.slot_rates(model)
    assert set(rates) == {f"blocks.{i}.drop_path{j}" for i in range(4) for j in (1, 2)}
    assert rates["blocks.0.drop_path1"] == 0.0 and rates["blocks.3.drop_path2"] == pytest.approx(
        0.3
    )


def test_build_light_puts_large_tensors_on_meta_only() -> None:
    model = native.build_light(functools.partial(timm.create_model, "resnet50"))
    assert model.fc.weight.is_meta  # 2048 x 1000
    assert not model.bn1.weight.is_meta  # 64 values: real


def test_timm_native_rates_match_timm_and_refuse_models_without_the_argument() -> None:
    rates = native.timm_native_rates("resnet18", 0.2, {})
    ref = timm.create_model("resnet18", drop_path_rate=0.2)
    assert rates == pytest.approx(native.slot_rates(ref))
    with pytest.raises(InvalidValueError, match="takes no drop_path_rate"):
        native.timm_native_rates("vgg11", 0.2, {})


def test_tv_identify_and_native_rates() -> None:
    model = torchvision.models.convnext_tiny()
    assert native.tv_identify(model) == "convnext_tiny"
    rates = native.tv_native_rates("convnext_tiny", 0.4, {})
    ref = torchvision.models.convnext_tiny(stochastic_depth_prob=0.4)
    assert rates == pytest.approx(native.slot_rates(ref))
    with pytest.raises(InvalidValueError, match="takes no stochastic_depth_prob"):
        native.tv_native_rates("resnet18", 0.4, {})
    with pytest.raises(InvalidValueError, match="cannot tell"):
        native.tv_identify(torch.nn.Sequential(torch.nn.Linear(3, 3)))
