"""Row subsets for compute-skipping on any input layout: gathered rows and their gradients
equal plain indexing's, for contiguous, expanded (stride 0 on the batch), transposed and
channels_last inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import dpatch
from dpatch.rows import gather_rows, scatter_add_rows

LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda t: t,
    "expanded": lambda t: t[:1].expand(t.shape[0], *t.shape[1:]),  # a class token
    "transposed": lambda t: t.transpose(1, 2),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gather_rows_and_its_gradient_match_indexing(layout: str) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 3, 4, 6, generator=g)
    index = torch.tensor([4, 0, 2])
    weight = torch.randn(3, *LAYOUTS[layout](base).shape[1:], generator=g)
    grads = []
    for gather in (gather_rows, lambda x, i: x[i]):
        leaf = base.clone().requires_grad_()
        x = LAYOUTS[layout](leaf)
        rows = gather(x, index)
        assert torch.equal(rows, x.detach()[index])
        (rows * weight).sum().backward()
        assert leaf.grad is not None
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scatter_add_rows_on_any_residual_layout(layout: str) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 3, 4, 6, generator=g)
    index = torch.tensor([1, 3])
    leaf = base.clone().requires_grad_()
    residual = LAYOUTS[layout](leaf)
    branch = torch.randn(2, *residual.shape[1:], generator=g, requires_grad=True)
    out = scatter_add_rows(residual, branch, index, 2.5)
    ref = torch.index_add(residual.detach().contiguous(), 0, index, branch.detach(), alpha=2.5)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert leaf.grad is not None and branch.grad is not None
    assert torch.equal(branch.grad, torch.full_like(branch, 2.5))


class ClsToken(nn.Module):
    """A branch on an expanded class token (ViT-style ``cls.expand(B, -1, -1)``)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.f = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls.expand(x.shape[0], -1, -1)
        return torch.cat([cls + self.f(cls), x], dim=1)


def test_skip_trains_through_an_expanded_class_token() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ClsToken())
    x = torch.randn(6, 3, 8)
    report = dpatch.inject(model, 0.5, schedule="uniform", skip=True, example_inputs=(x,))
    assert [s.skip for s in report.sites] == [True]
    model.train()
    model(x).sum().backward()
    cls_grad = model[0].cls.grad
    assert cls_grad is not None and cls_grad.shape == (1, 1, 8)
    # every row keeps the shortcut's gradient (1 per row) plus the computed rows' branch
    # gradient: the class token's gradient sums all six rows
    assert torch.all(cls_grad.abs() > 0)
