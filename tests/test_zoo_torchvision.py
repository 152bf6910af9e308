"""Every torchvision builder in ``list_models()``: classification, quantization (float
``Quantizable*`` models, ``quantize=False``), detection, segmentation, video and optical flow.
Sites == residual additions; invariants hold.

Counts run on every model, built with its big tensors on the meta device (free), in eval
mode (detection models need targets in training) and with inputs of the model's kind:
video ``(B, 3, T, H, W)``, detection a list of images, RAFT two images. The invariants need
real weights and run on every model that has sites, at small input sizes: classification
and quantization models with ``check_invariants`` (state_dict, eval output, train output at
rate 0); the others in eval mode (state_dict unchanged, every output tensor bit-identical;
detection models keep every box: ``score_thresh=0``).

``MISCOUNTED`` lists the models where dpatch and the oracle disagree, with the reason; the
test checks that exact disagreement, so it fails when either side changes.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
import torch
import torchvision
import tv_oracle
from helpers import check_invariants, snapshot, state_changes
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from dpatch import find_sites, inject
from dpatch.analysis import probe
from dpatch.models import ModelSpec, build_light, set_model_spec, tv_build_kwargs

NAMES = torchvision.models.list_models()
CLASSIFICATION = set(torchvision.models.list_models(module=torchvision.models))
ZERO_SITES = {
    "alexnet", "googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "quantized_googlenet", "quantized_inception_v3", "quantized_shufflenet_v2_x0_5",
    "quantized_shufflenet_v2_x1_0", "quantized_shufflenet_v2_x1_5",
    "quantized_shufflenet_v2_x2_0",
    "ssd300_vgg16",  # a VGG backbone
    "s3d",  # separable 3-D inception blocks: concatenations only
}  # fmt: skip
#: dpatch's count minus the oracle's, per block class, and why.
MISCOUNTED: dict[str, tuple[dict[str, int], str]] = {
    name: (
        {"ConvGRU": n, "RAFT": 1},
        "dpatch's residual rule takes the GRU update `(1 - z) * h + z * q` for `shortcut + "
        "branch` (dropping `z * q` leaves `(1 - z) * h`, not h), and unrolls RAFT's refinement "
        "loop, taking each `coords1 = coords1 + delta_flow` after the first (the flow "
        "estimate's update by one shared block) for a site of its own: num_flow_updates - 1, "
        "1 here, 11 by default; the first adds the flow to the coordinate grid, a constant",
    )
    for name, n in (("raft_small", 1), ("raft_large", 2))
}


def task(name: str) -> str:
    module = torchvision.models.get_model_builder(name).__module__.split(".")
    return module[2] if len(module) > 3 else "classification"


def small_kwargs(name: str) -> dict[str, Any]:
    """Builder arguments that make a model cheap to run on the CPU."""
    kind = task(name)
    if name.startswith("vit_"):
        return {"image_size": 2 * int(name.rsplit("_", 1)[-1])}
    if kind == "detection":
        prefix = "box_" if "rcnn" in name else ""
        kw: dict[str, Any] = {f"{prefix}detections_per_img": 5, f"{prefix}score_thresh": 0.0}
        if not name.startswith("ssd"):
            kw.update(min_size=64, max_size=64)
        if name.startswith(("retinanet", "fcos")):
            kw["topk_candidates"] = 20
        if "rcnn" in name:  # 1000 proposals per image make the box head the whole cost
            kw.update(rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
        return kw
    return {}


def image_size(name: str) -> int:
    if name.startswith("vit_"):
        return small_kwargs(name)["image_size"]
    if name.startswith("maxvit"):
        return 224  # partition size 7 at stride 32
    if name in ("inception_v3", "quantized_inception_v3"):
        return 299
    if name.startswith("raft"):
        return 128  # its correlation pyramid needs 16x16 features at stride 8
    return 64


def inputs(name: str, meta: bool) -> tuple[Any, ...]:
    """Example inputs of the model's kind (meta: for counting; else small random ones)."""
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> Tensor:
        return torch.empty(shape, device="meta") if meta else torch.randn(shape, generator=g)

    kind, size = task(name), image_size(name)
    if kind == "video":
        if name == "s3d":
            return (t(1, 3, 16, 224, 224),)  # its last pooling needs a 7x7 map
        return (t(2, 3, 4, 32, 32),)
    if kind == "detection":
        return ([t(3, size, size), t(3, size, size)],)
    if kind == "optical_flow":
        return (t(2, 3, size, size), t(2, 3, size, size), 2)  # two images, two updates
    return (t(2, 3, size, size),)


#: Arguments the builders fix, given to their private factory (small MViTs: 4 x 32 x 32).
FACTORY_KWARGS: dict[str, dict[str, Any]] = {
    "mvit_v1_b": {"spatial_size": (32, 32), "temporal_size": 4},
    "mvit_v2_s": {"spatial_size": (32, 32), "temporal_size": 4},
}


@contextmanager
def factory_kwargs(name: str, **forced: Any) -> Iterator[None]:
    """Call ``name``'s builder with ``forced`` arguments for its private factory
    (``_swin_transformer(..., stochastic_depth_prob=0.2)``, ``_mvit(spatial_size=...)``):
    arguments the public builder sets itself."""
    if not forced:
        yield
        return
    builder = torchvision.models.get_model_builder(name)
    module = sys.modules[builder.__module__]
    (factory,) = [
        f
        for n, f in vars(module).items()
        if n.startswith("_") and inspect.isfunction(f) and f.__module__ == module.__name__
        and "weights" in inspect.signature(f).parameters
    ]  # fmt: skip

    def call(*args: Any, **kwargs: Any) -> nn.Module:
        return factory(*args, **{**kwargs, **forced})

    with mock.patch.object(module, factory.__name__, call):
        yield


def build(name: str, light: bool, rate_kwarg: float | None = None, **forced: Any) -> nn.Module:
    """The model, small; ``rate_kwarg``: the builder's ``stochastic_depth_prob``; ``forced``:
    arguments for its private factory."""
    kw = {**tv_build_kwargs(name, False), **small_kwargs(name)}
    if rate_kwarg is not None:
        kw["stochastic_depth_prob"] = rate_kwarg
    torch.manual_seed(0)
    with factory_kwargs(name, **{**FACTORY_KWARGS.get(name, {}), **forced}):
        if light:
            return build_light(lambda: torchvision.models.get_model(name, **kw)).eval()
        return torchvision.models.get_model(name, **kw).eval()


@pytest.mark.zoo
@pytest.mark.parametrize("name", NAMES)
def test_sites_equal_residual_additions(name: str) -> None:
    model = build(name, light=True)
    expected = tv_oracle.residual_blocks(model, strict=True)
    sites = find_sites(model, inputs(name, meta=True))
    got: dict[str, int] = {}
    for s in sites:
        got[s.path] = got.get(s.path, 0) + 1
    if name in MISCOUNTED:
        extra, _reason = MISCOUNTED[name]
        diff: dict[str, int] = {}
        for path in set(got) | set(expected):
            if got.get(path, 0) != expected.get(path, 0):
                cls = type(model.get_submodule(path)).__name__
                diff[cls] = diff.get(cls, 0) + got.get(path, 0) - expected.get(path, 0)
        assert diff == extra
    else:
        assert got == expected
    assert (name in ZERO_SITES) == (not sites)


def _tensors(out: Any) -> Iterator[Tensor]:
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, dict):
        for k in sorted(out):
            yield from _tensors(out[k])
    elif isinstance(out, list | tuple):
        for v in out:
            yield from _tensors(v)


def _eval_outputs(model: nn.Module, x: tuple[Any, ...]) -> list[Tensor]:
    with torch.no_grad():
        return [t.clone() for t in _tensors(model(*x))]


def check_eval_invariants(
    model: nn.Module, x: tuple[Any, ...], patch: Callable[[nn.Module], Any]
) -> Iterator[str]:
    """state_dict unchanged and every eval output tensor bit-identical after ``patch``."""
    before = snapshot(model)
    ref = _eval_outputs(model, x)
    assert ref, "the model returned no tensors"
    patch(model)
    yield from state_changes(before, model.state_dict())
    got = _eval_outputs(model.eval(), x)
    if len(got) != len(ref) or not all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)):
        yield "eval output differs"


@pytest.mark.zoo
@pytest.mark.parametrize("name", sorted(set(NAMES) - ZERO_SITES))
def test_invariants_real_weights(name: str) -> None:
    model = build(name, light=False)
    x = inputs(name, meta=False)
    if task(name) in ("classification", "quantization"):
        problems = list(check_invariants(model, x[0], lambda m: inject(m, 0.2, example_inputs=x)))
    else:
        problems = list(check_eval_invariants(model, x, lambda m: inject(m, 0.2, example_inputs=x)))
    assert problems == []
    assert all(s.fused for s in find_sites(model, x))


def test_detection_builds_without_downloading_backbone_weights() -> None:
    """weights_backbone=None unless pretrained (the default is ImageNet weights)."""
    assert tv_build_kwargs("fasterrcnn_resnet50_fpn", False) == {
        "weights": None,
        "weights_backbone": None,
    }
    assert tv_build_kwargs("r3d_18", False) == {"weights": None}
    assert tv_build_kwargs("fcn_resnet50", True) == {"weights": "DEFAULT"}


# --------------------------------------------------------------------------- native rates
def _takes_stochastic_depth(name: str) -> bool:
    builder = torchvision.models.get_model_builder(name)
    return "stochastic_depth_prob" in inspect.getsource(sys.modules[builder.__module__])


NATIVE = [n for n in NAMES if _takes_stochastic_depth(n)]


def reference(name: str, rate: float) -> nn.Module:
    """The builder's model at ``stochastic_depth_prob=rate``; Swin, Swin3D and MaxViT
    builders fix the rate themselves, so it goes to their private factory."""
    try:
        return build(name, light=True, rate_kwarg=rate)
    except TypeError as exc:
        if "multiple values" not in str(exc):
            raise
    return build(name, light=True, stochastic_depth_prob=rate)


@pytest.mark.zoo
@pytest.mark.parametrize("name", NATIVE)
def test_native_schedule_reproduces_torchvision(name: str) -> None:
    """inject(schedule='native', 0.3) == the builder's stochastic_depth_prob=0.3, per slot;
    every StochasticDepth the forward calls with a rate is a site."""
    x = inputs(name, meta=True)
    model = build(name, light=True)
    set_model_spec(model, ModelSpec("torchvision", name, small_kwargs(name)))  # as tv:NAME
    report = inject(model, 0.3, schedule="native", example_inputs=x)
    ref = reference(name, 0.3)
    rates = {n: float(m.p) for n, m in ref.named_modules() if isinstance(m, StochasticDepth)}
    assert any(r > 0 for r in rates.values())
    for s in report.sites:
        # MaxViT builds an nn.Identity where a block's rate is 0
        assert s.rate == pytest.approx(rates.get(s.origin, 0.0), abs=1e-6), s.name
    seen = probe(ref, x).order
    called = {n for n, m in ref.named_modules() if id(m) in seen and n in rates}
    assert {n for n in called if rates[n] > 0} <= {s.origin for s in report.sites}
