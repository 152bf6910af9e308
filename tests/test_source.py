"""Blocks whose forward branches on shapes: traced with value-carrying proxies, rewritten at
source level, control flow kept for every input shape."""

from __future__ import annotations

import functools
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp, run
from torch import nn

from dpatch import DropPath, inject, strip
from dpatch.marks import block_meta


class Windowed(nn.Module):
    """TinyViT-style: shape unpacking, a branch on the sequence length, a native slot."""

    def __init__(self, c: int = 8, window: int = 4) -> None:
        super().__init__()
        self.window = window
        self.f, self.g = mlp(c), mlp(c)
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, N, _ = x.shape  # unpacking a shape: plain torch.fx cannot trace this
        shortcut = x
        if N % self.window:
            pad = self.window - N % self.window
            x = F.pad(x, (0, 0, 0, pad))
            x = self.f(x)[:, :N]
        else:
            x = self.f(x)
        x = shortcut + self.drop_path(x)
        out = self.g(x)
        out += x
        return out


class TupleChild(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x), x.mean()


class HFStyle(nn.Module):
    """Hugging Face style: a child returning a tuple, unpacked; ``**kwargs``; in-place add."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.attention = TupleChild(c)
        self.mlp = mlp(c)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: object):
        residual = hidden
        hidden, _ = self.attention(hidden)
        hidden = hidden + residual
        residual = hidden
        hidden = self.mlp(hidden)
        return hidden.add_(residual)


class Base(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.f = mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


class UsesSuper(Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0:
            return x + super().forward(x)
        return x


def test_shape_branching_block_is_rewritten_and_keeps_both_paths() -> None:
    torch.manual_seed(0)
    block = Windowed()
    even, odd = torch.randn(3, 8, 8), torch.randn(3, 6, 8)
    ref_even, ref_odd = run(block, even, train=False), run(block, odd, train=False)
    report = inject(block, 0.5, schedule="uniform", coverage="all", example_inputs=(even,))
    assert [(s.branch, s.kind, s.fused) for s in report.sites] == [
        ("drop_path", "native", True),
        ("drop_path1", "graph", True),
    ]
    meta = block_meta(block)
    assert meta is not None and meta.code.in_place
    src = meta.code.functions[0][1]
    assert "if N % self.window:" in src  # the control flow is still there
    assert "x = self.drop_path(x, shortcut)" in src
    assert "out = self.drop_path1(self.g(x), out)" not in src  # out += x: branch is `out`
    assert "out = self.drop_path1(out, x, branch_first=True)" in src
    # eval is the unpatched computation, on the probed shape and on the other path
    assert torch.equal(run(block, even, train=False), ref_even)
    assert torch.equal(run(block, odd, train=False), ref_odd)
    # training drops: some samples lose the branches on the other path too
    block.train()
    torch.manual_seed(1)
    with torch.no_grad():
        out = block(torch.randn(64, 6, 8))
    assert out.shape == (64, 6, 8) and not torch.isnan(out).any()


def test_skip_is_declined_with_a_reason() -> None:
    block = Windowed()
    report = inject(block, 0.3, skip=True, coverage="all", example_inputs=(torch.randn(2, 8, 8),))
    assert not any(s.skip for s in report.sites) and all(s.fused for s in report.sites)
    assert all("branches on shapes" in s.reason for s in report.skipped)


def test_hf_style_tuple_unpacking_kwargs_and_inplace_add() -> None:
    torch.manual_seed(0)
    block = HFStyle()
    x = torch.randn(2, 5, 8)
    ref = run(block, x, train=False)
    report = inject(block, 0.2, example_inputs=(x,))
    assert [(s.branch, s.fused) for s in report.sites] == [
        ("drop_path1", True),
        ("drop_path2", True),
    ]
    src = block_meta(block).code.functions[0][1]  # type: ignore[union-attr]
    # add_ kept in place; the branch came first, and keeps its place (its memory layout)
    assert "(hidden := self.drop_path2(hidden, residual, branch_first=True))" in src
    assert torch.equal(run(block, x, train=False), ref)
    assert torch.equal(run(block, x, train=False), run(block, (x,), train=False))


def auto_docstring(fn):  # type: ignore[no-untyped-def]
    """Stands for transformers' decorator of that name: it only writes a docstring."""
    wrapper = functools.wraps(fn)(lambda *a, **k: fn(*a, **k))
    wrapper.__doc__ = "documented"
    return wrapper


def doubles(fn):  # type: ignore[no-untyped-def]
    """A decorator that changes what the forward returns."""
    return functools.wraps(fn)(lambda *a, **k: 2 * fn(*a, **k))


class SlotApart(nn.Module):
    """Hugging Face's QianfanOCR layer: the slot in a statement of its own before the sum,
    a docstring decorator, tuple unpacking."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.attention = TupleChild(c)
        self.mlp = mlp(c)
        self.drop_path1 = nn.Identity()
        self.drop_path2 = nn.Identity()

    @auto_docstring
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        _, n, _ = hidden.shape
        if n % 2:  # plain torch.fx cannot trace a branch on a shape: rewritten at source level
            hidden = hidden * 1.0
        residual = hidden
        hidden, _ = self.attention(hidden)
        hidden = self.drop_path1(hidden)
        hidden = hidden + residual
        return self.drop_path2(self.mlp(hidden)) + hidden


class Doubled(SlotApart):
    @doubles
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        _, n, _ = hidden.shape
        if n % 2:
            hidden = hidden * 1.0
        residual = hidden
        hidden, _ = self.attention(hidden)
        return self.drop_path2(self.mlp(hidden)) + residual


def test_slot_in_its_own_statement_and_a_docstring_decorator() -> None:
    torch.manual_seed(0)
    block = SlotApart()
    x = torch.randn(2, 5, 8)
    ref = run(block, x, train=False)
    report = inject(block, 0.3, schedule="uniform", example_inputs=(x,))
    assert [(s.branch, s.kind, s.fused) for s in report.sites] == [
        ("drop_path1", "native", True),
        ("drop_path2", "native", True),
    ]
    src = block_meta(block).code.functions[0][1]  # type: ignore[union-attr]
    assert "@" not in src and "hidden = hidden\n" in src
    assert "hidden = self.drop_path1(hidden, residual, branch_first=True)" in src
    assert torch.equal(run(block, x, train=False), ref)
    block.train()
    torch.manual_seed(0)
    out = block(torch.randn(64, 5, 8))
    assert out.shape == (64, 5, 8)


def test_a_decorator_that_changes_behaviour_is_applied_again() -> None:
    torch.manual_seed(0)
    block = Doubled()
    x = torch.randn(2, 5, 8)
    ref = run(block, x, train=False)
    report = inject(block, 0.2, example_inputs=(x,))
    assert [s.fused for s in report.sites] == [True]
    src = block_meta(block).code.functions[0][1]  # type: ignore[union-attr]
    assert src.startswith("@doubles\ndef forward(")
    assert torch.equal(run(block, x, train=False), ref)  # still doubled


def test_a_decorator_that_cannot_be_evaluated_again_keeps_the_block_unfused() -> None:
    def local(fn):  # type: ignore[no-untyped-def]
        return functools.wraps(fn)(lambda *a, **k: fn(*a, **k))

    class Local(SlotApart):
        @local
        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            _, n, _ = hidden.shape
            if n % 2:
                hidden = hidden * 1.0
            residual = hidden
            hidden, _ = self.attention(hidden)
            return self.drop_path2(self.mlp(hidden)) + residual

    block = Local()
    x = torch.randn(2, 5, 8)
    ref = run(block, x, train=False)
    report = inject(block, 0.2, example_inputs=(x,))
    assert [s.fused for s in report.sites] == [False]
    assert any("@local cannot be applied again" in s.reason for s in report.skipped)
    assert torch.equal(run(block, x, train=False), ref)


def test_zero_argument_super_still_works() -> None:
    torch.manual_seed(0)
    block = UsesSuper()
    x = torch.randn(4, 8)
    ref = run(block, x, train=False)
    report = inject(block, 0.5, example_inputs=(x,))
    assert report.sites[0].fused and block_meta(block).code.in_place  # type: ignore[union-attr]
    assert torch.equal(run(block, x, train=False), ref)
    block.train()
    torch.manual_seed(2)
    out = block(torch.randn(64, 8))
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_source_rewritten_blocks_pickle_and_strip() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Windowed(), Windowed())
    x = torch.randn(2, 6, 8)
    ref = run(model, x, train=False)
    inject(model, 0.3, coverage="all", example_inputs=(torch.randn(2, 8, 8),))
    again = pickle.loads(pickle.dumps(model))
    assert type(again[0]) is type(model[0])  # one class for both, rebuilt once
    assert torch.equal(run(again, x, train=False), ref)
    assert isinstance(again[1].drop_path1, DropPath)
    strip(again)
    assert type(again[0]) is Windowed and torch.equal(run(again, x, train=False), ref)


def _helper_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y


def dropout_add(x: torch.Tensor, residual: torch.Tensor, prob: float, training: bool):  # type: ignore[no-untyped-def]
    """transformers' Falcon and BLOOM: the residual sum in a function of their module."""
    out = F.dropout(x, p=prob, training=training)
    out = residual + out
    return out


class AddInHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = mlp()
        self.g = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0]:
            x = _helper_add(x, self.f(x))
        return dropout_add(self.g(x), x, 0.0, training=self.training)


def test_an_addition_in_a_helper_function_goes_through_a_copy_of_it() -> None:
    torch.manual_seed(0)
    block = AddInHelper()
    x = torch.randn(2, 8)
    ref = run(block, x, train=False)
    report = inject(block, 0.5, schedule="uniform", example_inputs=(x,))
    assert [s.fused for s in report.sites] == [True, True]
    src = block_meta(block).code.functions[0][1]  # type: ignore[union-attr]
    assert "_dpatch_slot=self.drop_path2)" in src and "out = _dpatch_slot(out, residual)" in src
    assert torch.equal(run(block, x, train=False), ref)
    assert torch.equal(block(x), ref)  # the module's own dropout_add is untouched
    block.train()
    with torch.no_grad():
        block.drop_path1.drop_prob = 1.0
        block.drop_path2.drop_prob = 1.0
        y = torch.randn(4, 8)
        assert torch.equal(block(y), y)  # both branches dropped: the shortcut alone


class AddInForeignHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0]:
            return functools.reduce(torch.add, [x, self.f(x)])
        return x


def test_an_addition_in_another_modules_function_is_reported_not_patched() -> None:
    block = AddInForeignHelper()
    x = torch.randn(2, 8)
    ref = run(block, x, train=False)
    report = inject(block, 0.2, example_inputs=(x,))
    assert report.sites and not report.sites[0].fused
    assert any("not an addition written in its forward" in s.reason for s in report.skipped)
    assert torch.equal(run(block, x, train=False), ref)


@pytest.mark.zoo
def test_timm_tiny_vit_every_site_fused() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tiny_vit_5m_224").eval()
    x = torch.randn(1, 3, 224, 224)
    ref = run(model, x, train=False)
    report = inject(model, 0.2)
    assert len(report.sites) == 22 and all(s.fused for s in report.sites)
    assert torch.equal(run(model, x, train=False), ref)


class SliceMasked(nn.Module):
    """transformers 4's Swin builds its shifted-window mask by slice assignment into a tensor
    made with the input's dtype and device (``mask[:, rows, cols] = count``), then adds a
    branch that reads the mask: the assignment must trace (value-carrying), and the mask
    counts as data the branch reads, not a second input."""

    def __init__(self, c: int = 8, shift: int = 1) -> None:
        super().__init__()
        self.shift = shift
        self.f = mlp(c)
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, n, _ = x.shape
        mask = torch.zeros((1, n, 1), dtype=x.dtype, device=x.device)
        if self.shift > 0:
            for count, rows in enumerate((slice(0, -self.shift), slice(-self.shift, None))):
                mask[:, rows, :] = count
        return x + self.drop_path(self.f(x) * (1 + mask))


def test_slice_assignment_in_a_forward_traces() -> None:
    import copy

    for shift in (1, 2, 0):  # one class, several settings; 0 takes the other path
        torch.manual_seed(shift)
        model = nn.Sequential(SliceMasked(shift=shift), SliceMasked(shift=shift + 1))
        reference = copy.deepcopy(model)
        report = inject(model, 0.2, example_inputs=(torch.randn(2, 6, 8),))
        assert len(report.sites) == 2 and not report.skipped, report.skipped
        assert all(s.fused for s in report.sites)  # traced: the slot is on a known addition
        for x in (torch.randn(2, 6, 8), torch.randn(3, 9, 8)):  # another length too
            assert torch.equal(run(model, x, train=False), run(reference, x, train=False))
