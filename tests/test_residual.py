"""The residual rules, one test id per way of writing an addition, each with its verdict.

Each case is a one-block model whose ``forward`` spells one addition; the verdict is the
number of residual sites :func:`dpatch.find_sites` must report (0: not a residual).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpatch import DropPath, find_sites, inject

C = 8


class Case(nn.Module):
    """A block with two small learned layers ``f`` and ``g``, a layer scale, a position
    embedding and a bias; ``body`` spells the addition under test."""

    def __init__(self, body: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.f = nn.Linear(C, C)
        self.g = nn.Linear(C, C)
        self.proj = nn.Linear(C, C)
        self.gamma = nn.Parameter(torch.full((C,), 0.1))
        self.pos = nn.Parameter(torch.zeros(1, 4, C))
        self.bias = nn.Parameter(torch.zeros(C))
        self.body = body

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self.body(self, x, other)


def _inplace(s: Case, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    out = s.f(x)
    out += x
    return out


def _res2net(s: Case, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    y = F.pad(a, (0, C // 2))  # two channel groups of one tensor meet only at the split
    return s.f(y)[..., : C // 2] + b


def _attention_mask(s: Case, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    scores = s.f(x) @ s.g(x).transpose(-1, -2)  # (B, N, N) logits
    return (scores + o[..., :4]).softmax(-1)


def _item_twice(s: Case, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    t = x.split(C, dim=-1)  # a tuple of one tensor; ``t[0]`` read twice: two nodes
    return s.f(t[0]) + t[0]


def _phi(s: Case, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    return s.proj(s.f(x)) + s.g(x) + x


def _cohere(s: Case, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    return x + s.proj(s.f(x)) + s.g(x)


CASES: dict[str, tuple[Callable[..., torch.Tensor], int]] = {
    # residual additions
    "x + f(x)": (lambda s, x, o: x + s.f(x), 1),
    "f(x) + x": (lambda s, x, o: s.f(x) + x, 1),
    "torch.add(x, f(x))": (lambda s, x, o: torch.add(x, s.f(x)), 1),
    "torch.add(f(x), x)": (lambda s, x, o: torch.add(s.f(x), x), 1),
    "out += x": (_inplace, 1),
    "f(x).add_(x)": (lambda s, x, o: s.f(x).add_(x), 1),
    "x.add(f(x))": (lambda s, x, o: x.add(s.f(x)), 1),
    "torch.add(x, f(x), alpha=0.5)": (lambda s, x, o: torch.add(x, s.f(x), alpha=0.5), 1),
    "x + gamma * f(x) (layer scale)": (lambda s, x, o: x + s.gamma * s.f(x), 1),
    "relu(x + f(x))": (lambda s, x, o: F.relu(x + s.f(x)), 1),
    "proj(x) + f(g(x)) (projection shortcut)": (lambda s, x, o: s.proj(x) + s.f(s.g(x)), 1),
    "shortcut passed in: f(h) + other": (lambda s, x, o: s.f(x) + o, 1),
    "two residuals: x + f(x), then + g(.)": (lambda s, x, o: (y := x + s.f(x)) + s.g(y), 2),
    "f(t[0]) + t[0], one tuple item taken twice (ALBERT)": (_item_twice, 1),
    "proj(f(x)) + g(x) + x, parallel branches then the shortcut (Phi, GPT-J)": (_phi, 1),
    "x + proj(f(x)) + g(x), a second branch onto the stream (Cohere)": (_cohere, 2),
    # additions that are not residual
    "x + pos_embed": (lambda s, x, o: x + s.pos, 0),
    "x + bias": (lambda s, x, o: x + s.bias, 0),
    "f(x) + g(x) (equal parallel branches)": (lambda s, x, o: s.f(x) + s.g(x), 0),
    "x + x": (lambda s, x, o: x + x, 0),
    "torch.add(f(x), x, alpha=0.5) (scaled shortcut)": (
        lambda s, x, o: torch.add(s.f(x), x, alpha=0.5),
        0,
    ),
    "x + 1 (a constant)": (lambda s, x, o: s.f(x) + 1, 0),
    "f(x).sum(-1, keepdim=True) + x (broadcast, not same shape)": (
        lambda s, x, o: s.f(x).sum(-1, keepdim=True) + x,
        0,
    ),
    "Res2Net channel groups": (_res2net, 0),
    "f(x) + g(ones on f(x).device) (a metadata read is no data flow)": (
        lambda s, x, o: (y := s.f(x)) + s.g(torch.ones(2, 4, C, device=y.device)),
        0,
    ),
    "attention logits + mask argument": (_attention_mask, 0),
}


@pytest.mark.parametrize(("body", "verdict"), list(CASES.values()), ids=list(CASES))
def test_residual_verdict(body: Callable[..., torch.Tensor], verdict: int) -> None:
    x, other = torch.randn(2, 4, C), torch.randn(2, 4, C)
    sites = find_sites(Case(body), (x, other))
    assert len(sites) == verdict, [s.name for s in sites]
    assert all(s.kind == "graph" and s.path == "" for s in sites)


@pytest.mark.parametrize("body", [_phi, _cohere], ids=["Phi", "Cohere"])
def test_parallel_branches_are_the_branches_and_x_the_shortcut(
    body: Callable[..., torch.Tensor],
) -> None:
    """At rate 1 every branch is dropped: the block returns its shortcut ``x`` exactly (a
    branch taken for the shortcut would survive)."""
    torch.manual_seed(0)
    block = Case(body)
    x, other = torch.randn(4, 4, C), torch.randn(4, 4, C)
    inject(block, 0.5, schedule="uniform", example_inputs=(x, other))
    for m in block.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 1.0
    block.train()
    with torch.no_grad():
        assert torch.equal(block(x, other), x)
