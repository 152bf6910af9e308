"""Finding residual sites (read-only) on hand-written models."""

from __future__ import annotations

import torch
from helpers import TimmSlots, example, snapshot
from torch import nn

from dpatch import DropPath, Site, find_sites
from dpatch.patching import inspect

EXPECTED = [
    # (module path, number of sites, block index)
    ("stage.0", 1, 0),
    ("stage.1.0", 1, 1),
    ("stage.1.1", 1, 2),
    ("shared", 1, 3),
    ("blocks.0", 2, 4),
    ("blocks.1", 2, 5),
    ("blocks.2", 2, 6),
    ("blocks.3", 1, 7),
    ("blocks.3.output", 1, 7),  # HF-style: an output module nested in its layer
    ("head", 1, 8),
]


def test_every_spelling_is_found_once(net: nn.Module) -> None:
    sites = find_sites(net, (example(),))
    got: dict[str, list[Site]] = {}
    for s in sites:
        got.setdefault(s.path, []).append(s)
    assert {p: (len(v), v[0].block) for p, v in got.items()} == {p: (n, b) for p, n, b in EXPECTED}
    assert all(s.kind == "graph" and s.rate == 0.0 and not s.fused for s in sites)
    assert len({s.name for s in sites}) == len(sites)
    # Names follow timm: one site -> drop_path, two -> drop_path1, drop_path2.
    assert [s.branch for s in got["blocks.0"]] == ["drop_path1", "drop_path2"]
    assert got["head"][0].branch == "drop_path"


def test_find_sites_is_read_only(net: nn.Module) -> None:
    before = snapshot(net)
    classes = {n: type(m) for n, m in net.named_modules()}
    dicts = {n: set(m.__dict__) for n, m in net.named_modules()}
    find_sites(net, (example(),))
    assert {n: type(m) for n, m in net.named_modules()} == classes
    assert {n: set(m.__dict__) for n, m in net.named_modules()} == dicts
    assert all(not m._forward_pre_hooks for m in net.modules())
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


class Reordered(nn.Module):
    """Registered b, a; called a, b: depth follows the call order."""

    def __init__(self) -> None:
        super().__init__()
        from helpers import PlainRes

        self.b = PlainRes()
        self.a = PlainRes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_depth_follows_execution_not_registration() -> None:
    sites = find_sites(Reordered(), (example(),))
    assert [(s.path, s.block) for s in sites] == [("a", 0), ("b", 1)]


def test_native_timm_slots() -> None:
    model = nn.Sequential(TimmSlots(rate=0.0), TimmSlots(rate=0.2))
    sites = find_sites(model, (example(),))
    assert [(s.name, s.kind, s.rate) for s in sites] == [
        ("0.drop_path1", "native", 0.0),
        ("0.drop_path2", "native", 0.0),
        ("1.drop_path1", "native", 0.2),
        ("1.drop_path2", "native", 0.2),
    ]


class UnusedSlot(nn.Module):
    """EfficientNet-style: the slot exists, the block has no skip, so it is never called."""

    def __init__(self, has_skip: bool) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)
        self.has_skip = has_skip
        self.drop_path = DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_skip:
            return x + self.drop_path(self.f(x))
        return self.f(x)


def test_unused_slot_is_not_a_site() -> None:
    model = nn.Sequential(UnusedSlot(False), UnusedSlot(True))
    sites = find_sites(model, (example(),))
    assert [(s.name, s.kind, s.rate) for s in sites] == [("1.drop_path", "native", 0.1)]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return x + self.f(x)
        return x - self.f(x)


def test_untraceable_block_is_reported_and_the_rest_still_found() -> None:
    from helpers import PlainRes

    model = nn.Sequential(PlainRes(), DataDependent(), PlainRes())
    report = inspect(model, (example(),))
    assert [s.path for s in report.sites] == ["0", "2"]
    assert [s.path for s in report.skipped] == ["1"]
    assert "trace" in report.skipped[0].reason


def test_model_without_residuals_reports_zero_sites_cleanly() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    report = inspect(model, (example(),))
    assert report.sites == () and report.skipped == () and report.expected_depth == 0.0


def test_site_to_dict_round_trip() -> None:
    s = Site("a.b", "drop_path", 3, "graph", 0.1, slot="a.b.drop_path", fused=True)
    assert Site(**s.to_dict()) == s and s.name == "a.b.drop_path"
