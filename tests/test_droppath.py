"""The op: drop_path, drop_add, DropPath. Statistical checks state their bounds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
from torch import nn

from dpatch import DropPath, drop_add, drop_path
from dpatch.droppath import keep_count

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def binomial_bounds(n: int, p: float, sigmas: float = 4.0) -> tuple[float, float]:
    """The count interval n*p +- sigmas*sqrt(n p (1-p)) (4 sigma: false alarm < 1e-4)."""
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return mean - sigmas * sd, mean + sigmas * sd


def dropped_rows(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Boolean per row: the row of ``out`` equals ``ref``'s (branch dropped)."""
    return (out == ref).flatten(1).all(dim=1)


# --------------------------------------------------------------------------- statistics
def test_row_drop_fraction_within_binomial_4_sigma() -> None:
    torch.manual_seed(0)
    n, p = 20_000, 0.3
    x = torch.ones(n, 3, 2)
    out = drop_path(x, p, training=True)
    dropped = int((out == 0).flatten(1).all(dim=1).sum())
    lo, hi = binomial_bounds(n, p)
    assert lo <= dropped <= hi, (dropped, lo, hi)


def test_kept_rows_are_exactly_scaled_by_inverse_keep() -> None:
    torch.manual_seed(1)
    p = 0.3
    x = torch.randn(512, 7)
    out = drop_path(x, p, training=True)
    kept = ~(out == 0).all(dim=1)
    assert kept.any() and (~kept).any()
    assert torch.equal(out[kept], x[kept] * (1.0 / (1.0 - p)))
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))


def test_batch_mode_drops_all_or_nothing() -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 4, 4)
    outcomes = set()
    for _ in range(200):
        out = drop_path(x, 0.5, training=True, mode="batch")
        zero = (out == 0).flatten(1).all(dim=1)
        assert bool(zero.all()) or not bool(zero.any())
        outcomes.add(bool(zero.all()))
    assert outcomes == {True, False}  # P(200 equal draws) = 2^-199


def test_batch_mode_fraction_of_dropped_batches() -> None:
    torch.manual_seed(3)
    n, p = 10_000, 0.3
    x = torch.ones(2, 3)
    dropped = sum(bool((drop_path(x, p, True, mode="batch") == 0).all()) for _ in range(n))
    lo, hi = binomial_bounds(n, p)
    assert lo <= dropped <= hi


@pytest.mark.parametrize("scaling", ["inverted", "expected", "none"])
def test_training_mean_matches_eval(scaling: str) -> None:
    """Mean of N training draws vs eval output. Each element of the mean is x + b*S/N with S
    binomial: its sd is |b| c sqrt(p(1-p)/N) (c the kept-branch scale); 5 sd is the bound.
    'none' does not preserve the expectation: its mean is x + (1-p) b, not the eval x + b."""
    torch.manual_seed(4)
    p, n = 0.25, 4000
    x, b = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    total = torch.zeros_like(x)
    for _ in range(n):
        total += drop_add(x, b, p, True, scaling=scaling)
    mean = total / n
    c = {"inverted": 1 / (1 - p), "expected": 1.0, "none": 1.0}[scaling]
    tol = 5 * b.abs() * c * math.sqrt(p * (1 - p) / n)
    expected = x + (1 - p) * b if scaling == "none" else drop_add(x, b, p, False, scaling=scaling)
    assert torch.all((mean - expected).abs() <= tol + 1e-12)


def test_expected_scaling_eval_multiplies_branch() -> None:
    x, b = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.allclose(drop_add(x, b, 0.2, False, scaling="expected"), x + 0.8 * b)
    assert torch.allclose(drop_path(b, 0.2, False, scaling="expected"), 0.8 * b)


# --------------------------------------------------------------------------- autograd
def test_gradients_zero_on_dropped_and_scaled_on_kept() -> None:
    torch.manual_seed(5)
    p = 0.4
    x = torch.randn(256, 6, requires_grad=True)
    b = torch.randn(256, 6, requires_grad=True)
    out = drop_add(x, b, p, True)
    out.sum().backward()
    assert x.grad is not None and b.grad is not None
    assert torch.equal(x.grad, torch.ones_like(x))  # the shortcut is never dropped
    dropped = dropped_rows(out.detach(), x.detach())
    assert dropped.any() and (~dropped).any()
    assert torch.equal(b.grad[dropped], torch.zeros_like(b.grad[dropped]))
    assert torch.allclose(b.grad[~dropped], torch.full_like(b.grad[~dropped], 1 / (1 - p)))


@pytest.mark.parametrize("case", ["eval", "p0"])
def test_identity_cases_return_the_input_itself(case: str) -> None:
    x = torch.randn(4, 3, requires_grad=True)
    training, p = (False, 0.3) if case == "eval" else (True, 0.0)
    out = drop_path(x, p, training)
    assert out is x  # bit for bit, no copy, no graph node
    g = torch.randn(4, 3)
    out.backward(g)
    assert torch.equal(x.grad, g)  # type: ignore[arg-type]


def test_eval_drop_add_is_the_plain_residual() -> None:
    x, b = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(drop_add(x, b, 0.3, False), x + b)
    assert torch.equal(drop_add(x, b, 0.0, True), x + b)
    assert torch.equal(drop_add(x, b, 0.3, False, alpha=0.5), torch.add(x, b, alpha=0.5))


def test_fused_add_equals_add_of_drop_path_for_same_mask() -> None:
    x, b = torch.randn(64, 9, 5), torch.randn(64, 9, 5)
    torch.manual_seed(6)
    fused = drop_add(x, b, 0.3, True)
    torch.manual_seed(6)
    unfused = x + drop_path(b, 0.3, True)
    assert torch.equal(fused, unfused)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [1.5, 1.0000001, -0.1, float("nan"), "0.1", None, True])
def test_bad_rates_raise_value_error_naming_the_value(bad: object) -> None:
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(").replace(")", r"\)")):
        drop_path(torch.ones(2, 2), bad, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        drop_add(torch.ones(2), torch.ones(2), bad, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DropPath(bad)  # type: ignore[arg-type]


def test_unknown_mode_and_scaling_list_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"row.*batch"):
        drop_path(torch.ones(2, 2), 0.1, True, mode="sample")
    with pytest.raises(ValueError, match=r"inverted.*expected.*none"):
        drop_add(torch.ones(2), torch.ones(2), 0.1, True, scaling="linear")
    with pytest.raises(ValueError, match="row"):
        DropPath(0.1, mode="block")


def test_rank_zero_rejected_and_rank_one_works() -> None:
    with pytest.raises(ValueError, match="rank"):
        drop_path(torch.tensor(1.0), 0.5, True)
    out = drop_path(torch.ones(1000), 0.5, True)
    assert set(out.tolist()) <= {0.0, 2.0}


def test_mutated_rate_is_checked_when_set() -> None:
    m = DropPath(0.1).train()
    with pytest.raises(ValueError, match=r"\[0, 1\], but got 1\.5"):
        m.drop_prob = 1.5
    assert m.drop_prob == 0.1
    m.drop_prob = 0.25
    assert m._rate.item() == 0.25  # the tensor copy compiled graphs read follows
    assert dict(m.state_dict()) == {} and list(m.buffers()) == []


# --------------------------------------------------------------------------- dtypes, seeds
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_devices(dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(7)
    x = torch.randn(128, 4, 3, dtype=dtype, device=device)
    b = torch.randn(128, 4, 3, dtype=dtype, device=device)
    out = drop_add(x, b, 0.5, True)
    assert out.dtype == dtype and out.device.type == device
    dropped = dropped_rows(out, x)
    kept = ~dropped
    assert dropped.any() and kept.any()
    # The scale is applied in the op's accumulation type: one rounding to ``dtype``.
    ref = (x.double() + 2.0 * b.double()).to(dtype)
    assert torch.equal(out[kept], ref[kept])


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_manual_seed_reproduces_masks(mode: str) -> None:
    x = torch.randn(32, 8)
    torch.manual_seed(8)
    a = [drop_path(x, 0.5, True, mode=mode) for _ in range(5)]
    torch.manual_seed(8)
    b = [drop_path(x, 0.5, True, mode=mode) for _ in range(5)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_scale_by_keep_false_maps_to_no_scaling() -> None:
    torch.manual_seed(9)
    x = torch.ones(200, 2)
    out = drop_path(x, 0.5, True, scale_by_keep=False)
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert DropPath(0.1, scale_by_keep=False).scaling == "none"


# --------------------------------------------------------------------------- module
def test_module_repr_and_attributes() -> None:
    m = DropPath(0.125, mode="batch", scaling="expected")
    assert "drop_prob=0.125" in repr(m) and "mode=batch" in repr(m) and "expected" in repr(m)
    m.drop_prob = 0.2
    assert m.drop_prob == 0.2 and m.mode == "batch" and m.scaling == "expected"


def test_module_matches_timm_contract() -> None:
    from timm.layers import DropPath as TimmDropPath

    x = torch.randn(64, 10)
    ours, theirs = DropPath(0.3).train(), TimmDropPath(0.3).train()
    torch.manual_seed(10)
    a = ours(x)
    torch.manual_seed(10)
    b = theirs(x)
    assert torch.equal(a, b)
    assert ours.eval()(x) is x


def test_fx_keeps_droppath_a_leaf_and_reads_training_at_run_time() -> None:
    model = nn.Sequential(nn.Linear(4, 4), DropPath(0.5))
    gm = fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1"]
    x = torch.randn(256, 4)
    gm.eval()
    assert torch.equal(gm(x), model[0](x))
    gm.train()
    torch.manual_seed(11)
    assert bool((gm(x) == 0).all(dim=1).any())  # dropping happens: training was not baked in


def test_torchscript_eval() -> None:
    model = nn.Sequential(nn.Linear(4, 4), DropPath(0.5)).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(3, 4)
    assert torch.equal(scripted(x), model(x))


def test_host_generator_batch_decisions_are_shared_by_seed() -> None:
    a = DropPath(0.5, mode="batch", seed=42).train()
    b = DropPath(0.5, mode="batch", seed=42).train()
    x, r = torch.randn(4, 3), torch.randn(4, 3)
    seq_a = [bool(torch.equal(a(x, r), r)) for _ in range(64)]
    torch.manual_seed(123)  # the global RNG does not matter: each rank draws alike
    seq_b = [bool(torch.equal(b(x, r), r)) for _ in range(64)]
    assert seq_a == seq_b and len(set(seq_a)) == 2


def test_batch_host_drop_keeps_branch_in_graph() -> None:
    m = DropPath(0.99, mode="batch", seed=0).train()
    w = nn.Parameter(torch.ones(3))
    x = torch.randn(4, 3)
    out = m(x * w, x)
    out.sum().backward()
    assert w.grad is not None  # zero or scaled, never missing (DDP needs every grad)


def test_keep_count_and_subset_scatter() -> None:
    assert keep_count(10, 0.3) == 7 and keep_count(3, 0.9) == 1 and keep_count(1, 0.5) == 1
    m = DropPath(0.5, skip=True).train()
    r = torch.zeros(8, 2)
    idx = m.keep_indices(r)
    assert idx.shape == (4,) and len(set(idx.tolist())) == 4
    out = m.scatter_add(r, torch.ones(4, 2), idx)
    assert torch.equal(out[idx], torch.full((4, 2), 2.0))  # scale B/k = 8/4
    assert int((out.sum(dim=1) == 0).sum()) == 4


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_subset_gather_and_scatter_match_plain_indexing(fmt: torch.memory_format) -> None:
    """The skip path's row gather/scatter: same values and gradients as plain indexing,
    memory format kept (BatchNorm/conv backward are slow on mismatched layouts)."""
    from dpatch.rows import gather_rows

    torch.manual_seed(0)
    idx = torch.tensor([6, 0, 3, 5, 1])
    x = torch.randn(8, 3, 4, 5).contiguous(memory_format=fmt)
    b = torch.randn(5, 3, 4, 5).contiguous(memory_format=fmt)
    w1, w2 = torch.randn(5, 3, 4, 5), torch.randn(8, 3, 4, 5)
    m = DropPath(0.5, skip=True)

    def run(ours: bool) -> tuple[torch.Tensor, ...]:
        xx, bb = x.clone().requires_grad_(), b.clone().requires_grad_()
        if ours:
            g = gather_rows(xx, idx)
            out = m.scatter_add(xx, bb, idx)
        else:
            g = xx[idx]
            out = xx.clone()
            out = out.index_put((idx,), out[idx] + bb * (8 / 5))
        ((g * w1).sum() + (out * w2).sum()).backward()
        assert xx.grad is not None and bb.grad is not None
        return g.detach(), out.detach(), xx.grad, bb.grad

    ours, ref = run(True), run(False)
    for a, r in zip(ours, ref, strict=True):
        assert torch.allclose(a, r, atol=1e-6)
    if fmt == torch.channels_last:
        assert all(t.is_contiguous(memory_format=fmt) for t in ours)


# --------------------------------------------------------------------------- rate 1
# timm and torchvision accept p = 1: training always drops the branch, with no division by
# zero; eval follows the scaling (identity, or branch * (1 - p) = 0 for "expected").
SCALINGS = ["inverted", "expected", "none"]


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_rate_one_always_drops_in_training(mode: str, scaling: str) -> None:
    torch.manual_seed(12)
    x = torch.randn(64, 5, requires_grad=True)
    b = torch.randn(64, 5, requires_grad=True)
    for _ in range(3):
        assert torch.equal(drop_path(b, 1.0, True, mode=mode, scaling=scaling), torch.zeros(64, 5))
        out = drop_add(x, b, 1.0, True, mode=mode, scaling=scaling, alpha=0.5)
        assert torch.equal(out, x)
    out.sum().backward()
    assert x.grad is not None and b.grad is not None
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(b.grad, torch.zeros_like(b))  # connected (DDP), zero, not NaN


@pytest.mark.parametrize("scaling", SCALINGS)
def test_rate_one_eval_follows_the_scaling(scaling: str) -> None:
    x, b = torch.randn(8, 3), torch.randn(8, 3)
    path, add = (
        drop_path(b, 1.0, False, scaling=scaling),
        drop_add(x, b, 1.0, False, scaling=scaling),
    )
    if scaling == "expected":  # the branch times its survival probability 0
        assert torch.equal(path, torch.zeros_like(b)) and torch.equal(add, x)
    else:
        assert path is b and torch.equal(add, x + b)


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_rate_one_module_both_forms_and_grads(mode: str, scaling: str) -> None:
    torch.manual_seed(13)
    m = DropPath(1.0, mode=mode, scaling=scaling).train()
    assert m.drop_prob == 1.0 and m._rate.item() == 1.0
    w = nn.Parameter(torch.ones(3))
    x, r = torch.randn(16, 3), torch.randn(16, 3)
    assert torch.equal(m(x * w), torch.zeros(16, 3))
    out = m(x * w, r, 2.0)
    assert torch.equal(out, r)
    out.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros(3))
    m.eval()
    expect = r if scaling == "expected" else r + x
    assert torch.equal(m(x, r), expect)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_rate_one_batch_host_generator_always_drops(scaling: str) -> None:
    m = DropPath(1.0, mode="batch", scaling=scaling, seed=3).train()
    w = nn.Parameter(torch.ones(3))
    x, r = torch.randn(4, 3), torch.randn(4, 3)
    assert not any(m.keep_batch() for _ in range(100))
    assert m.batch_scale() == 0.0  # no division by zero, and nothing added if used
    out = m(x * w, r)
    assert torch.equal(out, r) and torch.equal(m(x), torch.zeros(4, 3))
    out.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros(3))


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_rate_one_rate_tensor_path_gives_no_nan(mode: str, scaling: str) -> None:
    """The compiled graphs' path reads the rate from a tensor: 1/keep is inf there."""
    from dpatch.droppath import _drop_rate_tensor

    x = torch.randn(32, 4, requires_grad=True)
    r = torch.randn(32, 4)
    one = torch.tensor(1.0)
    assert torch.equal(_drop_rate_tensor(x, r, 1.0, one, mode, scaling), r)
    assert torch.equal(_drop_rate_tensor(x, None, 0.5, one, mode, scaling), torch.zeros(32, 4))
    _drop_rate_tensor(x, r, 1.0, one, mode, scaling).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros(32, 4))
    # rate 0 is still the plain residual and an intermediate rate still scales kept rows
    assert torch.equal(_drop_rate_tensor(x, r, 1.0, torch.tensor(0.0), mode, scaling), x + r)
    half = _drop_rate_tensor(x, None, 1.0, torch.tensor(0.5), "row", scaling).detach()
    kept = half.ne(0).all(dim=1)
    scale = 2.0 if scaling == "inverted" else 1.0
    assert kept.any() and torch.equal(half[kept], x.detach()[kept] * scale)


@pytest.mark.slow
def test_rate_one_under_torch_compile() -> None:
    torch.manual_seed(14)
    m = DropPath(0.3).train()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x, r = torch.randn(16, 4), torch.randn(16, 4)
    compiled(x, r)
    m.drop_prob = 1.0  # the rate is read from a tensor: no recompile, no NaN
    out = compiled(x, r)
    assert torch.equal(out, r)


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_rate_one_scripted(mode: str, scaling: str) -> None:
    m = DropPath(1.0, mode=mode, scaling=scaling)
    scripted = torch.jit.script(m)
    x, r = torch.randn(8, 3), torch.randn(8, 3)
    scripted.train()
    assert torch.equal(scripted(x), torch.zeros(8, 3))
    assert torch.equal(scripted(x, r), r)
    scripted.eval()
    assert torch.equal(scripted(x, r), r if scaling == "expected" else r + x)
    assert torch.equal(scripted(x), torch.zeros(8, 3) if scaling == "expected" else x)


def test_rate_one_skip_mode_keeps_no_row() -> None:
    assert keep_count(10, 1.0) == 0 and keep_count(1, 1.0) == 0 and keep_count(3, 0.99) == 1
    m = DropPath(1.0, skip=True).train()
    assert m.skips()
    r = torch.randn(6, 2, requires_grad=True)
    idx = m.keep_indices(r)
    assert idx.shape == (0,) and idx.dtype == torch.long
    w = nn.Parameter(torch.ones(2))
    branch = r[idx] * w  # the branch computed on no row
    out = m.scatter_add(r, branch, idx, 0.5)
    assert torch.equal(out, r.detach())
    out.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros(2))
    assert r.grad is not None and torch.equal(r.grad, torch.ones(6, 2))


class _ConvBlock(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def test_rate_one_skip_patched_model_computes_no_branch_row() -> None:
    """A skipping site at p = 1 runs its branch on zero rows: the output is the shortcut,
    BatchNorm's running statistics stay untouched, parameters get zero gradients."""
    import dpatch

    torch.manual_seed(15)
    model = nn.Sequential(_ConvBlock(), _ConvBlock())
    x = torch.randn(4, 4, 6, 6)
    dpatch.inject(model, 0.5, schedule="uniform", skip=True, example_inputs=(x,))
    slots = [m for m in model.modules() if isinstance(m, DropPath)]
    assert len(slots) == 2 and all(m.skip for m in slots)
    for m in slots:
        m.drop_prob = 1.0
    model.train()
    bn = model[0].f[1]
    before = bn.running_mean.clone(), bn.running_var.clone()
    out = model(x)
    assert torch.equal(out, x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    out.sum().backward()
    conv = model[0].f[0]
    assert conv.weight.grad is not None and torch.equal(
        conv.weight.grad, torch.zeros_like(conv.weight)
    )
