"""Folding Huang's eval scaling: the plain architecture reproduces the patched model."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import IAddRes, MulAddRes, PlainRes, ProjRes, ScaledRes, example, run, snapshot
from torch import nn

import dpatch
from dpatch import UnsupportedSiteError


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check(model: nn.Module, x: torch.Tensor, rate: float = 0.3) -> dpatch.FoldReport:
    ex = (x,)
    dpatch.inject(model, max_rate=rate, schedule="uniform", scaling="expected", example_inputs=ex)
    reference = run(model, x, train=False)
    plain_before = copy.deepcopy(model)
    dpatch.strip(plain_before)
    assert _max_rel(run(plain_before, x, train=False), reference) > 1e-3  # needs folding
    report = dpatch.fold(model, example_inputs=ex)
    assert report.changed
    assert all(s.scaling == "inverted" and s.rate == rate for s in report.report.sites)
    plain = copy.deepcopy(model)
    dpatch.strip(plain)
    assert _max_rel(run(plain, x, train=False), reference) <= 1e-5
    assert _max_rel(run(model, x, train=False), reference) <= 1e-5
    return report


def test_toy_blocks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(PlainRes(), ScaledRes(), ProjRes(8, 8), MulAddRes(), IAddRes())
    report = _check(model, example())
    tensors = {f.name: f.tensors for f in report.folded}
    assert tensors["0.drop_path"] == ("0.f.2.weight", "0.f.2.bias")
    assert tensors["1.drop_path1"] == ("1.gamma",)  # x + gamma * f(x)
    assert all(f.factor == pytest.approx(0.7) for f in report.folded)


class ConvBnRelu(nn.Module):
    """``x + relu(bn(conv(x)))``: ReLU is positive-homogeneous, so BN takes the factor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.bn(self.conv(x)))


class GeluEnd(nn.Module):
    """``x + gelu(fc(x))``: GELU is not homogeneous; nothing to fold into."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.fc(x))


def test_looks_through_relu_into_batchnorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ConvBnRelu(), ConvBnRelu()).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.bias)
    report = _check(model, torch.randn(2, 4, 6, 6))
    assert report.folded[0].tensors == ("0.bn.weight", "0.bn.bias")


def _timm_resnet() -> nn.Module:
    model = timm.create_model("resnet18", num_classes=5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight)
    return model


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "timm_resnet18": (_timm_resnet, (2, 3, 64, 64), "layer1.0.bn2.weight"),
    "timm_vit_layerscale": (
        lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, init_values=0.5, num_classes=5
        ),
        (2, 3, 32, 32),
        "blocks.0.ls1.gamma",
    ),
    "timm_convnext": (
        lambda: timm.create_model("convnext_atto", num_classes=5, ls_init_value=0.5),
        (2, 3, 64, 64),
        "stages.0.blocks.0.gamma",
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_models(name: str) -> None:
    make, shape, first = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    report = _check(model, torch.randn(shape))
    assert first in report.folded[0].tensors


def test_refuses_a_branch_without_affine_end_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(PlainRes(), GeluEnd())
    ex = (example(),)
    dpatch.inject(model, max_rate=0.3, scaling="expected", example_inputs=ex)
    before = snapshot(model)
    with pytest.raises(UnsupportedSiteError, match=r"cannot fold 1\.drop_path.*gelu") as err:
        dpatch.fold(model, example_inputs=ex)
    assert "\n" not in str(err.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(s.scaling == "expected" for s in dpatch.find_sites(model, ex))


def test_nothing_to_fold() -> None:
    model = nn.Sequential(PlainRes())
    dpatch.inject(model, max_rate=0.3, example_inputs=(example(),))  # inverted scaling
    report = dpatch.fold(model, example_inputs=(example(),))
    assert not report.changed and report.folded == ()


def test_training_is_unchanged_by_folding() -> None:
    """A kept branch in training is f'(x)/(1-p) = f(x), as with 'expected' scaling."""
    torch.manual_seed(0)
    model = nn.Sequential(PlainRes(), PlainRes())
    x = example()
    dpatch.inject(
        model,
        max_rate=0.4,
        schedule="uniform",
        scaling="expected",
        mode="batch",
        example_inputs=(x,),
    )
    folded = dpatch.fold(model, inplace=False, example_inputs=(x,)).model
    assert folded is not None
    # in batch mode with a seeded host generator both models drop the same branches
    for dp in (*model.modules(), *folded.modules()):
        if isinstance(dp, dpatch.DropPath):
            dp.seed = 5
            dp._generator = None
    a, b = run(model, x, train=True), run(folded, x, train=True)
    assert _max_rel(b, a) <= 1e-5
