"""Row subsets for compute-skipping: gather the rows that compute a branch, add the
result back. Memory formats are kept in both directions (BatchNorm and convolution
backward slow down several-fold on a gradient whose layout differs from their input's),
and rows are copied whole, at memcpy speed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["gather_rows", "scatter_add_rows"]


def _channels_last(x: Tensor) -> bool:
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _nhwc(x: Tensor) -> Tensor:
    """A channels_last NCHW tensor seen as the contiguous NHWC tensor it is in memory: rows
    (samples) are then contiguous blocks, which row gathers and adds copy fastest."""
    return x.permute(0, 2, 3, 1)


def _take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` on dim 0, channels_last kept, at memcpy speed."""
    if _channels_last(x):
        return _nhwc(x).index_select(0, index).permute(0, 3, 1, 2)
    return x.index_select(0, index)


def _add_rows_(out: Tensor, index: Tensor, rows: Tensor, alpha: float) -> Tensor:
    """``out[index] += alpha * rows`` in place, channels_last kept."""
    if _channels_last(out):
        _nhwc(out).index_add_(
            0, index, _nhwc(rows.contiguous(memory_format=torch.channels_last)), alpha=alpha
        )
        return out
    return out.index_add_(0, index, rows.contiguous(), alpha=alpha)


class _GatherRows(torch.autograd.Function):
    """``x[index]`` along dim 0 that keeps the memory format and whose backward is one
    ``index_add_`` (indexing's own backward, ``index_put`` with accumulation, is several
    times slower on CPU)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.meta = (x.shape, x.dtype, x.device, _channels_last(x))
        return _take_rows(x, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        shape, dtype, device, channels_last = ctx.meta
        # A dense gradient whatever the input's layout: an expanded input (a class token's
        # ``expand(B, -1, -1)``, stride 0 on the batch) cannot take row updates in place.
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt).zero_()
        return _add_rows_(out, index, grad.to(dtype), 1.0), None


class _ScatterAddRows(torch.autograd.Function):
    """``residual`` with ``alpha * branch`` added on rows ``index``; memory formats kept in
    both directions (BatchNorm and convolution backward slow down several-fold on a
    gradient whose layout differs from their input's)."""

    @staticmethod
    def forward(ctx: Any, residual: Tensor, branch: Tensor, index: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(index)
        ctx.alpha = alpha
        ctx.branch_cl = _channels_last(branch)
        return _add_rows_(residual.clone(), index, branch, alpha)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        (index,) = ctx.saved_tensors
        rows = _take_rows(grad, index)
        if ctx.branch_cl and not _channels_last(rows):
            rows = rows.contiguous(memory_format=torch.channels_last)
        return grad, rows * ctx.alpha if ctx.alpha != 1.0 else rows, None, None


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """The rows ``index`` of ``x`` (compute-skipping's subset), memory format kept."""
    return _GatherRows.apply(x, index)


def scatter_add_rows(residual: Tensor, branch: Tensor, index: Tensor, alpha: float) -> Tensor:
    """``residual`` with ``alpha * branch`` added on rows ``index`` (a new tensor)."""
    out: Tensor = _ScatterAddRows.apply(residual, branch, index, alpha)
    return out
