"""The rewriter: golden generated source, and patched models that pickle.

The golden sources are what torch.fx 2.14 prints for the traced graph; a new torch release
may reformat them (then read the diff, and update the strings when only formatting moved).
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from helpers import IAddRes, PlainRes, example, run
from torch import nn

import dpatch
from dpatch import DropPath, inject
from dpatch.marks import block_meta


def generated(block: nn.Module) -> dict[str, str]:
    """The generated methods of a patched block, blank lines and trailing spaces dropped."""
    meta = block_meta(block)
    assert meta is not None
    return {
        name: "\n".join(ln.rstrip() for ln in src.splitlines() if ln.strip())
        for name, src in meta.code.functions
    }


MASK_PLAIN = """\
def forward(self, x : torch.Tensor):
    norm = self.norm(x)
    f = self.f(norm);  norm = None
    drop_path = self.drop_path(f, x);  f = x = None
    return drop_path"""

MASK_IADD = """\
def forward(self, x : torch.Tensor):
    f = self.f(x)
    drop_path = self.drop_path(f, x, branch_first = True);  f = x = None
    return drop_path"""

SKIP_FORWARD = """\
def forward(self, x : torch.Tensor):
    _dpatch_site0 = self._dpatch_site0(x, x);  x = None
    return _dpatch_site0"""

SKIP_BRANCH = """\
def _dpatch_branch0(self, x):
    norm = self.norm(x);  x = None
    f = self.f(norm);  norm = None
    return f"""


def test_golden_masking_source() -> None:
    for cls, golden in ((PlainRes, MASK_PLAIN), (IAddRes, MASK_IADD)):
        block = cls()
        inject(block, 0.2, example_inputs=(example(),))
        assert generated(block) == {"forward": golden}


def test_golden_skipping_source() -> None:
    block = PlainRes()
    inject(block, 0.2, skip=True, example_inputs=(example(),))
    code = generated(block)
    assert list(code) == ["_dpatch_branch0", "_dpatch_site0", "forward"]
    assert code["forward"] == SKIP_FORWARD
    assert code["_dpatch_branch0"] == SKIP_BRANCH
    site = code["_dpatch_site0"]
    assert site.startswith("def _dpatch_site0(self, residual, x):\n    slot = self.drop_path")
    assert "self._dpatch_branch0(gather_rows(x, index))" in site  # row subset
    assert site.endswith("return slot(self._dpatch_branch0(x), residual, 1.0)")  # masking


class BranchFirst(nn.Module):
    """``f(y) + y`` with ``y`` a transposed view: the sum takes the branch's layout."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)
        return self.f(y) + y


class BranchFirstShapes(BranchFirst):
    """The same behind control flow on a shape (rewritten at source level)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)
        if y.shape[-1] == 8:
            return self.f(y) + y
        return y


@pytest.mark.parametrize("cls", [BranchFirst, BranchFirstShapes])
@pytest.mark.parametrize("skip", [False, True])
def test_branch_first_sum_keeps_the_model_layout(cls: type[nn.Module], skip: bool) -> None:
    # A sum takes its first operand's layout: were the slot call to add in the other
    # order, outputs would be equal but strided differently, and a reduction downstream
    # (transformers' VideoMAE mean-pools) would differ in the last bits.
    model = nn.Sequential(cls())
    x = torch.randn(2, 8, 5)
    ref = model.eval()(x)
    assert not ref.is_contiguous() or ref.stride() != x.transpose(1, 2).stride()
    report = inject(model, 0.2, skip=skip, example_inputs=(x,))
    assert [s.fused for s in report.sites] == [True]
    for m in (model, torch.jit.script(model)):
        got = m.eval()(x)
        assert torch.equal(got, ref) and got.stride() == ref.stride()
        assert torch.equal(got.mean(1), ref.mean(1))
    for m in model.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    got = model.train()(x)
    assert torch.equal(got, ref) and got.stride() == ref.stride()


def test_identical_blocks_share_one_generated_class() -> None:
    model = nn.Sequential(PlainRes(), PlainRes(), IAddRes())
    inject(model, 0.2, example_inputs=(example(),))
    assert type(model[0]) is type(model[1]) and type(model[0]) is not type(model[2])
    assert type(model[0]).__qualname__ == "PlainRes_dpatch"


# --------------------------------------------------------------------------- pickling
def _patched(name: str, skip: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "resnet18":
        model = torchvision.models.resnet18(num_classes=10)
    else:
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    inject(model, 0.3, schedule="uniform", skip=skip, example_inputs=(x[:2],))
    return model, x


def _check_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(run(a, x, train=False), run(b, x, train=False))
    assert dpatch.find_sites(a, (x[:2],)) == dpatch.find_sites(b, (x[:2],))
    # training mode works and draws: the same seed gives the same output in both
    assert torch.equal(run(a, x, train=True, seed=3), run(b, x, train=True, seed=3))
    b.train()
    b(x).sum().backward()
    assert all(p.grad is not None for p in b.parameters() if p.requires_grad)


@pytest.mark.parametrize("skip", [False, True], ids=["mask", "skip"])
@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_patched_model_pickles(name: str, skip: bool, tmp_path: Path) -> None:
    model, x = _patched(name, skip)
    again = pickle.loads(pickle.dumps(model))
    _check_same(model, again, x)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    _check_same(model, loaded, x)
    # strip still knows the original classes after a round trip
    dpatch.strip(loaded)
    assert not any(isinstance(m, DropPath) for m in loaded.modules())
    assert copy.deepcopy(model) is not model


def test_pickled_model_loads_in_a_fresh_process(tmp_path: Path) -> None:
    model, x = _patched("vit", skip=True)
    torch.save({"model": model, "x": x, "eval": run(model, x, train=False)}, tmp_path / "m.pt")
    script = textwrap.dedent(
        f"""
        import torch
        obj = torch.load({str(tmp_path / "m.pt")!r}, weights_only=False)
        model, x = obj["model"], obj["x"]
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), obj["eval"]), "eval output differs"
        model.train()
        model(x).sum().backward()
        print(type(model.blocks[0]).__qualname__, model.blocks[0].drop_path1.skip)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Block_dpatch", "True"]
