"""Batch mode at scale, in one process: zero gradients for dropped branches, decisions
replayed under activation checkpointing, the rank check's messages. The two-process runs
(DDP, FSDP2) are in test_distributed.py."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from helpers import PlainRes, ScaledRes
from torch import nn
from torch.utils.checkpoint import checkpoint

import dpatch
from dpatch import DropPath
from dpatch.ranks import RankCheck, SlotState, attach_zero_grads, describe_mismatch


def binomial_ok(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """``count`` within n*p +- 4 sigma (a false alarm rate below 1e-4)."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


class Stack(nn.Module):
    """PlainRes blocks, optionally each under activation checkpointing."""

    def __init__(self, depth: int = 4, c: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PlainRes(c) for _ in range(depth))
        self.checkpointing = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing:
                x = checkpoint(block, x, use_reentrant=self.checkpointing == "reentrant")
            else:
                x = block(x)
        return x


def stack(skip: bool, rate: float = 0.5, mode: str = "batch") -> Stack:
    torch.manual_seed(0)
    model = Stack()
    dpatch.inject(
        model, rate, schedule="uniform", mode=mode, skip=skip, seed=3,
        example_inputs=(torch.randn(2, 8),),
    )  # fmt: skip
    return model.train()


def slots(model: nn.Module) -> list[DropPath]:
    return [m for m in model.modules() if isinstance(m, DropPath)]


# --------------------------------------------------------------------------- zero grads
def test_attach_zero_grads_keeps_values_and_gives_exact_zero_gradients() -> None:
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    residual = torch.randn(2, 5, requires_grad=True)
    out = attach_zero_grads(residual, [conv.weight, conv.bias, frozen])
    assert torch.equal(out, residual) and out.data_ptr() != residual.data_ptr()
    grad = torch.full((2, 5), float("inf"))  # 0 * inf would be NaN: no arithmetic on it
    out.backward(grad)
    assert residual.grad is not None and torch.equal(residual.grad, grad)
    assert conv.weight.grad is not None and conv.bias.grad is not None
    assert torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))
    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.bias.grad, torch.zeros(4))
    assert frozen.grad is None


def test_attach_zero_grads_without_grad_is_a_plain_copy() -> None:
    w = nn.Parameter(torch.ones(3))
    residual = torch.randn(4, 3)
    with torch.no_grad():
        out = attach_zero_grads(residual, [w])
    assert torch.equal(out, residual) and out.grad_fn is None
    assert attach_zero_grads(residual, []).grad_fn is None


def test_dropped_branch_parameters_get_zero_gradients_layer_scale_included() -> None:
    """ScaledRes: ``x + gamma * f(x)`` (gamma read as an attribute) and ``g(x) * 0.5 + x``.
    At rate 1 both branches are dropped and not computed, yet every parameter of both
    (gamma too) has a gradient of exactly zero: DDP without find_unused_parameters
    needs one."""
    torch.manual_seed(1)
    block = ScaledRes()
    x = torch.randn(4, 8)
    report = dpatch.inject(
        block, 0.5, schedule="uniform", mode="batch", skip=True, example_inputs=(x[:2],)
    )
    assert all(s.skip for s in report.sites) and len(report.sites) == 2
    for slot in slots(block):
        slot.drop_prob = 1.0
    out = block.train()(x)
    assert torch.equal(out, x)
    out.sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_kept_and_dropped_steps_of_a_patched_model() -> None:
    model = stack(skip=True)
    x = torch.randn(6, 8)
    seen = set()
    for _ in range(12):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        for block in model.blocks:
            zero = all(torch.equal(p.grad, torch.zeros_like(p)) for p in block.parameters())
            seen.add(zero)
    assert seen == {True, False}  # both happen at rate 0.5, neither leaves a None grad


def test_batch_skip_drop_share_matches_the_rate() -> None:
    """The share of dropped steps is the rate: 600 forwards of a 3-block model at 0.3."""
    model = stack(skip=True, rate=0.3)
    del model.blocks[3]
    x = torch.randn(2, 8)
    dropped = n = 0
    with torch.no_grad():
        for _ in range(600):
            h = x
            for block in model.blocks:
                out = block(h)
                dropped += bool(torch.equal(out, h))
                n += 1
                h = out
    assert binomial_ok(dropped, n, 0.3), dropped


def test_batch_skip_trains_exactly_as_batch_masking() -> None:
    """Same seed, same data: the same decisions, so the same losses step for step (the
    loss curve of masking, not only in expectation)."""
    losses = {}
    for skip in (False, True):
        model = stack(skip=skip)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(5)
        curve = []
        for _ in range(15):
            loss = model(torch.randn(6, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        losses[skip] = curve
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


# --------------------------------------------------------------------------- checkpointing
def grads_per_step(model: Stack, steps: int = 6, twice: bool = False) -> list[torch.Tensor]:
    torch.manual_seed(9)
    out = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        x = torch.randn(6, 8, requires_grad=True)
        loss = model(x).sum()
        if twice:  # two forwards before one backward (two crops, one loss)
            loss = loss + model(x * 2).pow(2).sum()
        loss.backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return out


@pytest.mark.parametrize("skip", [False, True], ids=["mask", "skip"])
@pytest.mark.parametrize("kind", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("twice", [False, True], ids=["one-forward", "two-forwards"])
def test_checkpointing_recomputes_the_decisions_the_forward_took(
    skip: bool, kind: str, twice: bool
) -> None:
    """Checkpointing runs each block's forward again in backward; the host generator is
    not part of the RNG state it restores, so without replaying the decisions a recompute
    would draw new ones (non-reentrant: an error; reentrant: silently wrong gradients)."""
    plain = grads_per_step(stack(skip), twice=twice)
    model = stack(skip)
    model.checkpointing = kind
    for a, b in zip(plain, grads_per_step(model, twice=twice), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_checkpointing_without_rng_state_is_an_error_not_a_wrong_gradient() -> None:
    model = stack(skip=True)
    x = torch.randn(6, 8, requires_grad=True)
    h = x
    for block in model.blocks:
        h = checkpoint(block, h, use_reentrant=True, preserve_rng_state=False)
    with pytest.raises(dpatch.DPatchError, match="preserve_rng_state=True"):
        h.sum().backward()


# --------------------------------------------------------------------------- rank check
def test_inject_shares_one_rank_check_and_retune_renews_it() -> None:
    model = stack(skip=True)
    first = {id(s._ranks) for s in slots(model)}
    assert len(first) == 1 and None not in {s._ranks for s in slots(model)}
    check = slots(model)[0]._ranks
    assert check is not None
    states = check.states()
    assert [s.site for s in states] == [f"blocks.{i}.drop_path" for i in range(4)]
    assert [s.seed for s in states] == [3, 4, 5, 6] and {s.mode for s in states} == {"batch"}
    dpatch.retune(model, 0.2, schedule="uniform", example_inputs=(torch.randn(2, 8),))
    assert {id(s._ranks) for s in slots(model)} != first


def test_rank_check_waits_for_a_process_group() -> None:
    model = stack(skip=True)
    model(torch.randn(2, 8))  # no process group: nothing to compare, checked later
    check = slots(model)[0]._ranks
    assert check is not None and not check.done
    assert [s.draws for s in check.states()] == [1, 1, 1, 1]


def test_mismatch_messages_name_the_rank_the_site_and_the_fix() -> None:
    def state(site: str, seed: int | None = 1, mode: str = "batch", draws: int = 0) -> SlotState:
        return SlotState(site, mode, True, seed, draws)

    a = [state("b.0"), state("b.1")]
    cases = {
        "rank 2 patched other sites than rank 0 (1 vs 2; only on rank 0: 'b.1'; only on "
        "rank 2: none)": [a, a, a[:1]],
        "the batch-mode seed of site 'b.1' is 1 on rank 0 but 9 on rank 1": [
            a,
            [state("b.0"), state("b.1", 9)],
        ],
        "site 'b.0' is mode='batch', skip=True on rank 0 but mode='row'": [
            a,
            [state("b.0", None, "row"), state("b.1")],
        ],
        "site 'b.0' has drawn 0 batch decisions on rank 0 but 2 on rank 1": [
            a,
            [state("b.0", draws=2), state("b.1")],
        ],
    }
    for expected, per_rank in cases.items():
        message = describe_mismatch(per_rank)
        assert expected in message and "\n" not in message, message


def test_rank_check_of_unpatched_slots_lists_nothing() -> None:
    assert RankCheck([]).states() == ()


# --------------------------------------------------------------------------- state
def test_pickle_and_deepcopy_restart_the_generator_and_the_check() -> None:
    model = stack(skip=True)
    model(torch.randn(2, 8))
    original = slots(model)[0]._ranks
    assert original is not None
    original.done = True  # as after a first step under torch.distributed
    clone = copy.deepcopy(model)
    assert all(s.draws == 0 and len(s._replay) == 0 for s in slots(clone))
    check = slots(clone)[0]._ranks
    assert check is not None and check is not original and not check.done
    assert all(s._ranks is check for s in slots(clone))
    again = pickle.loads(pickle.dumps(slots(model)[0]))
    assert again.draws == 0 and again.seed == 3
    # a slot pickled before the batch-mode runtime state existed
    old = DropPath(0.3, mode="batch", seed=1)
    state = old.__dict__.copy()
    for key in ("_draws", "_replay", "_ranks"):
        del state[key]
    fresh = DropPath.__new__(DropPath)
    fresh.__setstate__(state)
    assert fresh.train().keep_batch() in (True, False) and fresh.draws == 1


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_torchscript_of_a_batch_skip_model(mode: str) -> None:
    model = stack(skip=True, mode=mode).eval()
    x = torch.randn(3, 8)
    assert torch.equal(torch.jit.script(model.blocks[0])(x), model.blocks[0](x))


@pytest.mark.slow
def test_compiled_batch_skip_masks_with_the_device_generator() -> None:
    """Under torch.compile batch skipping falls back to masking (a host decision would
    break the graph): one graph, no recompiles, every parameter gets a gradient."""
    torch._dynamo.reset()
    model = stack(skip=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 8)
    compiled(x).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = [compiled(x) for _ in range(8)]
    assert all(p.grad is not None for p in model.parameters())
    assert len({tuple(o.flatten().tolist()) for o in outs}) > 1  # fresh decisions
    assert all(s.draws == 0 for s in slots(model))  # no host draw inside the graph
