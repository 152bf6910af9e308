"""Triton kernels behind ``drop_add`` on CUDA, registered as ``torch.library`` custom ops.

Two ops, each one pass over memory with float32 arithmetic:

- ``dpatch::drop_add(x, branch, row_scale)`` is ``x + branch * row_scale[row]``, the
  residual add with stochastic depth; ``row_scale`` (float32, shape ``(B,)``) is the keep
  mask times the scale of each sample. Its backward is ``grad`` itself for ``x`` (no copy)
  and ``dpatch::scale_rows`` for ``branch``.
- ``dpatch::scale_rows(x, row_scale, dtype)`` is ``(x * row_scale[row]).to(dtype)``.

Both are registered with a fake (meta) implementation and an autograd formula, so eager
code, ``torch.compile(fullgraph=True)`` and ``torch.export`` each see one op and no graph
break. Importing this module registers them (``dpatch.droppath`` imports it on first use).

Layouts: the kernels walk memory linearly, so they take any dense tensor whose dim 0 is
outermost in memory (contiguous, ``channels_last``, ``channels_last_3d``, inner dims
permuted): sample ``r`` then fills one block ``[r * inner, (r + 1) * inner)`` with
``inner = numel / B``. When ``x`` and ``branch`` share such strides the kernel reads them
in place and the output gets the same strides. Otherwise the ops still give the right
answer: the other operand is first copied into that layout (or both into the contiguous
one when neither has it), which costs an extra pass; ``drop_add`` in
``dpatch.droppath`` therefore sends only the in-place case here (:func:`supports`).

Devices: CUDA tensors run the compiled kernel; CPU tensors run the same kernel in Triton's
interpreter (what ``TRITON_INTERPRET=1`` does, here chosen per call so one process can hold
both), which is exact but slow and meant for tests. Other devices, other dtypes or a
missing Triton fall back to the same formula in eager PyTorch.

A dropped sample (``row_scale[r] == 0``) does not read its branch at all: its output is
``x`` exactly, where eager ``x + branch * 0`` would turn an inf or NaN in a dropped branch
into NaN.

Self-check: the kernels have been tested exactly in Triton's interpreter, not on every GPU
and Triton release. So before ``drop_add`` first sends a case (device, dtypes, memory
layout) to them, :func:`self_check` runs them once on small tensors of that case, forward
and backward, against ``torch.addcmul``. A mismatch or an error (a compile failure, say)
makes that case use ``addcmul`` from then on, with one warning naming ``DPATCH_KERNELS``;
the verdicts are kept for the process (:func:`self_checks`, shown by ``dpatch env``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

try:  # Triton is optional: without it every op takes the eager formula.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the test environment has Triton
    triton = None
    tl = None

__all__ = [
    "DTYPES",
    "SelfCheck",
    "available",
    "check_case",
    "clear_self_checks",
    "fused_drop_add",
    "known_check",
    "scale_rows",
    "self_check",
    "self_checks",
    "supports",
]

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

# A CUDA grid's second axis holds at most 65535 programs: one per sample in row mode.
_MAX_ROWS = 65535
_NUM_WARPS = 4


def available() -> bool:
    """True when Triton can be imported (the kernels can run)."""
    return triton is not None


def _dim0_outer(t: Tensor) -> bool:
    """Dense, non-overlapping, dim 0 outermost: each sample is one contiguous block."""
    expected = 1
    dims = sorted((d for d in range(t.dim()) if t.shape[d] != 1), key=t.stride)
    for d in dims:
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return t.shape[0] == 1 or not dims or dims[-1] == 0


def _same_layout(a: Tensor, b: Tensor) -> bool:
    # Strides of size-1 dims never address memory, so they may differ.
    return a.shape == b.shape and all(
        a.stride(d) == b.stride(d) for d in range(a.dim()) if a.shape[d] != 1
    )


def supports(x: Tensor, branch: Tensor) -> bool:
    """True when ``drop_add(x, branch, ...)`` runs in one pass: equal shapes, one device,
    float32/bfloat16/float16, and both tensors in one shared dim-0-outermost layout."""
    return (
        x.dim() >= 1
        and x.shape == branch.shape
        and x.device == branch.device
        and x.dtype in DTYPES
        and branch.dtype in DTYPES
        and x.numel() > 0
        and _dim0_outer(x)
        and _same_layout(x, branch)
    )


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _empty_out(x: Tensor, branch: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The output: ``x``'s layout if dim 0 is outermost in it, else ``branch``'s, else
    contiguous. The eager fallback and the fake implementation use it too, so every path
    returns the same strides."""
    for ref in (x, branch):
        if ref is not None and _dim0_outer(ref):
            return torch.empty_like(ref, dtype=dtype)  # a dense ref's strides are kept
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _like(ref: Tensor, t: Tensor) -> Tensor:
    """``t`` in ``ref``'s strides (a copy only when they differ)."""
    return t if _same_layout(ref, t) else torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _check(x: Tensor, branch: Tensor | None, row_scale: Tensor) -> None:
    if x.dim() < 1:
        raise ValueError(f"the kernels need a tensor of rank >= 1, but got shape {tuple(x.shape)}")
    if branch is not None and (branch.shape != x.shape or branch.device != x.device):
        raise ValueError(
            f"x and branch have to share shape and device, but got {tuple(x.shape)} on "
            f"{x.device} and {tuple(branch.shape)} on {branch.device}"
        )
    if row_scale.shape != (x.shape[0],) or row_scale.dtype != torch.float32:
        raise ValueError(
            f"row_scale has to be float32 of shape ({x.shape[0]},), but got "
            f"{row_scale.dtype} of shape {tuple(row_scale.shape)}"
        )
    if row_scale.device != x.device:
        raise ValueError(f"row_scale has to be on {x.device}, but is on {row_scale.device}")


# --------------------------------------------------------------------------- the kernel
def _rows_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    b_ptr,
    s_ptr,
    out_ptr,
    inner,
    numel,
    s_stride,
    HAS_X: tl.constexpr,
    PER_ROW: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out = [x +] b * s[row]`` over flat memory, ``row = offset // inner``.

    ``PER_ROW``: grid (blocks per sample, samples), one scale per program and no integer
    division. Otherwise a flat grid with a per-element row (samples shorter than a block,
    or more samples than the grid's second axis holds). ``WIDE``: 64-bit offsets.
    """
    if PER_ROW:
        row = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if WIDE:
            row = row.to(tl.int64)
        offs = row * inner + cols
        inb = cols < inner
        s = tl.load(s_ptr + row * s_stride)
        live = cols < tl.where(s != 0.0, inner, 0)
    else:
        start = tl.program_id(0)
        if WIDE:
            start = start.to(tl.int64)
        offs = start * BLOCK + tl.arange(0, BLOCK)
        inb = offs < numel
        s = tl.load(s_ptr + (offs // inner) * s_stride, mask=inb, other=0.0)
        live = inb & (s != 0.0)
    # Dropped samples read nothing of the branch: masked-off lanes issue no memory access.
    out = tl.load(b_ptr + offs, mask=live, other=0.0).to(tl.float32) * s
    if HAS_X:
        out += tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inb)


@functools.cache
def _compiled(interpret: bool) -> Any:
    """The kernel, compiled for the GPU or wrapped by Triton's CPU interpreter."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_rows_kernel)
    return triton.jit(_rows_kernel)


def _launch(x: Tensor | None, b: Tensor, row_scale: Tensor, out: Tensor) -> None:
    numel = out.numel()
    rows = out.shape[0]
    inner = numel // rows
    two_byte = all(t.element_size() == 2 for t in (b, out) + ((x,) if x is not None else ()))
    # Two 16-byte vectors per thread and operand at 4 warps.
    block = 2048 if two_byte else 1024
    per_row = inner >= block and rows <= _MAX_ROWS
    grid = (triton.cdiv(inner, block), rows) if per_row else (triton.cdiv(numel, block),)
    kernel = _compiled(out.device.type != "cuda")
    kernel[grid](
        x if x is not None else b,
        b,
        row_scale,
        out,
        inner,
        numel,
        row_scale.stride(0),
        HAS_X=x is not None,
        PER_ROW=per_row,
        WIDE=numel + block >= 2**31,
        BLOCK=block,
        num_warps=_NUM_WARPS,
    )


def _kernel_runs(t: Tensor) -> bool:
    return available() and t.dtype in DTYPES and t.device.type in ("cuda", "cpu")


def _rows_view(row_scale: Tensor, like: Tensor) -> Tensor:
    return row_scale.view((-1,) + (1,) * (like.dim() - 1))


# --------------------------------------------------------------------------- drop_add op
@torch.library.custom_op("dpatch::drop_add", mutates_args=())
def _drop_add(x: Tensor, branch: Tensor, row_scale: Tensor) -> Tensor:
    _check(x, branch, row_scale)
    out = _empty_out(x, branch, torch.promote_types(x.dtype, branch.dtype))
    if not (_kernel_runs(x) and branch.dtype in DTYPES):
        acc = torch.promote_types(out.dtype, torch.float32)
        return out.copy_(x.to(acc) + branch.to(acc) * _rows_view(row_scale, x))
    if out.numel():
        _launch(_like(out, x), _like(out, branch), row_scale, out)
    return out


@_drop_add.register_fake
def _drop_add_fake(x: Tensor, branch: Tensor, row_scale: Tensor) -> Tensor:
    _check(x, branch, row_scale)
    return _empty_out(x, branch, torch.promote_types(x.dtype, branch.dtype))


def _drop_add_setup(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    x, branch, row_scale = inputs
    ctx.save_for_backward(row_scale)
    ctx.x_dtype = x.dtype
    ctx.branch_dtype = branch.dtype
    ctx.branch_format = _memory_format(branch)


def _drop_add_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    (row_scale,) = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = grad if grad.dtype == ctx.x_dtype else grad.to(ctx.x_dtype)
    grad_branch = None
    if ctx.needs_input_grad[1]:
        if not _dim0_outer(grad):  # e.g. the expanded gradient of a sum()
            grad = grad.contiguous(memory_format=ctx.branch_format)
        grad_branch = _scale_rows(grad, row_scale, ctx.branch_dtype)
    return grad_x, grad_branch, None


_drop_add.register_autograd(_drop_add_backward, setup_context=_drop_add_setup)


# --------------------------------------------------------------------------- scale_rows op
@torch.library.custom_op("dpatch::scale_rows", mutates_args=())
def _scale_rows(x: Tensor, row_scale: Tensor, dtype: torch.dtype) -> Tensor:
    _check(x, None, row_scale)
    out = _empty_out(x, None, dtype)
    if not (_kernel_runs(x) and dtype in DTYPES):
        acc = torch.promote_types(torch.promote_types(x.dtype, dtype), torch.float32)
        return out.copy_(x.to(acc) * _rows_view(row_scale, x))
    if out.numel():
        _launch(None, _like(out, x), row_scale, out)
    return out


@_scale_rows.register_fake
def _scale_rows_fake(x: Tensor, row_scale: Tensor, dtype: torch.dtype) -> Tensor:
    _check(x, None, row_scale)
    return _empty_out(x, None, dtype)


def _scale_rows_setup(ctx: Any, inputs: tuple[Tensor, Tensor, torch.dtype], output: Tensor) -> None:
    x, row_scale, _ = inputs
    ctx.save_for_backward(row_scale)
    ctx.x_dtype = x.dtype


def _scale_rows_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
    (row_scale,) = ctx.saved_tensors
    return _scale_rows(grad, row_scale, ctx.x_dtype), None, None


_scale_rows.register_autograd(_scale_rows_backward, setup_context=_scale_rows_setup)


# --------------------------------------------------------------------------- public API
def fused_drop_add(x: Tensor, branch: Tensor, row_scale: Tensor) -> Tensor:
    """``x + branch * row_scale[row]`` in one pass (the op ``torch.ops.dpatch.drop_add``).

    Args:
        x: the shortcut, rank >= 1, batch first.
        branch: the residual branch, same shape and device as ``x``.
        row_scale: float32, shape ``(B,)``: keep mask times scale per sample (a stride-0
            expanded tensor is fine: batch mode passes one value expanded).

    Returns:
        A new tensor of the promoted dtype; arithmetic in float32. Differentiable in ``x``
        (the gradient is passed through as is) and ``branch`` (scaled per sample).

    Raises:
        ValueError: shapes, devices or ``row_scale`` do not fit.
    """
    out: Tensor = _drop_add(x, branch, row_scale)
    return out


def scale_rows(x: Tensor, row_scale: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``(x * row_scale[row]).to(dtype)`` in one pass (the op ``torch.ops.dpatch.scale_rows``;
    ``drop_add``'s backward for the branch)."""
    out: Tensor = _scale_rows(x, row_scale, x.dtype if dtype is None else dtype)
    return out


# --------------------------------------------------------------------------- self-check
@dataclass(frozen=True)
class SelfCheck:
    """The kernels run once against ``torch.addcmul`` for one case.

    Attributes:
        device: where they ran (``cuda:0``; ``cpu`` is Triton's interpreter).
        dtypes: the shortcut's and the branch's dtype (``float32/bfloat16``; one name
            when they are equal).
        dim_order: the memory layout, outermost dimension first (``(0, 2, 3, 1)`` is
            channels_last).
        ok: forward and backward agreed with ``addcmul``.
        detail: why not (a mismatch or the error), else "".
    """

    device: str
    dtypes: str
    dim_order: tuple[int, ...]
    ok: bool
    detail: str = ""

    @property
    def case(self) -> str:
        """``float32 channels_last (rank 4) on cuda:0``."""
        layout = _layout_name(self.dim_order)
        return f"{self.dtypes} {layout} (rank {len(self.dim_order)}) on {self.device}"

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "ok": self.ok, "detail": self.detail}


# Verdicts for this process: facts about its GPU and Triton, found once per case.
_VERDICTS: dict[tuple[str, torch.dtype, torch.dtype, tuple[int, ...]], SelfCheck] = {}

# Agreement with addcmul computed in float32 and rounded to the output dtype: the kernel
# may fuse the multiply-add (float32: one rounding less); the interpreter truncates to
# bfloat16 where the GPU rounds to nearest.
_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _layout_name(order: tuple[int, ...]) -> str:
    if order == tuple(range(len(order))):
        return "contiguous"
    if order == (0, 2, 3, 1):
        return "channels_last"
    if order == (0, 2, 3, 4, 1):
        return "channels_last_3d"
    return f"dim order {order}"


def self_check(x: Tensor, branch: Tensor) -> SelfCheck:
    """The verdict for ``drop_add(x, branch)``'s case (run now if it is the first)."""
    return check_case(x.device, x.dtype, branch.dtype, tuple(x.dim_order()))


def check_case(
    device: torch.device | str,
    x_dtype: torch.dtype,
    branch_dtype: torch.dtype,
    dim_order: tuple[int, ...],
) -> SelfCheck:
    """Run the kernels once for a case against ``torch.addcmul`` (cached per process).

    A failed case warns once, naming ``DPATCH_KERNELS``. CPU tensors run in Triton's
    interpreter. Must not be called while ``torch.compile`` traces (``drop_add`` never
    sends compiled code here) or while a CUDA graph is being captured (the comparison
    reads results on the host).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), x_dtype, branch_dtype, tuple(dim_order))
    verdict = _VERDICTS.get(key)
    if verdict is None:
        verdict = _VERDICTS[key] = _run_check(device, x_dtype, branch_dtype, tuple(dim_order))
        if not verdict.ok:
            warnings.warn(
                f"dpatch: the Triton drop-add kernel failed its self-check for {verdict.case} "
                f"({verdict.detail}); torch.addcmul is used for that case instead. Set "
                "DPATCH_KERNELS=0 to turn the kernels off, and please report this with the "
                "output of `dpatch env`",
                RuntimeWarning,
                stacklevel=4,
            )
    return verdict


def known_check(x: Tensor, branch: Tensor) -> SelfCheck | None:
    """The verdict for ``drop_add(x, branch)``'s case if it was reached, without running
    anything (for code that must not synchronise, such as CUDA graph capture)."""
    device = x.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _VERDICTS.get((str(device), x.dtype, branch.dtype, tuple(x.dim_order())))


def self_checks() -> tuple[SelfCheck, ...]:
    """Every verdict this process has reached, in the order they were reached."""
    return tuple(_VERDICTS.values())


def clear_self_checks() -> None:
    """Forget every verdict (tests; a case is checked again at its next use)."""
    _VERDICTS.clear()


def _same(t: Tensor) -> Tensor:
    return t


def _run_check(
    device: torch.device, x_dtype: torch.dtype, branch_dtype: torch.dtype, order: tuple[int, ...]
) -> SelfCheck:
    names = [str(d).removeprefix("torch.") for d in (x_dtype, branch_dtype)]
    dtypes = names[0] if names[0] == names[1] else "/".join(names)
    record = functools.partial(SelfCheck, str(device), dtypes, order)
    if not available():
        return record(False, "Triton is not installed")
    # A training step may be under no_grad, inference_mode, autocast or a checkpoint's
    # saved-tensor hooks: none of them may see (or change) this little graph.
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(device.type, enabled=False),
        torch.autograd.graph.saved_tensors_hooks(_same, _same),
        _syncs_allowed(device),
    ):
        try:
            # Samples longer than a kernel block (one program row each) and shorter.
            for rows, elements in ((3, 2100), (5, 21)):
                problem = _compare(device, x_dtype, branch_dtype, order, rows, elements)
                if problem:
                    return record(False, problem)
        except Exception as exc:  # a compile error, a launch failure: the verdict
            text = str(exc).strip().splitlines()
            return record(False, f"{type(exc).__name__}: {text[0][:160] if text else ''}")
    return record(True)


@contextlib.contextmanager
def _syncs_allowed(device: torch.device) -> Iterator[None]:
    """The check reads its results on the host, once: a step run under
    ``torch.cuda.set_sync_debug_mode("error")`` must not turn that into a failed verdict."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def _case_tensor(
    shape: tuple[int, ...], order: tuple[int, ...], dtype: torch.dtype, device: torch.device, g: Any
) -> Tensor:
    """A random tensor of ``shape`` laid out in memory in ``order`` (outermost first)."""
    physical = torch.randn([shape[d] for d in order], generator=g)
    logical = physical.permute(sorted(range(len(order)), key=order.__getitem__))
    return logical.to(device=device, dtype=dtype)


def _compare(
    device: torch.device,
    x_dtype: torch.dtype,
    branch_dtype: torch.dtype,
    order: tuple[int, ...],
    rows: int,
    elements: int,
) -> str:
    """Forward and backward of one shape against addcmul: '' or what differs."""
    rank = len(order)
    if rank == 1:
        shape: tuple[int, ...] = (rows * elements,)
    else:
        middle = (3, 2, 2, 2)[: rank - 2]
        shape = (rows, *middle, math.ceil(elements / math.prod(middle)))
    g = torch.Generator().manual_seed(0)
    x = _case_tensor(shape, order, x_dtype, device, g).requires_grad_(True)
    b = _case_tensor(shape, order, branch_dtype, device, g).requires_grad_(True)
    pattern = torch.tensor([0.0, 1.25, 2.5])
    scale = pattern[torch.arange(shape[0]) % 3].to(device)
    view = _rows_view(scale, x)
    out = fused_drop_add(x, b, scale)
    ref = torch.addcmul(x.detach().float(), b.detach().float(), view).to(out.dtype)
    tol = max(_TOLERANCE.get(x_dtype, 1e-5), _TOLERANCE.get(branch_dtype, 1e-5))
    if out.stride() != x.stride():
        return f"output strides {out.stride()} instead of the shortcut's {x.stride()}"
    if not torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol):
        err = (out.float() - ref.float()).abs().max().item()
        return f"forward differs from addcmul by up to {err:.3g} (tolerance {tol:g})"
    dropped = scale == 0
    if not torch.equal(out.detach()[dropped], x.detach()[dropped].to(out.dtype)):
        return "a dropped sample's output is not the shortcut"
    grad = _case_tensor(shape, order, out.dtype, device, g)
    gx, gb = torch.autograd.grad(out, (x, b), grad)
    if not torch.equal(gx, grad.to(x_dtype)):
        return "the shortcut's gradient is not the incoming gradient"
    ref_b = (grad.float() * view).to(branch_dtype)
    if not torch.allclose(gb.float(), ref_b.float(), rtol=tol, atol=tol):
        err = (gb.float() - ref_b.float()).abs().max().item()
        return f"the branch's gradient differs by up to {err:.3g} (tolerance {tol:g})"
    return ""
