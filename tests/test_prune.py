"""Pruning residual branches: the block returns its shortcut, the branch never runs, saved
files leave out what only pruned branches use, and everything round-trips."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from helpers import (
    HFLayer,
    IAddRes,
    MethodAddRes,
    MulAddRes,
    PlainRes,
    ProjRes,
    ScaledRes,
    TorchAddRes,
    example,
    mlp,
    run,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import dpatch
from dpatch import InvalidValueError, ManifestError, UnsupportedSiteError, WeightsError
from dpatch.analysis import Site
from dpatch.depth import prune_order, unused_state_keys
from dpatch.models import create_model, parse_spec


def zero_output(model: nn.Module, path: str) -> None:
    """The reference for a pruned branch: its last module outputs zeros."""
    model.get_submodule(path).register_forward_hook(lambda m, i, o: torch.zeros_like(o))


def count_calls(model: nn.Module, path: str) -> list[int]:
    calls = [0]

    def hook(m: nn.Module, i: object) -> None:
        calls[0] += 1

    model.get_submodule(path).register_forward_pre_hook(hook)
    return calls


# site name -> the module whose output is the branch (zeroed in the reference)
TOYS: list[tuple[Callable[[], nn.Module], dict[str, str]]] = [
    (PlainRes, {"0.drop_path": "0.f"}),
    (IAddRes, {"0.drop_path": "0.f"}),
    (TorchAddRes, {"0.drop_path": "0.f"}),
    (MethodAddRes, {"0.drop_path1": "0.f", "0.drop_path2": "0.g"}),
    (ScaledRes, {"0.drop_path1": "0.f", "0.drop_path2": "0.g"}),
    (MulAddRes, {"0.drop_path1": "0.f", "0.drop_path2": "0.g"}),
    (lambda: ProjRes(8, 8), {"0.drop_path": "0.f"}),
    (HFLayer, {"0.drop_path": "0.attn", "0.output.drop_path": "0.output.dense"}),
]


@pytest.mark.parametrize("inject_first", [False, True], ids=["plain", "injected"])
@pytest.mark.parametrize("make,branches", TOYS, ids=lambda v: getattr(v, "__name__", ""))
def test_pruned_toy_equals_branch_replaced_by_nothing(
    make: Callable[[], nn.Module], branches: dict[str, str], inject_first: bool
) -> None:
    x = example()
    for name, module in branches.items():
        torch.manual_seed(0)
        model = nn.Sequential(make())
        if inject_first:
            dpatch.inject(model, max_rate=0.3, example_inputs=(x,))
        reference = copy.deepcopy(model)
        zero_output(reference, module)
        report = dpatch.prune(model, [name], example_inputs=(x,))
        assert report.changed == (name,)
        assert {s.name for s in report.sites if s.pruned} == {name}
        assert torch.equal(run(model, x, train=False), run(reference, x, train=False)), name
        # the branch is never computed, in training or eval
        calls = count_calls(model, module)
        run(model, x, train=True)
        run(model, x, train=False)
        assert calls == [0], name
        model.train()
        model(x.clone().requires_grad_()).sum().backward()  # trains with the branch gone


def test_pruned_model_keeps_training_the_rest() -> None:
    x = example()
    torch.manual_seed(0)
    model = nn.Sequential(PlainRes(), PlainRes())
    dpatch.inject(model, max_rate=0.5, schedule="uniform", example_inputs=(x,))
    dpatch.prune(model, ["0.drop_path"], example_inputs=(x,))
    model.train()
    model(x).sum().backward()
    assert model[0].f[0].weight.grad is None  # pruned: not in the graph
    assert model[1].f[0].weight.grad is not None
    assert model[1].drop_path.drop_prob == 0.5  # the other site keeps its rate


def _tv_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():  # non-trivial BN so a removed branch changes the output
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.running_mean, std=0.1)
    return model.eval()


@pytest.mark.parametrize("inject_first", [False, True], ids=["plain", "injected"])
def test_prune_torchvision_resnet(inject_first: bool) -> None:
    model = _tv_resnet18()
    if inject_first:
        dpatch.inject(model, max_rate=0.2, skip=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    for path in ("layer2.0", "layer4.1"):
        zero_output(reference, f"{path}.bn2")
    full = run(model, x, train=False)
    report = dpatch.prune(model, ["layer2.0.drop_path", "layer4.1.drop_path"])
    out = run(model, x, train=False)
    assert torch.equal(out, run(reference, x, train=False))
    assert not torch.equal(out, full)
    assert [s.name for s in report.sites if s.pruned] == [
        "layer2.0.drop_path",
        "layer4.1.drop_path",
    ]
    keys = set(unused_state_keys(model))
    assert "layer4.1.conv1.weight" in keys and "layer2.0.bn2.running_var" in keys
    assert not any(k.startswith("layer2.0.downsample") for k in keys)  # the shortcut stays


def test_prune_timm_vit() -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, init_values=0.5
    ).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(model)
    zero_output(reference, "blocks.3.ls1")
    zero_output(reference, "blocks.7.ls2")
    dpatch.prune(model, ["blocks.3.drop_path1", "blocks.7.drop_path2"])
    assert torch.equal(run(model, x, train=False), run(reference, x, train=False))
    keys = set(unused_state_keys(model))
    assert "blocks.3.attn.qkv.weight" in keys and "blocks.3.norm1.weight" in keys
    assert "blocks.7.mlp.fc2.weight" in keys and "blocks.3.mlp.fc1.weight" not in keys


# --------------------------------------------------------------------------- choosing
def _sites(rates: list[float], per_block: int = 1) -> list[Site]:
    return [
        Site(f"b{i // per_block}", f"dp{i % per_block}", i // per_block, "graph", r)
        for i, r in enumerate(rates)
    ]


def test_by_rate_highest_first_ties_deeper_first() -> None:
    sites = _sites([0.1, 0.3, 0.3, 0.2])
    assert [s.name for s in prune_order(sites, "rate")] == [
        "b2.dp0",
        "b1.dp0",
        "b3.dp0",
        "b0.dp0",
    ]


def test_by_depth_and_every_other() -> None:
    sites = _sites([0.0] * 9)
    assert [s.block for s in prune_order(sites, "depth")] == [8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert [s.block for s in prune_order(sites, "every-other")] == [7, 5, 3, 1, 8, 6, 4, 2, 0]
    # two branches a block: whole blocks go together
    vit = _sites([0.0] * 8, per_block=2)
    order = [s.name for s in prune_order(vit, "every-other")]
    assert order[:4] == ["b3.dp0", "b3.dp1", "b1.dp0", "b1.dp1"]


def test_by_sensitivity_least_sensitive_first() -> None:
    sites = _sites([0.0] * 4)
    scores = {"b0.dp0": 0.5, "b1.dp0": 0.01, "b2.dp0": 0.2}  # b3 unmeasured: last
    assert [s.name for s in prune_order(sites, "sensitivity", scores)] == [
        "b1.dp0",
        "b2.dp0",
        "b0.dp0",
        "b3.dp0",
    ]
    with pytest.raises(InvalidValueError, match="another model"):
        prune_order(sites, "sensitivity", {"elsewhere.dp": 1.0})


def test_count_keep_and_rate_choice_on_a_model() -> None:
    x = example()
    model = nn.Sequential(*[PlainRes() for _ in range(4)])
    dpatch.inject(model, max_rate=0.4, schedule="linear", example_inputs=(x,))
    report = dpatch.prune(model, count=2, by="rate", example_inputs=(x,))
    assert set(report.changed) == {"3.drop_path", "2.drop_path"}
    report = dpatch.prune(model, keep=1, example_inputs=(x,))  # counts unpruned sites
    assert [s.pruned for s in report.sites] == [False, True, True, True]


def test_drop_zero_changes_nothing() -> None:
    x = example()
    model = nn.Sequential(PlainRes(), PlainRes())
    before = run(model, x, train=False)
    report = dpatch.prune(model, count=0, example_inputs=(x,))
    assert report.changed == () and not any(s.pruned for s in report.sites)
    assert type(model[0]) is PlainRes
    assert torch.equal(run(model, x, train=False), before)


def test_bad_requests() -> None:
    x = example()
    model = nn.Sequential(PlainRes(), PlainRes())
    with pytest.raises(InvalidValueError, match="no site named 'nope'"):
        dpatch.prune(model, ["nope"], example_inputs=(x,))
    with pytest.raises(InvalidValueError, match="cannot prune 3 branches"):
        dpatch.prune(model, count=3, example_inputs=(x,))
    with pytest.raises(InvalidValueError, match="exactly one"):
        dpatch.prune(model, example_inputs=(x,))
    with pytest.raises(InvalidValueError, match="needs scores"):
        dpatch.prune(model, count=1, by="sensitivity", example_inputs=(x,))
    assert type(model[0]) is PlainRes  # nothing happened


class Untraceable(nn.Module):
    """A timm slot in a forward torch.fx cannot trace (a data-dependent branch)."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import DropPath as TimmDropPath

        self.f = mlp()
        self.drop_path = TimmDropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().sum()) >= 0:
            return x + self.drop_path(self.f(x))
        return x


def test_refuses_a_native_slot_without_a_traced_residual() -> None:
    x = example()
    model = nn.Sequential(Untraceable(), PlainRes())
    sites = dpatch.find_sites(model, (x,))
    assert sites[0].name == "0.drop_path" and sites[0].kind == "native" and not sites[0].fused
    with pytest.raises(UnsupportedSiteError, match=r"cannot prune 0\.drop_path") as err:
        dpatch.prune(model, ["0.drop_path"], example_inputs=(x,))
    assert "\n" not in str(err.value)


class Outer(nn.Module):
    """A residual whose branch holds another block with its own residual."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(PlainRes(), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


def test_refusal_leaves_the_model_as_it_was() -> None:
    x = example()
    model = nn.Sequential(Outer())
    dpatch.inject(model, max_rate=0.2, example_inputs=(x,))
    before_sites = dpatch.find_sites(model, (x,))
    before = run(model, x, train=False)
    with pytest.raises(UnsupportedSiteError, match="holds 1 other site"):
        dpatch.prune(model, ["0.drop_path"], example_inputs=(x,))
    assert dpatch.find_sites(model, (x,)) == before_sites
    assert torch.equal(run(model, x, train=False), before)


def test_shared_tensors_stay_and_the_report_says_why() -> None:
    x = example()
    model = nn.Sequential(PlainRes(), PlainRes())
    model[1].f = model[0].f  # one MLP used by both blocks
    report = dpatch.prune(model, ["0.drop_path"], example_inputs=(x,))
    keys = unused_state_keys(model)
    assert "0.norm.weight" in keys and not any(".f." in k for k in keys)
    assert any(s.path == "0.f" and "stays" in s.reason for s in report.skipped)


def test_later_patches_keep_the_pruning() -> None:
    x = example()
    model = nn.Sequential(PlainRes(), PlainRes())
    dpatch.prune(model, ["0.drop_path"], example_inputs=(x,))
    pruned_out = run(model, x, train=False)
    sites = dpatch.inject(model, max_rate=0.3, skip=True, example_inputs=(x,)).sites
    assert [s.pruned for s in sites] == [True, False] and sites[1].skip
    dpatch.retune(model, max_rate=0.1, example_inputs=(x,))
    sites = dpatch.find_sites(model, (x,))
    assert [s.pruned for s in sites] == [True, False] and sites[1].rate == 0.1
    assert torch.equal(run(model, x, train=False), pruned_out)


def test_pruned_model_pickles_and_copies(tmp_path: Path) -> None:
    model = _tv_resnet18()
    dpatch.inject(model, max_rate=0.2, skip=True)
    dpatch.prune(model, count=3)
    x = torch.randn(2, 3, 32, 32)
    again = pickle.loads(pickle.dumps(model))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    expected = run(model, x, train=False)
    for other in (again, loaded, copy.deepcopy(model)):
        assert torch.equal(run(other, x, train=False), expected)
        assert [s.pruned for s in dpatch.find_sites(other)] == [
            s.pruned for s in dpatch.find_sites(model)
        ]
        assert unused_state_keys(other) == unused_state_keys(model)


# --------------------------------------------------------------------------- files
def _built(spec: str) -> nn.Module:
    model = create_model(parse_spec(spec)[0])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight)
    return model.eval()


def test_save_leaves_pruned_tensors_out_and_load_rebuilds_exactly(tmp_path: Path) -> None:
    model = _built("tv:resnet18")
    dpatch.inject(model, max_rate=0.3, schedule="huang")
    full_file = dpatch.save(model, tmp_path / "full.safetensors")
    report = dpatch.prune(model, count=2, by="rate")
    assert set(report.changed) == {"layer4.1.drop_path", "layer4.0.drop_path"}
    path = dpatch.save(model, tmp_path / "pruned.safetensors", report)
    assert path.stat().st_size < full_file.stat().st_size * 0.5

    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["dpatch.manifest"])
        stored = set(f.keys())
    pruned_keys = manifest["depth"]["pruned_keys"]
    assert set(pruned_keys) == set(unused_state_keys(model))
    assert stored == set(model.state_dict()) - set(pruned_keys)
    assert [f"{s['path']}.{s['branch']}" for s in manifest["sites"] if s["pruned"]] == [
        "layer4.0.drop_path",
        "layer4.1.drop_path",
    ]

    x = torch.randn(2, 3, 64, 64)
    loaded = dpatch.load(path)
    assert torch.equal(run(loaded, x, train=False), run(model, x, train=False))
    assert [s.pruned for s in dpatch.find_sites(loaded)] == [s.pruned for s in report.sites]
    # re-saving the loaded model gives the same tensors
    again = dpatch.save(loaded, tmp_path / "again.safetensors")
    assert set(load_file(str(again))) == stored

    # the plain architecture loads it with strict=False; the missing keys are the pruned
    # branches' (BatchNorm fills its own num_batches_tracked)
    plain = torchvision.models.resnet18()
    result = plain.load_state_dict(load_file(str(path)), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {
        k for k in pruned_keys if not k.endswith("num_batches_tracked")
    }


def _rewrite_manifest(src: Path, dst: Path, edit: Callable[[dict], None], drop: str = "") -> None:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    tensors.pop(drop, None)
    manifest = json.loads(meta["dpatch.manifest"])
    edit(manifest)
    meta["dpatch.manifest"] = json.dumps(manifest)
    save_file(tensors, str(dst), metadata=meta)


def test_missing_keys_are_accepted_only_where_the_manifest_says(tmp_path: Path) -> None:
    model = _built("tv:resnet18")
    dpatch.prune(model, ["layer3.1.drop_path"])
    path = dpatch.save(model, tmp_path / "p.safetensors")
    no_list = tmp_path / "no_list.safetensors"
    _rewrite_manifest(path, no_list, lambda m: m.pop("depth"))
    with pytest.raises(WeightsError, match="missing keys"):
        dpatch.load(no_list)
    used = tmp_path / "used.safetensors"
    _rewrite_manifest(
        path, used, lambda m: m["depth"]["pruned_keys"].append("fc.weight"), drop="fc.weight"
    )
    with pytest.raises(ManifestError, match=r"fc\.weight"):
        dpatch.load(used)


def test_the_other_branch_of_a_pruned_block_keeps_skipping() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5)
    dpatch.inject(model, max_rate=0.4, schedule="uniform", skip=True)
    report = dpatch.prune(model, ["blocks.3.drop_path1"])
    sites = {s.name: s for s in report.sites}
    assert sites["blocks.3.drop_path1"].pruned and not sites["blocks.3.drop_path1"].skip
    assert sites["blocks.3.drop_path2"].skip and not sites["blocks.3.drop_path2"].pruned
    model.train()
    model(torch.randn(8, 3, 32, 32)).sum().backward()
    assert model.blocks[3].attn.qkv.weight.grad is None
    assert model.blocks[3].mlp.fc1.weight.grad is not None


class WholeOutputSlot(nn.Module):
    """A timm slot that drops the block's whole output (no shortcut): VoVNet-style."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import DropPath as TimmDropPath

        self.f = mlp()
        self.drop_path = TimmDropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.f(x))


def test_refuses_a_slot_on_no_residual() -> None:
    x = example()
    model = nn.Sequential(WholeOutputSlot(), PlainRes())
    site = dpatch.find_sites(model, (x,))[0]
    assert site.name == "0.drop_path" and not site.residual
    with pytest.raises(UnsupportedSiteError, match="not a residual branch"):
        dpatch.prune(model, ["0.drop_path"], example_inputs=(x,))
    report = dpatch.sensitivity(model, x)
    assert report.sites[0].score is None and "not a residual branch" in report.sites[0].reason


def test_strip_and_verify_know_pruned_blocks() -> None:
    """strip refuses to bring pruned branches back unless told; verify checks the rest."""
    model = _tv_resnet18()
    dpatch.inject(model, max_rate=0.2)
    dpatch.prune(model, ["layer4.1.drop_path"])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(InvalidValueError, match=r"pruned branches \(layer4.1.drop_path\)"):
        dpatch.strip(model)
    report = dpatch.verify(model, example_inputs=(x,))
    assert report.ok, [f.message for f in report.findings]
    assert "layer4.1.drop_path" not in {c.site.name for c in report.sites}
    pruned_out = run(model, x, train=False)
    kept = copy.deepcopy(model)
    dpatch.strip(kept, pruned="keep")
    assert torch.equal(run(kept, x, train=False), pruned_out)  # still pruned, no DropPath left
    assert [m for m in kept.modules() if isinstance(m, dpatch.DropPath)] == [
        kept.layer4[1].drop_path
    ]
    dpatch.strip(model, pruned="restore")
    assert not any(isinstance(m, dpatch.DropPath) for m in model.modules())
    with pytest.raises(InvalidValueError, match="unknown pruned 'all'"):
        dpatch.strip(model, pruned="all")
