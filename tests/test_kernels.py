"""The Triton drop-add kernels (dpatch.kernels) and drop_add's dispatch to them.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: ``dpatch.kernels``
chooses the interpreter per call for CPU tensors, so nothing here sets ``TRITON_INTERPRET``
for the whole process (which would also send other modules' CUDA kernels through the
interpreter on a GPU machine). ``drop_add`` is sent through the kernel on CPU with
``DPATCH_KERNELS=interpret`` (set per test with monkeypatch). Tests marked ``cuda`` run the
compiled kernels on a GPU and are skipped without one.

Tolerances: each element is checked against the float64 value of the formula within
``ulp * (|x| + |branch * scale|)``, ulp the relative rounding unit of the output dtype
(float32 2^-22: float32 arithmetic rounds twice; float16 2^-10; bfloat16 2^-7 because the
interpreter truncates float32 to bfloat16 where the GPU rounds to nearest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from dpatch import DropPath, drop_add
from dpatch import kernels as K

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
HAS_CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------- helpers
def rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view((-1,) + (1,) * (like.dim() - 1))


def check_formula(out: torch.Tensor, x: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> None:
    """``out`` is ``x + b * s[row]`` within the output dtype's rounding (module docstring)."""
    prod = b.double() * rows(s.double(), b)
    exact = x.double() + prod
    bound = ULP[out.dtype] * (x.double().abs() + prod.abs())
    err = (out.double() - exact).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item()} vs bound {bound.max().item()}"


def check_scaled(out: torch.Tensor, g: torch.Tensor, s: torch.Tensor) -> None:
    """``out`` is ``g * s[row]`` within the output dtype's rounding."""
    exact = g.double() * rows(s.double(), g)
    err = (out.double() - exact).abs()
    assert bool((err <= ULP[out.dtype] * exact.abs()).all()), err.max().item()


def row_scale(n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """Per-sample scales with dropped rows (0) and kept rows at two different scales."""
    g = torch.Generator().manual_seed(seed)
    s = torch.where(torch.rand(n, generator=g) < 0.4, 0.0, 1.25)
    s[1::3] *= 2.0
    if n >= 2:
        s[0], s[-1] = 0.0, 1.25  # at least one dropped and one kept row
    else:
        s[0] = 1.25
    return s.to(device)


LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "channels_last_3d": lambda t: t.contiguous(memory_format=torch.channels_last_3d),
    # dim 0 outermost but the inner dims permuted: read in place like the two above
    "inner_permuted": lambda t: t.transpose(1, -1).contiguous().transpose(1, -1),
}
# (layout, shape): odd sizes (no multiple of a block), B = 1, rank 1 and rank 5, samples
# longer than a block (one program row per sample) and shorter (flat grid).
CASES = [
    ("contiguous", (3, 2500)),  # per-sample grid, a ragged last block
    ("contiguous", (1, 3001)),  # B = 1
    ("contiguous", (1001,)),  # rank 1: every element its own sample, flat grid
    ("contiguous", (5, 3, 7)),  # samples shorter than a block
    ("channels_last", (3, 5, 7, 11)),
    ("channels_last", (2, 40, 9, 7)),  # 2520 elements per sample: per-sample grid
    ("channels_last_3d", (2, 3, 4, 5, 6)),  # rank 5
    ("contiguous", (2, 3, 4, 5, 6)),
    ("inner_permuted", (4, 6, 5)),
]


def make(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = LAYOUTS[layout](torch.randn(shape, generator=g).to(device, dtype))
    b = LAYOUTS[layout](torch.randn(shape, generator=g).to(device, dtype))
    return x, b, row_scale(shape[0], seed, device)


class OpLog(TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher below autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def op_log() -> Iterator[list[str]]:
    with OpLog() as log:
        yield log.names


def capture_aot_graphs() -> tuple[Any, dict[str, torch.fx.GraphModule]]:
    """An aot_eager-like backend that keeps the forward and backward graphs it compiles."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, torch.fx.GraphModule] = {}

    def keep(name: str) -> Callable[..., Any]:
        def compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), graphs


def call_targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


# --------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("layout", "shape"), CASES, ids=str)
def test_forward_and_backward_match_the_formula(
    layout: str, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    x, b, s = make(shape, dtype, layout, seed=len(shape) + shape[0])
    assert K.supports(x, b)  # read in place: no copy in front of the kernel
    x.requires_grad_(True)
    b.requires_grad_(True)
    out = K.fused_drop_add(x, b, s)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.stride() == x.stride()  # layout kept
    check_formula(out, x.detach(), b.detach(), s)
    dropped = s == 0
    assert dropped.any() or shape[0] == 1
    assert torch.equal(out[dropped], x.detach()[dropped])  # a dropped row is x, bit for bit
    g = LAYOUTS[layout](torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    out.backward(g)
    assert x.grad is not None and b.grad is not None
    assert torch.equal(x.grad, g)
    assert b.grad.dtype == dtype
    check_scaled(b.grad, g, s)
    assert torch.equal(b.grad[dropped], torch.zeros_like(b.grad[dropped]))


def test_grad_of_x_is_the_incoming_gradient_itself() -> None:
    x0, b, s = make((4, 50), torch.float32, "contiguous", seed=2)
    x = x0.clone().requires_grad_(True)
    xi = x * 1.0  # a non-leaf: its hook sees exactly what drop_add's backward returns
    out = K.fused_drop_add(xi, b.requires_grad_(True), s)
    seen: dict[str, torch.Tensor] = {}
    out.register_hook(lambda grad: seen.__setitem__("out", grad))
    xi.register_hook(lambda grad: seen.__setitem__("x", grad))
    out.backward(torch.randn(4, 50))
    assert seen["x"].data_ptr() == seen["out"].data_ptr()  # passed through, no copy


@pytest.mark.parametrize(
    ("xd", "bd"), [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)]
)
def test_mixed_dtypes_promote_and_keep_each_gradient_dtype(
    xd: torch.dtype, bd: torch.dtype
) -> None:
    """Under autocast the residual stream is often float32 and the branch bfloat16."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2100, generator=g).to(xd).requires_grad_(True)
    b = torch.randn(3, 2100, generator=g).to(bd).requires_grad_(True)
    s = row_scale(3, 3)
    out = K.fused_drop_add(x, b, s)
    assert out.dtype == torch.promote_types(xd, bd)
    check_formula(out, x.detach(), b.detach(), s)
    grad = torch.randn(3, 2100, generator=g).to(out.dtype)
    out.backward(grad)
    assert x.grad is not None and b.grad is not None
    assert x.grad.dtype == xd and b.grad.dtype == bd
    assert torch.equal(x.grad, grad.to(xd))
    check_scaled(b.grad, grad, s)


def test_expanded_row_scale_is_read_without_a_copy() -> None:
    """Batch mode passes one value expanded to (B,): stride 0 is read as such."""
    x, b, _ = make((5, 1500), torch.float32, "contiguous", seed=4)
    for value in (0.0, 1.6):
        s = torch.tensor([value]).expand(5)
        out = K.fused_drop_add(x, b, s)
        check_formula(out, x, b, s.contiguous())


def test_dropped_rows_do_not_read_their_branch() -> None:
    x, b, s = make((4, 1500), torch.float32, "contiguous", seed=5)
    b[s == 0] = float("nan")  # eager x + nan * 0 would be nan
    out = K.fused_drop_add(x, b, s)
    assert torch.equal(out[s == 0], x[s == 0])
    assert not out.isnan().any()


def test_backward_of_an_expanded_gradient() -> None:
    """``out.sum().backward()`` hands the op a stride-0 gradient: not a layout the kernel
    reads in place, so it is made dense (in the branch's memory format) first."""
    x, b, s = make((3, 4, 6, 5), torch.float32, "channels_last", seed=6)
    bi = b.requires_grad_(True) * 1.0  # a non-leaf: AccumulateGrad would restride a leaf's
    seen: dict[str, torch.Tensor] = {}
    bi.register_hook(lambda grad: seen.__setitem__("b", grad))
    K.fused_drop_add(x, bi, s).sum().backward()
    assert seen["b"].is_contiguous(memory_format=torch.channels_last)
    check_scaled(seen["b"], torch.ones(3, 4, 6, 5), s)


def test_scale_rows_op() -> None:
    x, _, s = make((3, 5, 7, 11), torch.bfloat16, "channels_last", seed=7)
    out = K.scale_rows(x, s, torch.float32)
    assert out.dtype == torch.float32 and out.stride() == x.stride()
    check_scaled(out, x, s)
    assert K.scale_rows(x, s).dtype == torch.bfloat16


# --------------------------------------------------------------------------- other layouts
NON_NATIVE: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
    # strided slices: not dense
    "sliced": lambda: (torch.randn(4, 10, 6)[:, ::2], torch.randn(4, 10, 6)[:, ::2]),
    # dim 0 is not outermost in memory
    "batch_inner": lambda: (torch.randn(7, 4).t(), torch.randn(7, 4).t()),
    # each layout fine, but different
    "mixed_layouts": lambda: (
        torch.randn(3, 4, 5, 6),
        torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last),
    ),
    "mixed_other_way": lambda: (
        torch.randn(3, 4, 5, 6).transpose(0, 1).contiguous().transpose(0, 1),
        torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last),
    ),
}


@pytest.mark.parametrize("case", list(NON_NATIVE))
def test_other_layouts_give_the_formula_and_drop_add_falls_back(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(8)
    x, b = NON_NATIVE[case]()
    s = row_scale(x.shape[0], 8)
    assert not K.supports(x, b)
    # The op itself still answers right (operands copied into one layout first) ...
    xg, bg = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    out = K.fused_drop_add(xg, bg, s)
    check_formula(out, x, b, s)
    g = torch.randn(out.shape)
    out.backward(g)
    assert xg.grad is not None and bg.grad is not None
    assert torch.equal(xg.grad, g)
    check_scaled(bg.grad, g, s)
    if K._dim0_outer(x):
        assert out.stride() == x.stride()  # the shortcut's layout wins
    # ... and drop_add sends it to addcmul, which reads any strides in one pass.
    monkeypatch.setenv("DPATCH_KERNELS", "interpret")
    with op_log() as names:
        drop_add(x, b, 0.3, True)
    assert "aten.addcmul.default" in names and "dpatch.drop_add.default" not in names


def test_bad_arguments_name_the_values() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        K.fused_drop_add(x, torch.randn(4, 2), torch.ones(4))
    with pytest.raises(
        ValueError, match=r"float32 of shape \(4,\), but got torch.float64 of shape \(4,\)"
    ):
        K.fused_drop_add(x, x, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        K.fused_drop_add(x, x, torch.ones(3))
    with pytest.raises(ValueError, match="rank >= 1"):
        K.fused_drop_add(torch.tensor(1.0), torch.tensor(1.0), torch.ones(1))


def test_unsupported_dtype_takes_the_eager_formula() -> None:
    x, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    s = row_scale(3, 9)
    assert not K.supports(x, b)
    assert torch.equal(K.fused_drop_add(x, b, s), x + b * rows(s.double(), b))


# --------------------------------------------------------------------------- graphs
@pytest.mark.slow
def test_compile_fullgraph_sees_one_op_each_way() -> None:
    backend, graphs = capture_aot_graphs()
    x, b, s = make((4, 6, 5), torch.float32, "contiguous", seed=10)
    x.requires_grad_(True)
    b.requires_grad_(True)

    def f(x: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return K.fused_drop_add(x, b, s) * 2.0

    out = torch.compile(f, fullgraph=True, backend=backend)(x, b, s)
    fw = call_targets(graphs["forward"])
    assert fw.count("dpatch.drop_add.default") == 1
    assert not any(t.startswith("aten.add") for t in fw)  # not decomposed
    out.sum().backward()
    bw = call_targets(graphs["backward"])
    assert bw.count("dpatch.scale_rows.default") == 1
    check_formula(out.detach() / 2.0, x.detach(), b.detach(), s)
    assert b.grad is not None
    check_scaled(b.grad, torch.full(b.shape, 2.0), s)


@pytest.mark.slow
def test_export_sees_one_op() -> None:
    class Residual(torch.nn.Module):
        def forward(self, x: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return K.fused_drop_add(x, b, s)

    x, b, s = make((3, 4, 5, 6), torch.float32, "channels_last", seed=11)
    ep = torch.export.export(Residual(), (x, b, s))
    assert call_targets(ep.graph_module) == ["dpatch.drop_add.default"]
    out = ep.module()(x, b, s)
    check_formula(out, x, b, s)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["contiguous", "channels_last", "mixed_layouts", "mixed_dtypes", "batch_inner"],
)
def test_opcheck(case: str) -> None:
    """torch.library's own check of the schema, fake and autograd registrations."""
    s = row_scale(3, 12)
    x, b = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        b = b.contiguous(memory_format=torch.channels_last)
    elif case == "mixed_layouts":
        b = b.contiguous(memory_format=torch.channels_last)
    elif case == "mixed_dtypes":
        b = b.bfloat16()
    elif case == "batch_inner":
        x, b, s = x.transpose(0, 1), b.transpose(0, 1), row_scale(4, 12)
    x.requires_grad_(True)
    b.requires_grad_(True)
    torch.library.opcheck(torch.ops.dpatch.drop_add.default, (x, b, s))
    torch.library.opcheck(torch.ops.dpatch.scale_rows.default, (b, s, torch.float16))


# --------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inverted", "expected", "none"])
@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_drop_add_through_the_kernel_equals_the_eager_path(
    mode: str, scaling: str, rate: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed, same mask (one draw per sample in both paths), same values."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(64, 3, 50, generator=g, requires_grad=True)
    b = torch.randn(64, 3, 50, generator=g, requires_grad=True)
    results = {}
    for setting in ("0", "interpret"):
        monkeypatch.setenv("DPATCH_KERNELS", setting)
        torch.manual_seed(14)
        with op_log() as names:
            out = drop_add(x, b, rate, True, mode=mode, scaling=scaling, alpha=0.5)
        assert ("dpatch.drop_add.default" in names) == (setting == "interpret")
        out.backward(torch.ones_like(out))
        assert x.grad is not None and b.grad is not None
        results[setting] = (out.detach(), x.grad.clone(), b.grad.clone())
        x.grad, b.grad = None, None
    for eager, kernel in zip(results["0"], results["interpret"], strict=True):
        assert torch.equal(kernel, eager)  # float32: both round b * scale, then the sum
    dropped = (results["0"][0] == x.detach()).flatten(1).all(dim=1)
    if rate == 1.0:
        assert dropped.all()
    elif mode == "batch":
        assert dropped.all() or not dropped.any()
    else:
        assert dropped.any() and (~dropped).any()


def test_module_uses_the_kernel_only_where_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    m = DropPath(0.5).train()
    x, r = torch.randn(8, 20), torch.randn(8, 20)
    for setting, used in (("", False), ("1", False), ("0", False), ("interpret", True)):
        monkeypatch.setenv("DPATCH_KERNELS", setting)  # CPU tensors: only "interpret"
        with op_log() as names:
            m(x, r)
        assert ("dpatch.drop_add.default" in names) is used, setting
    with op_log() as names:
        m.eval()(x, r)
    assert "dpatch.drop_add.default" not in names  # eval is the plain residual
    monkeypatch.setenv("DPATCH_KERNELS", "yes")
    with pytest.raises(ValueError, match="'yes'"):
        m.train()(x, r)


@pytest.mark.slow
def test_compiled_module_keeps_the_rate_tensor_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile the mask stays in the graph for the compiler to fuse."""
    monkeypatch.setenv("DPATCH_KERNELS", "interpret")
    backend, graphs = capture_aot_graphs()
    m = DropPath(0.5).train()
    x, r = torch.randn(8, 20, requires_grad=True), torch.randn(8, 20)
    torch.compile(m, fullgraph=True, backend=backend)(x, r)
    assert "dpatch.drop_add.default" not in call_targets(graphs["forward"])

    def f(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return drop_add(r, x, 0.5, True)

    backend, graphs = capture_aot_graphs()
    torch.compile(f, fullgraph=True, backend=backend)(x, r)
    assert "aten.addcmul.default" in call_targets(graphs["forward"])


@pytest.mark.slow
def test_global_triton_interpret_gives_the_same_answer(tmp_path: Path) -> None:
    """CI may set TRITON_INTERPRET=1 for the whole run: the kernels then agree too."""
    script = tmp_path / "check.py"
    script.write_text(
        "import torch\n"
        "from dpatch import kernels as K\n"
        "x, b = torch.randn(3, 1500), torch.randn(3, 1500)\n"
        "s = torch.tensor([0.0, 1.5, 2.0])\n"
        "out = K.fused_drop_add(x, b, s)\n"
        "assert torch.equal(out, x + b * s[:, None]), 'mismatch'\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# --------------------------------------------------------------------------- CUDA
CUDA_CASES = [
    ("contiguous", (16, 197, 768)),
    ("channels_last", (8, 256, 14, 14)),
    ("channels_last", (3, 5, 7, 11)),
    ("channels_last_3d", (2, 8, 4, 6, 5)),
    ("contiguous", (100_003,)),
    ("contiguous", (1, 3001)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("layout", "shape"), CUDA_CASES, ids=str)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_kernel_matches_the_formula(
    layout: str, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    x, b, s = make(shape, dtype, layout, seed=20, device="cuda")
    x.requires_grad_(True)
    b.requires_grad_(True)
    out = K.fused_drop_add(x, b, s)
    assert out.stride() == x.stride()
    check_formula(out.cpu(), x.detach().cpu(), b.detach().cpu(), s.cpu())
    g = torch.randn_like(out)
    out.backward(g)
    assert x.grad is not None and b.grad is not None
    assert torch.equal(x.grad, g)
    check_scaled(b.grad.cpu(), g.cpu(), s.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_cuda_drop_add_dispatches_to_the_kernel_without_a_sync(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DPATCH_KERNELS", raising=False)
    x = torch.randn(256, 197, 64, device="cuda", requires_grad=True)
    b = torch.randn(256, 197, 64, device="cuda", requires_grad=True)
    drop_add(x, b, 0.3, True, mode=mode)  # compile and load the kernel outside the check
    torch.cuda.synchronize()
    torch.manual_seed(21)
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        with op_log() as names:
            out = drop_add(x, b, 0.3, True, mode=mode)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert "dpatch.drop_add.default" in names and "aten.addcmul.default" not in names
    monkeypatch.setenv("DPATCH_KERNELS", "0")
    torch.manual_seed(21)
    eager = drop_add(x, b, 0.3, True, mode=mode)
    kernel_dropped = (out == x).flatten(1).all(dim=1)
    assert torch.equal(kernel_dropped, (eager == x).flatten(1).all(dim=1))  # same mask
    check_formula(
        out.detach().cpu(), x.detach().cpu(), b.detach().cpu(), (~kernel_dropped).cpu() / 0.7
    )


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_compile_with_inductor() -> None:
    x, b, s = make((8, 64, 28, 28), torch.bfloat16, "channels_last", seed=22, device="cuda")
    x.requires_grad_(True)
    b.requires_grad_(True)

    def f(x: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.relu(K.fused_drop_add(x, b, s))

    out = torch.compile(f, fullgraph=True)(x, b, s)
    ref = f(x, b, s)
    assert torch.equal(out, ref)
    out.float().sum().backward()
    assert b.grad is not None
    m = torch.compile(DropPath(0.4).cuda().train(), fullgraph=True)
    r = torch.randn(64, 197, 96, device="cuda")
    y = m(torch.randn(64, 197, 96, device="cuda"), r)
    assert torch.isfinite(y).all() and bool((y == r).flatten(1).all(dim=1).any())


# --------------------------------------------------------------------------- self-check
@pytest.fixture
def fresh_checks() -> Iterator[None]:
    """No verdict from earlier tests, and none left behind for later ones."""
    K.clear_self_checks()
    yield
    K.clear_self_checks()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("layout", "shape"), CASES[:1] + CASES[4:7] + CASES[-1:], ids=str)
def test_self_check_passes_for_the_real_kernel(
    layout: str, shape: tuple[int, ...], dtype: torch.dtype, fresh_checks: None
) -> None:
    x, b, _ = make(shape, dtype, layout, seed=30)
    verdict = K.self_check(x, b)
    assert verdict.ok, verdict.detail
    assert verdict.dim_order == tuple(x.dim_order()) and verdict.device == "cpu"
    assert K.self_checks() == (verdict,)


def _broken_launch(kind: str) -> Callable[..., None]:
    def launch(x: torch.Tensor | None, b: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> None:
        if kind == "raises":
            raise RuntimeError("PTX compilation failed (simulated)")
        out.fill_(0.5)  # wrong values

    return launch


@pytest.mark.parametrize("kind", ["raises", "wrong"])
def test_a_failed_self_check_falls_back_to_addcmul_with_one_warning(
    kind: str, monkeypatch: pytest.MonkeyPatch, fresh_checks: None
) -> None:
    """A kernel that fails on this machine (simulated in the interpreter) is never used for
    that case: drop_add gives addcmul's result, bit for bit, and warns once."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(16, 3, 50, generator=g, requires_grad=True)
    b = torch.randn(16, 3, 50, generator=g, requires_grad=True)
    monkeypatch.setenv("DPATCH_KERNELS", "0")
    torch.manual_seed(32)
    expected = drop_add(x, b, 0.3, True)
    monkeypatch.setattr(K, "_launch", _broken_launch(kind))
    monkeypatch.setenv("DPATCH_KERNELS", "interpret")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(32)
        first = drop_add(x, b, 0.3, True)
        with op_log() as names:
            torch.manual_seed(32)
            second = drop_add(x, b, 0.3, True)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert "dpatch.drop_add.default" not in names and "aten.addcmul.default" in names
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "DPATCH_KERNELS=0" in messages[0] and "float32 contiguous (rank 3) on cpu" in messages[0]
    (verdict,) = K.self_checks()
    assert not verdict.ok
    assert ("simulated" in verdict.detail) if kind == "raises" else "forward" in verdict.detail
    # another case (a new dtype) is checked on its own
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drop_add(x.detach().bfloat16(), b.detach().bfloat16(), 0.3, True)
    assert len(K.self_checks()) == 2 and len(caught) == 1


def test_self_check_runs_once_per_case_and_leaves_the_caller_untouched(
    monkeypatch: pytest.MonkeyPatch, fresh_checks: None
) -> None:
    """Run from inside a training step under no_grad/autocast/checkpoint hooks: it neither
    sees nor disturbs them, and the second call of a case does not run it again."""
    monkeypatch.setenv("DPATCH_KERNELS", "interpret")
    runs: list[str] = []
    real = K._run_check

    def counted(*args: Any) -> K.SelfCheck:
        runs.append(str(args))
        return real(*args)

    monkeypatch.setattr(K, "_run_check", counted)
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t

    x, r = torch.randn(8, 20, requires_grad=True), torch.randn(8, 20)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = drop_add(r, x, 0.5, True)
    assert len(runs) == 1 and K.self_checks()[0].ok
    assert len(packed) == 1  # only drop_add's own row scale, none of the check's tensors
    with torch.no_grad():
        drop_add(r, x, 0.5, True)
    assert len(runs) == 1 and out.requires_grad


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_self_check_passes(dtype: torch.dtype, fresh_checks: None) -> None:
    """On a real GPU every layout the kernels read in place passes its self-check (what
    `dpatch env` reports), also under sync debugging."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        for order in [(0,), (0, 1), (0, 1, 2), (0, 2, 3, 1), (0, 2, 3, 4, 1), (0, 2, 1)]:
            verdict = K.check_case("cuda", dtype, dtype, order)
            assert verdict.ok, (verdict.case, verdict.detail)
    finally:
        torch.cuda.set_sync_debug_mode("default")
