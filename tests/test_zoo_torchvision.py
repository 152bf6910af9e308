"""Every torchvision classification model: sites == residual additions; invariants hold.

Counts run on every model, built with its big tensors on the meta device (free). The
bit-identity invariants need real weights and run on every model that has sites, at small
input sizes (ViTs get a small ``image_size``).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
import tv_oracle
from helpers import check_invariants

from dpatch import find_sites, inject
from dpatch.zoo import build_light

NAMES = torchvision.models.list_models(module=torchvision.models)
ZERO_SITES = {
    "alexnet", "googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
}  # fmt: skip


def small_kwargs(name: str) -> dict:
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[-1])
        return {"image_size": 2 * patch}
    return {}


def input_size(name: str) -> int:
    if name.startswith("vit_"):
        return small_kwargs(name)["image_size"]
    if name.startswith("maxvit"):
        return 224  # partition size 7 at stride 32
    if name == "inception_v3":
        return 299
    return 64


@pytest.mark.zoo
@pytest.mark.parametrize("name", NAMES)
def test_sites_equal_residual_additions(name: str) -> None:
    model = build_light(lambda: torchvision.models.get_model(name, weights=None))
    expected = tv_oracle.residual_blocks(model, strict=True)
    size = 299 if name == "inception_v3" else None
    x = (torch.empty(2, 3, size, size, device="meta"),) if size else None
    sites = find_sites(model, x)
    got: dict[str, int] = {}
    for s in sites:
        got[s.path] = got.get(s.path, 0) + 1
    assert got == expected
    assert (name in ZERO_SITES) == (not sites)


@pytest.mark.zoo
@pytest.mark.parametrize("name", sorted(set(NAMES) - ZERO_SITES))
def test_invariants_real_weights(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **small_kwargs(name))
    size = input_size(name)
    x = torch.randn(2, 3, size, size)
    problems = list(check_invariants(model, x, lambda m: inject(m, 0.2, example_inputs=(x,))))
    assert problems == []
    assert all(s.fused for s in find_sites(model, (x,)))
