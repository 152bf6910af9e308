"""Randomly built networks, each with a known number of residual branches: one class used at
several depths and attribute values, loops over ``ModuleList``s of other lengths, class
tokens expanded over the batch under compute-skipping, two-tower models whose second tower
the inferred input never reaches, and blocks tracing cannot follow. For every seed: the
sites found are exactly the residual branches built, eval output is bit-identical after
inject (the shared ``conftest`` check), a skipping training step runs forward and backward,
and what could not be analysed or reached is said, never silent."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import dpatch
from dpatch.errors import UnanalysedError

C = 8  # channels of every token


class Looped(nn.Module):
    """``for f in self.fs: x = x + f(x)``: one class, a different depth per instance."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.fs = nn.ModuleList(nn.Linear(C, C) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.fs:
            x = x + f(x)
        return x


class Pairs(nn.Module):
    """lucidrains-style: ``for attn, ff in self.layers: x = attn(x) + x; x = ff(x) + x``."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([nn.Linear(C, C), nn.Sequential(nn.Linear(C, C), nn.GELU())])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class Heads(nn.Module):
    """A forward that reads a child's plain attribute (its number of heads) into shapes."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.attn = nn.Linear(C, C)
        self.attn.heads = heads  # type: ignore[assignment]
        self.norm = nn.LayerNorm(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.attn.heads
        y = self.attn(self.norm(x)).reshape(b, n, h, c // h).flip(2).reshape(b, n, c)
        return x + y


class Scaled(nn.Module):
    """Its own plain attributes decide the forward: a flag and a scale."""

    def __init__(self, gated: bool, scale: float) -> None:
        super().__init__()
        self.gated, self.scale = gated, scale
        self.f = nn.Linear(C, C)
        self.g = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.scale * self.f(x)
        if self.gated:
            x = x + self.g(x)
        return x


class ClsToken(nn.Module):
    """A branch on a class token expanded over the batch (stride 0 on the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.f = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls.expand(x.shape[0], -1, -1)
        return torch.cat([cls + self.f(cls), x[:, 1:]], dim=1)


class ValueBranch(nn.Module):
    """Branches on a tensor's value: tracing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x + self.f(x)
        return x + 2 * self.f(x)


@dataclass
class Built:
    model: nn.Module
    sites: int  # residual branches the analysed part holds
    untraceable: int  # blocks that cannot be traced (their branches are unknown)
    unreached: list[str]  # modules holding parameters no input reaches, in order


def _block(rng: random.Random) -> tuple[nn.Module, int, int]:
    kind = rng.choice(["looped", "pairs", "heads", "scaled", "cls", "value"])
    if kind == "looped":
        depth = rng.randint(1, 4)
        return Looped(depth), depth, 0
    if kind == "pairs":
        depth = rng.randint(1, 3)
        return Pairs(depth), 2 * depth, 0
    if kind == "heads":
        return Heads(rng.choice([1, 2, 4, 8])), 1, 0
    if kind == "scaled":
        gated = rng.random() < 0.5
        return Scaled(gated, rng.choice([0.5, 1.0, 2.0])), 1 + int(gated), 0
    if kind == "cls":
        return ClsToken(), 1, 0
    return ValueBranch(), 0, 1


class Tower(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class TwoTower(nn.Module):
    """CLIP-style: ``forward(tokens=None, other=None)``; the probe's input reaches one."""

    def __init__(self, first: Tower, second: Tower) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(
        self, tokens: torch.Tensor | None = None, other: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.first(tokens) if tokens is not None else torch.zeros(())
        if other is not None:
            out = out + self.second(other).mean()
        return out


def build(seed: int) -> Built:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if seed % 8 == 7:  # nothing tracing can follow: never "no residual branch"
        n = rng.randint(1, 3)
        return Built(Tower([ValueBranch() for _ in range(n)]), 0, n, [])
    blocks, sites, untraceable, idle = [], 0, 0, []
    for i in range(rng.randint(2, 6)):
        block, s, u = _block(rng)
        blocks.append(block)
        sites, untraceable = sites + s, untraceable + u
        if isinstance(block, Scaled) and not block.gated:
            idle.append(f"blocks.{i}.g")  # built, never used by its forward
    tower = Tower(blocks)
    if rng.random() < 0.3:
        other = Tower([Looped(rng.randint(1, 3))])
        unreached = [f"first.{p}" for p in idle] + ["second"]
        return Built(TwoTower(tower, other), sites, untraceable, unreached)
    return Built(tower, sites, untraceable, idle)


@pytest.mark.parametrize("seed", range(32))
def test_random_networks(seed: int) -> None:
    built = build(seed)
    x = torch.randn(4, 5, C)
    skip = seed % 2 == 0
    if built.sites == 0 and built.untraceable:
        for allow_empty in (True, False):
            with pytest.raises(UnanalysedError, match=f"{built.untraceable} of its blocks"):
                dpatch.inject(built.model, 0.3, skip=skip, example_inputs=(x,),
                              allow_empty=allow_empty)  # fmt: skip
        return
    report = dpatch.inject(built.model, 0.3, schedule="uniform", skip=skip, example_inputs=(x,))
    assert len(report.sites) == built.sites, (seed, built.model)
    assert sum("could not trace" in s.reason for s in report.skipped) == built.untraceable
    assert [u.path for u in report.unreached] == built.unreached
    # a training step, skipping where the block allows
    built.model.train()
    built.model(x).sum().backward()
    grads = [p.grad for p in built.model.parameters() if p.requires_grad]
    reached = [g for g in grads if g is not None]
    assert reached and all(torch.isfinite(g).all() for g in reached)
