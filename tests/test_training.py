"""Patched models in the training stack: torch.compile, export, TorchScript, checkpoints,
mixed precision, rate schedules. Everything runs on CPU; CUDA variants run when present."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from helpers import PlainRes
from torch import nn

import dpatch
from dpatch import DropPath, inject
from dpatch import files as dfiles
from dpatch import models as zoo

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)


MODELS = {"resnet18": resnet18, "vit": small_vit}
X = torch.randn(4, 3, 32, 32)


def patched(name: str, skip: bool, rate: float = 0.5) -> nn.Module:
    model = MODELS[name]()
    report = inject(model, rate, schedule="uniform", skip=skip, example_inputs=(X[:2],))
    assert all(s.fused and s.skip == skip for s in report.sites)
    return model


# --------------------------------------------------------------------------- compile
@pytest.mark.slow
@pytest.mark.parametrize("skip", [False, True], ids=["mask", "skip"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_no_recompiles_fresh_masks(name: str, skip: bool) -> None:
    """fullgraph=True proves there is no graph break; error_on_recompile proves repeated
    steps reuse the graph; different outputs for one input prove masks are drawn anew."""
    torch._dynamo.reset()
    model = patched(name, skip).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y1 = compiled(X)
    y1.sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        y2 = compiled(X)
        y3 = compiled(X)
    assert not torch.equal(y2, y3) and not torch.equal(y1.detach(), y2)


@pytest.mark.slow
def test_compiled_masking_follows_new_rates_without_recompiling() -> None:
    torch._dynamo.reset()
    model = patched("vit", skip=False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.train()
    compiled(X)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for m in model.modules():
            if isinstance(m, DropPath):
                m.drop_prob = 0.0
        train_out = compiled(X)  # rate 0 in training is the eval computation (no dropout)
    model.eval()
    assert torch.allclose(train_out, model(X), atol=1e-5)


@pytest.mark.slow
def test_compiled_skipping_follows_retune() -> None:
    """A skipping site's subset size is a shape: a new rate recompiles, never goes stale."""
    torch._dynamo.reset()
    model = patched("vit", skip=True).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(X)
    dpatch.retune(model, 0.0, schedule="uniform", skip=True, example_inputs=(X[:2],))
    out = compiled(X)
    assert torch.allclose(out, model.eval()(X), atol=1e-5)


# --------------------------------------------------------------------------- export
def graph_size(model: nn.Module) -> int:
    ep = torch.export.export(model.eval(), (X[:2],))
    return len(ep.graph.nodes)


@pytest.mark.parametrize("skip", [False, True], ids=["mask", "skip"])
@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_has_no_droppath_left(name: str, skip: bool) -> None:
    plain = MODELS[name]().eval()
    model = patched(name, skip).eval()
    assert graph_size(model) == graph_size(plain)
    ep = torch.export.export(model, (X[:2],))
    assert torch.equal(ep.module()(X[:2]), plain(X[:2]))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_matches_unpatched(name: str, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    sizes = []
    for model in (MODELS[name](), patched(name, skip=True)):
        path = tmp_path / "m.onnx"
        torch.onnx.export(model.eval(), (X[:2],), str(path), dynamo=True)
        sizes.append(len(onnx.load(str(path)).graph.node))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("skip", [False, True], ids=["mask", "skip"])
def test_torchscript_scripting(skip: bool) -> None:
    plain = resnet18().eval()
    model = patched("resnet18", skip).eval()
    scripted = torch.jit.script(model)
    assert torch.equal(scripted(X), plain(X))


def test_torchscript_training_mode_drops_rows() -> None:
    """The scripted training branch: each row is either the shortcut alone (dropped) or the
    shortcut plus the branch scaled by 1/(1-p) (kept), and both occur."""
    torch.manual_seed(0)
    block = PlainRes()
    ref = copy.deepcopy(block)
    x = torch.randn(64, 4, 8)
    inject(block, 0.5, schedule="uniform", example_inputs=(x[:2],))
    scripted = torch.jit.script(block).train()
    torch.manual_seed(1)
    with torch.no_grad():
        out = scripted(x)
        branch = ref.f(ref.norm(x))
    dropped = torch.isclose(out, x, atol=1e-6).flatten(1).all(1)
    kept = torch.isclose(out, x + branch / 0.5, atol=1e-5).flatten(1).all(1)
    assert bool((dropped ^ kept).all())
    # 64 draws at p = 0.5: a 4-sigma binomial band around 32
    assert abs(int(dropped.sum()) - 32) <= 16
    assert not torch.equal(out, scripted.eval()(x))


# --------------------------------------------------------------------------- checkpoints
def test_ddp_and_ema_state_dicts_load_back(tmp_path: Path) -> None:
    from timm.utils import ModelEmaV3

    model = patched("resnet18", skip=False)
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}  # DDP's prefix
    torch.save(wrapped, tmp_path / "ddp.pt")
    ema = ModelEmaV3(model, decay=0.9)
    torch.save({"state_dict_ema": ema.state_dict(), "epoch": 3}, tmp_path / "ema.pth")
    for name in ("ddp.pt", "ema.pth"):
        fresh = resnet18()
        dfiles.load_weights(fresh, tmp_path / name)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    # and a dpatch file rebuilt from the loaded weights keeps the sites
    fresh = zoo.create_model("tv:resnet18", num_classes=10)
    dfiles.load_weights(fresh, tmp_path / "ddp.pt")
    inject(fresh, 0.5, schedule="uniform")
    out = dfiles.save(fresh, tmp_path / "r.safetensors")
    assert [s.rate for s in dpatch.find_sites(dpatch.load(out))] == [0.5] * 8


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("skip", [False, True], ids=["mask", "skip"])
@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_autocast_train_step(name: str, skip: bool) -> None:
    model = patched(name, skip).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(X).float().logsumexp(dim=1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert math.isfinite(loss.item())


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("skip", [False, True], ids=["mask", "skip"])
def test_cuda_bf16_train_step(skip: bool) -> None:
    model = patched("vit", skip).cuda().train()
    x = X.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(dim=1).mean()
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters())


def test_deepcopy_of_patched_model_trains() -> None:
    model = patched("resnet18", skip=True)
    clone = copy.deepcopy(model).train()
    clone(X).sum().backward()
    assert all(p.grad is not None for p in clone.parameters())
    assert all(p.grad is None for p in model.parameters())
