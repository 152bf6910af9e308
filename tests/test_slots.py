"""Native slots of every library: foreign DropPath classes recognised by behaviour, slots
that drop a whole block output (not a residual branch), and coverage of unslotted adds."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import check_invariants, mlp, run
from torch import nn

from dpatch import DropPath, find_sites, inject, inspect, retune, strip
from dpatch.analysis import is_slot_module, slot_settings


class MyDropPath(nn.Module):
    """A user's own copy of timm's DropPath (no dpatch, no timm)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep if self.scale_by_keep else x * mask


class StochasticDepth(nn.Module):
    """Another library's spelling: rate in ``p``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class NotASlot(nn.Module):
    """Named like a slot, but it holds weights: never swapped (keys would change)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop_prob = 0.1
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


NotASlot.__name__ = "WeightedDropPath"


class Block(nn.Module):
    def __init__(self, slot: nn.Module) -> None:
        super().__init__()
        self.f = mlp()
        self.drop_path = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.f(x))


def test_foreign_classes_are_recognised_by_behaviour() -> None:
    assert is_slot_module(MyDropPath(0.2)) and slot_settings(MyDropPath(0.2)).rate == 0.2
    assert slot_settings(MyDropPath(0.1, scale_by_keep=False)).scaling == "none"
    assert is_slot_module(StochasticDepth(0.3)) and slot_settings(StochasticDepth(0.3)).rate == 0.3
    assert not is_slot_module(NotASlot())
    assert not is_slot_module(nn.Dropout(0.1))  # a rate, but not stochastic depth


def test_foreign_slots_are_native_sites_read_and_set() -> None:
    x = torch.randn(4, 4, 8)
    model = nn.Sequential(
        Block(MyDropPath(0.1)), Block(StochasticDepth(0.2)), Block(MyDropPath(0.3))
    )
    sites = find_sites(model, (x,))
    assert [(s.name, s.kind, s.rate) for s in sites] == [
        ("0.drop_path", "native", 0.1),
        ("1.drop_path", "native", 0.2),
        ("2.drop_path", "native", 0.3),
    ]
    ref = copy.deepcopy(model)
    originals = [model[i].drop_path for i in range(3)]
    reports = []
    problems = list(
        check_invariants(model, x, lambda m: reports.append(retune(m, 0.4, schedule="uniform")))
    )
    assert problems == []
    assert [s.rate for s in reports[0].sites] == [0.4] * 3 and reports[0].changed
    assert all(isinstance(model[i].drop_path, DropPath) for i in range(3))
    assert list(model.state_dict()) == list(ref.state_dict())
    strip(model)
    assert [model[i].drop_path for i in range(3)] == originals  # the user's own modules


class OutputDrop(nn.Module):
    """MobileViT/VoVNet style: the slot drops the block's whole output; no residual."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.f = mlp()
        self.drop_path = DropPath(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.f(x))


class Residual(nn.Module):
    def __init__(self, rate: float) -> None:
        super().__init__()
        self.f = mlp()
        self.drop_path = DropPath(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.f(x))


def test_a_slot_on_no_residual_is_a_site_marked_so() -> None:
    x = torch.randn(4, 4, 8)
    model = nn.Sequential(Residual(0.1), OutputDrop(0.2), Residual(0.3))
    report = inject(model, 0.3, schedule="linear", skip=True, example_inputs=(x,))
    got = [(s.name, s.residual, s.fused, s.skip) for s in report.sites]
    assert got == [
        ("0.drop_path", True, True, True),
        ("1.drop_path", False, False, False),
        ("2.drop_path", True, True, True),
    ]
    assert [s.rate for s in report.sites] == pytest.approx([0.0, 0.15, 0.3])
    assert model[1].drop_path.drop_prob == pytest.approx(0.15)  # the schedule reached it
    assert report.to_dict()["sites"][1]["residual"] is False
    assert any(s.path == "1.drop_path" and "not on a residual" in s.reason for s in report.skipped)


class MixedBlock(nn.Module):
    """Hugging Face Swin style: the attention branch has a slot, the MLP branch has none."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp = mlp(), mlp()
        self.drop_path = DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.mlp(x)


def test_coverage_all_adds_unslotted_residuals() -> None:
    x = torch.randn(4, 4, 8)
    model = nn.Sequential(MixedBlock(), MixedBlock())
    slots = inspect(model, (x,))
    assert [s.name for s in slots.sites] == ["0.drop_path", "1.drop_path"]
    notes = [s for s in slots.skipped if "without a slot" in s.reason]
    assert [s.path for s in notes] == ["0", "1"] and "drop_path1" in notes[0].reason
    ref = run(model, x, train=False)
    report = inject(model, 0.2, coverage="all", example_inputs=(x,))
    assert [(s.name, s.kind) for s in report.sites] == [
        ("0.drop_path", "native"),
        ("0.drop_path1", "graph"),
        ("1.drop_path", "native"),
        ("1.drop_path1", "graph"),
    ]
    assert all(s.fused for s in report.sites)
    assert torch.equal(run(model, x, train=False), ref)
    # back to the model's own slots: the added ones go
    report = inject(model, 0.2, example_inputs=(x,))
    assert [s.name for s in report.sites] == ["0.drop_path", "1.drop_path"]
    assert not hasattr(model[0], "drop_path1")
    with pytest.raises(ValueError, match="unknown coverage 'most'"):
        inspect(model, (x,), coverage="most")
