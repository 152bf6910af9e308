"""verify: realised rates, scales and eval identity on healthy models, and the silent bugs
it exists to catch (each test builds the bug and asserts the finding that names it)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TimmSlots, example, mlp, snapshot
from timm.layers import DropPath as TimmDropPath
from torch import nn

import dpatch
from dpatch import InvalidValueError, ModelRunError, verify
from dpatch.errors import ProbeError


def codes(report: dpatch.VerifyReport, severity: str = "error") -> set[str]:
    return {f.code for f in report.findings if f.severity == severity}


def stack(*blocks: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*blocks)


# --------------------------------------------------------------------------- healthy models
def test_patched_model_verifies_and_is_left_untouched(net: nn.Module) -> None:
    x = example()
    dpatch.inject(net, 0.3, example_inputs=(x,))
    state, rng = snapshot(net), torch.get_rng_state()
    report = verify(net, example_inputs=(x,), steps=2)
    assert report.ok, [f.line() for f in report.findings]
    assert report.eval_equal and report.eval_check == "bitwise" and report.schedule == "linear"
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert all(not isinstance(m, nn.Identity) for m in net.modules())  # no slot was replaced
    measured = [c for c in report.sites if c.site.rate > 0]
    assert measured and all(c.calls >= 2 and c.measured.draws >= 2048 for c in measured)
    for c in measured:
        assert (
            c.measured.low is not None
            and c.measured.high is not None
            and c.measured.low <= c.site.rate <= c.measured.high
        )
        # Kept rows carry 1/(1-p), to the 1 % the check allows.
        assert c.measured.scale == pytest.approx(1 / (1 - c.site.rate), rel=1e-2)
    json.dumps(report.to_dict())  # plain JSON
    assert report.inputs == "4x4x8 float32 (given)"


def test_unpatched_timm_slots_verify() -> None:
    model = stack(TimmSlots(rate=0.25), TimmSlots(rate=0.25))
    report = verify(model, example_inputs=(example(),))
    assert report.ok, [f.line() for f in report.findings]
    assert [c.site.kind for c in report.sites] == ["native"] * 4
    assert all(c.measured.unit == "row" and c.measured.share is not None for c in report.sites)
    assert report.schedule == "uniform"


def test_skip_share_is_exact() -> None:
    model = stack(*(TimmSlots() for _ in range(3)))
    x = example()
    dpatch.inject(model, 0.3, schedule="uniform", skip=True, example_inputs=(x,))
    report = verify(model, example_inputs=(x,), rows=100)
    assert report.ok, [f.line() for f in report.findings]
    for c in report.sites:
        assert (
            c.site.skip
            and c.measured.exact
            and c.measured.low == c.measured.high == c.measured.share
        )
        # k = round(B (1 - p)) rows computed per call: within half a row of the rate.
        assert c.measured.share is not None and abs(c.measured.share - 0.3) <= 0.5 / 4
        assert c.measured.scale is not None and c.measured.expected_scale is not None
        assert c.measured.scale == pytest.approx(c.measured.expected_scale, rel=1e-3)


def test_batch_mode_counts_calls() -> None:
    model = stack(*(TimmSlots() for _ in range(2)))
    x = example()
    dpatch.inject(model, 0.4, schedule="uniform", mode="batch", example_inputs=(x,))
    report = verify(model, example_inputs=(x,))
    assert report.ok, [f.line() for f in report.findings]
    assert all(c.measured.unit == "batch" and c.measured.draws >= 256 for c in report.sites)


def test_reports_are_reproducible() -> None:
    model = stack(TimmSlots(rate=0.2))
    a = verify(model, example_inputs=(example(),), seed=3)
    b = verify(model, example_inputs=(example(),), seed=3)
    assert [c.measured.dropped for c in a.sites] == [c.measured.dropped for c in b.sites]


def test_declared_rates() -> None:
    x = example()
    model = stack(*(TimmSlots() for _ in range(4)))
    report = dpatch.inject(model, 0.2, example_inputs=(x,))
    assert verify(model, example_inputs=(x,), declared=report).ok
    assert verify(model, example_inputs=(x,), schedule="linear", max_rate=0.2).ok
    wrong = verify(model, example_inputs=(x,), schedule="linear", max_rate=0.3)
    assert codes(wrong) == {"declared"} and not wrong.ok
    name = report.sites[-1].name
    by_name = verify(model, example_inputs=(x,), declared={name: 0.5})
    assert [f.where for f in by_name.findings] == [name]


# --------------------------------------------------------------------------- silent bugs
class ForgetsToCall(nn.Module):
    """A block that builds its DropPath and never calls it (rf-detr#762, DINOv2)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = mlp()
        self.drop_path = TimmDropPath(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def test_slot_that_is_never_called() -> None:
    report = verify(stack(ForgetsToCall(), ForgetsToCall()), example_inputs=(example(),))
    assert not report.ok and codes(report) == {"never-called"}
    assert {f.where for f in report.findings} == {"0.drop_path", "1.drop_path"}
    ok = verify(stack(ForgetsToCall()), example_inputs=(example(),), ignore=["never-called"])
    assert ok.ok and codes(ok, "warning") == {"never-called"}


def test_constant_rate_per_stage_inside_a_ramp() -> None:
    """transformers#33974: each stage uses its first block's rate."""
    rates = [0.0, 0.1, 0.1, 0.2, 0.2, 0.3]
    model = stack(*(TimmSlots(rate=r) for r in rates))
    report = verify(model, example_inputs=(example(),))
    assert codes(report) == {"schedule"} and report.schedule == "increasing"
    assert [f.where for f in report.findings] == ["blocks 1-2", "blocks 3-4"]
    ramp = stack(*(TimmSlots(rate=0.06 * i) for i in range(6)))
    assert verify(ramp, example_inputs=(example(),)).ok


class NoRescale(TimmDropPath):
    """A user's DropPath that forgets to divide kept samples by keep_prob."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.drop_prob)
        return x * mask


class DoubleRate(TimmDropPath):
    """Drops twice as often as its rate says."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1 - 2 * self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class DropsInEval(TimmDropPath):
    """Forgets ``if not self.training``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Elementwise(TimmDropPath):
    """nn.Dropout where a DropPath belongs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.drop_prob, self.training)


class WholeBatch(TimmDropPath):
    """Claims per-sample drops (timm's contract), drops the whole batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1 - self.drop_prob
        return x * (torch.rand(()) < keep).to(x.dtype) / keep


class UserBlock(nn.Module):
    def __init__(self, drop: nn.Module) -> None:
        super().__init__()
        self.f = mlp()
        self.drop_path = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.f(x))


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (NoRescale, "scale"),
        (DoubleRate, "rate"),
        (DropsInEval, "eval"),
        (Elementwise, "mask"),
        (WholeBatch, "mode"),
    ],
)
def test_wrong_droppath_classes(cls: type, code: str) -> None:
    model = stack(UserBlock(cls(0.2)), UserBlock(cls(0.2)))
    report = verify(model, example_inputs=(example(),))
    assert not report.ok and code in codes(report), [f.line() for f in report.findings]
    assert not any(c.ok for c in report.sites)
    fine = verify(stack(UserBlock(TimmDropPath(0.2))), example_inputs=(example(),))
    assert fine.ok, [f.line() for f in fine.findings]


class NotResidual(nn.Module):
    """Drops the block's whole output: a dropped sample becomes all zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.f = mlp()
        self.drop_path = TimmDropPath(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.f(x))


def test_droppath_on_a_non_residual_output() -> None:
    report = verify(stack(NotResidual(), TimmSlots(rate=0.1)), example_inputs=(example(),))
    assert codes(report) == {"not-residual"}
    assert [f.where for f in report.findings if f.severity == "error"] == ["0.drop_path"]


def test_library_blocks_are_warnings() -> None:
    """timm builds DropPath in EfficientNet-family blocks without a skip and never calls it."""
    import timm

    model = timm.create_model("mobilenetv3_small_050", drop_path_rate=0.2)
    report = verify(model, example_inputs=(torch.randn(2, 3, 64, 64),), draws=256)
    assert report.ok, [f.line() for f in report.errors]
    assert "never-called" in codes(report, "warning")


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"batch": 1}, "batch"),
        ({"draws": -1}, "draws"),
        ({"confidence": 1.0}, "confidence"),
        ({"ignore": ["nope"]}, "nope"),
        ({"declared": {}, "max_rate": 0.1}, "not both"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidValueError, match=match):
        verify(stack(TimmSlots()), example_inputs=(example(),), **kwargs)


def test_a_model_that_cannot_run() -> None:
    with pytest.raises(ProbeError, match="2x3"):  # not even on the meta device
        verify(stack(TimmSlots()), example_inputs=(torch.randn(2, 3),))


class Picky(nn.Module):
    """Runs on any shape-correct input except large values (so the probe passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = TimmSlots(rate=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().max()) > 10:
            raise ValueError("input out of range")
        return self.blk(x)


def test_a_model_that_fails_on_the_real_input() -> None:
    with pytest.raises(ModelRunError, match="out of range"):
        verify(Picky(), example_inputs=(torch.full((2, 4, 8), 100.0),))


class LibraryBlock(TimmSlots):
    """Stands in for a timm block whose sub-blocks share one rate (MaxViT, MobileViT)."""


LibraryBlock.__module__ = "timm.models.stand_in"


def test_plateaus_of_library_rules_are_warnings() -> None:
    model = stack(*(LibraryBlock(rate=r) for r in [0.0, 0.1, 0.1, 0.2, 0.2, 0.3]))
    report = verify(model, example_inputs=(example(),))
    assert report.ok and codes(report, "warning") == {"schedule"}
