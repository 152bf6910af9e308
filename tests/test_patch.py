"""inject / retune / strip on hand-written models: invariants, schedules, skipping."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import PlainRes, TimmSlots, check_invariants, example, run, snapshot
from torch import nn

import dpatch
from dpatch import DropPath, NoResidualSitesError, inject, retune, strip
from dpatch.errors import InvalidValueError


def slots(model: nn.Module) -> dict[str, DropPath]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DropPath)}


def test_invariants_on_user_model(net: nn.Module) -> None:
    x = example()
    problems = list(check_invariants(net, x, lambda m: inject(m, 0.3, example_inputs=(x,))))
    assert problems == []


def test_every_site_fused_and_rates_follow_schedule(net: nn.Module) -> None:
    report = inject(net, 0.4, schedule="linear", example_inputs=(example(),))
    assert len(report.sites) == 13 and report.depth == 9
    assert all(s.fused and s.kind == "graph" for s in report.sites)
    expected = [0.4 * i / 8 for i in range(9)]
    assert list(report.rates) == pytest.approx(expected)
    for s in report.sites:
        assert s.rate == pytest.approx(expected[s.block])
        assert slots(net)[s.slot].drop_prob == pytest.approx(s.rate)
    assert report.expected_depth == pytest.approx(sum(1 - r for r in expected))


def test_per_branch_gives_each_branch_a_step(net: nn.Module) -> None:
    report = inject(net, 0.24, schedule="linear", per="branch", example_inputs=(example(),))
    assert report.depth == len(report.sites) == 13
    assert [s.rate for s in report.sites] == pytest.approx([0.02 * i for i in range(13)])


def test_inject_is_idempotent(net: nn.Module) -> None:
    x = example()
    once = copy.deepcopy(net)
    r1 = inject(once, 0.2, example_inputs=(x,))
    r2 = inject(net, 0.2, example_inputs=(x,))
    r3 = inject(net, 0.2, example_inputs=(x,))
    assert r1.sites == r2.sites == r3.sites
    assert r3.changed == ()
    assert {n: type(m).__name__ for n, m in net.named_modules()} == {
        n: type(m).__name__ for n, m in once.named_modules()
    }
    assert torch.equal(run(net, x, train=False), run(once, x, train=False))


def test_inplace_false_leaves_original_alone(net: nn.Module) -> None:
    x = example()
    before = type(net.stage[0])
    report = inject(net, 0.2, inplace=False, example_inputs=(x,))
    assert type(net.stage[0]) is before and not slots(net)
    assert report.model is not None and report.model is not net and slots(report.model)


def test_retune_changes_only_rates(net: nn.Module) -> None:
    x = example()
    inject(net, 0.2, example_inputs=(x,))
    state = snapshot(net)
    report = retune(net, 0.5, schedule="uniform", example_inputs=(x,))
    assert all(s.rate == 0.5 for s in report.sites)
    assert set(report.changed) == {s.name for s in report.sites}
    again = retune(net, 0.5, schedule="uniform", example_inputs=(x,))
    assert again.changed == ()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_retune_without_slots_says_use_inject() -> None:
    with pytest.raises(NoResidualSitesError, match="inject"):
        retune(nn.Sequential(PlainRes()), 0.1, example_inputs=(example(),))


def test_native_timm_slots_are_replaced_and_fused() -> None:
    x = example()
    model = nn.Sequential(TimmSlots(), TimmSlots())
    problems = list(check_invariants(model, x, lambda m: inject(m, 0.3, example_inputs=(x,))))
    assert problems == []
    assert [type(m) for m in slots(model).values()] == [DropPath] * 4
    assert [n for n in slots(model)] == [
        "0.drop_path1",
        "0.drop_path2",
        "1.drop_path1",
        "1.drop_path2",
    ]


def test_native_schedule_needs_a_library_model(net: nn.Module) -> None:
    with pytest.raises(InvalidValueError, match="native"):
        inject(net, 0.2, schedule="native", example_inputs=(example(),))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_rate": 1.0}, "max_rate"),
        ({"max_rate": float("nan")}, "nan"),
        ({"schedule": "step"}, "schedule 'step'"),
        ({"mode": "sample"}, "mode 'sample'"),
        ({"scaling": "linear"}, "scaling 'linear'"),
        ({"per": "layer"}, "per 'layer'"),
        ({"schedule": "custom", "rates": [0.1]}, "1 values but the model has 9"),
        ({"schedule": "huang", "min_rate": 0.1}, "min_rate"),
    ],
)
def test_bad_arguments(net: nn.Module, kwargs: dict, match: str) -> None:
    args = {"max_rate": 0.1, **kwargs}
    with pytest.raises(InvalidValueError, match=match):
        inject(net, example_inputs=(example(),), **args)
    assert not slots(net)  # nothing was changed before the error


def test_strip_restores_the_original(net: nn.Module) -> None:
    x = example()
    ref = copy.deepcopy(net)
    inject(net, 0.3, example_inputs=(x,))
    assert strip(net) > 0
    assert not slots(net)
    assert {n: type(m) for n, m in net.named_modules()} == {
        n: type(m) for n, m in ref.named_modules()
    }
    assert torch.equal(run(net, x, train=True), run(ref, x, train=True))


# --------------------------------------------------------------------------- behaviour
def test_dropped_share_in_a_patched_resnet_block_matches_the_rate() -> None:
    """Binomial 4-sigma bound on the share of samples whose branch was dropped."""
    import torchvision

    torch.manual_seed(0)
    block = torchvision.models.resnet.BasicBlock(8, 8)
    n, p = 4000, 0.3
    x = torch.randn(n, 8, 2, 2)
    inject(block, p, schedule="uniform", example_inputs=(x[:2],))
    seen: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        branch, residual = args[0], args[1]
        seen.append((out == residual).flatten(1).all(dim=1) & (branch != 0).flatten(1).any(1))

    block.drop_path.register_forward_hook(hook)
    block.train()
    with torch.no_grad():
        block(x)
    dropped = int(seen[0].sum())
    sd = math.sqrt(n * p * (1 - p))
    assert abs(dropped - n * p) <= 4 * sd, dropped


def test_skip_adds_exactly_the_chosen_subset_scaled() -> None:
    """Reference by hand: out = x + (B/k) * f(x) on the k chosen rows, x elsewhere."""
    torch.manual_seed(0)
    block = PlainRes()
    ref = copy.deepcopy(block)
    x = torch.randn(10, 4, 8)
    report = inject(block, 0.3, schedule="uniform", skip=True, example_inputs=(x[:2],))
    assert [s.skip for s in report.sites] == [True]
    block.train()
    torch.manual_seed(5)
    out = block(x)
    torch.manual_seed(5)
    idx = torch.randperm(10)[:7]  # k = round(10 * 0.7)
    expected = x.clone()
    expected[idx] = x[idx] + (10 / 7) * ref.f(ref.norm(x[idx]))
    assert torch.allclose(out, expected, atol=1e-6)
    dropped = torch.ones(10, dtype=torch.bool)
    dropped[idx] = False
    assert torch.equal(out[dropped], x[dropped])


def test_skip_gradients_reach_only_computed_rows_and_every_parameter() -> None:
    torch.manual_seed(0)
    block = PlainRes()
    x = torch.randn(16, 4, 8, requires_grad=True)
    inject(block, 0.5, schedule="uniform", skip=True, example_inputs=(x[:2].detach(),))
    block.train()
    torch.manual_seed(1)
    out = block(x)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    torch.manual_seed(1)
    idx = torch.randperm(16)[:8]  # the subset the block drew
    dropped = torch.ones(16, dtype=torch.bool)
    dropped[idx] = False
    assert x.grad is not None
    # Dropped rows: only the identity shortcut carries gradient; computed rows: more.
    assert torch.equal(x.grad[dropped], w[dropped])
    assert not torch.equal(x.grad[~dropped], w[~dropped])


def test_skip_fixed_seed_reproduces() -> None:
    torch.manual_seed(0)
    block = PlainRes()
    x = torch.randn(12, 4, 8)
    inject(block, 0.5, skip=True, example_inputs=(x[:2],))
    block.train()
    torch.manual_seed(3)
    a = block(x)
    torch.manual_seed(3)
    b = block(x)
    assert torch.equal(a, b)


class FramesInBatch(nn.Module):
    """A video model that folds its 2 frames into the batch: it runs on even batches only."""

    def __init__(self) -> None:
        super().__init__()
        self.block = PlainRes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y.reshape(-1, 2, *y.shape[1:]).mean(1)


def test_skip_on_a_model_that_runs_on_no_other_batch_masks_and_says_why() -> None:
    # skip planning probes a second batch size (here 5): a model that cannot run there
    # cannot run a branch on a subset of rows either, so its sites mask, with the reason
    model = FramesInBatch()
    x = example(batch=4)
    report = inject(model, 0.5, schedule="uniform", skip=True, example_inputs=(x,))
    assert [(s.fused, s.skip) for s in report.sites] == [(True, False)]
    (note,) = [s.reason for s in report.skipped]
    assert note.startswith("skip unavailable: the model does not run at batch 5 (")
    assert "masks instead" in note
    model.train()(x).sum().backward()  # masking runs at the model's own batch


def test_skip_eval_is_bit_identical(net: nn.Module) -> None:
    x = example()
    problems = list(
        check_invariants(net, x, lambda m: inject(m, 0.3, skip=True, example_inputs=(x,)))
    )
    assert problems == []
    assert all(s.skip for s in dpatch.find_sites(net, (x,)))


def test_skip_then_mask_then_skip_again(net: nn.Module) -> None:
    x = example()
    inject(net, 0.3, skip=True, example_inputs=(x,))
    r = inject(net, 0.3, skip=False, example_inputs=(x,))
    assert not any(s.skip for s in r.sites)
    r = inject(net, 0.3, skip=True, example_inputs=(x,))
    assert all(s.skip for s in r.sites)


# --------------------------------------------------------------------------- retune keeps
def _seeds(model: nn.Module) -> list[int | None]:
    return [dp.seed for dp in slots(model).values()]


def test_retune_keeps_what_it_is_not_told_to_change(net: nn.Module) -> None:
    x = example()
    inject(net, 0.2, mode="batch", scaling="expected", skip=True, seed=7, example_inputs=(x,))
    before = {s.name: s for s in dpatch.find_sites(net, (x,))}
    seeds = _seeds(net)
    assert any(s.skip for s in before.values())
    report = retune(net, 0.1, schedule="uniform", example_inputs=(x,))
    for s in report.sites:
        assert s.rate == pytest.approx(0.1)
        assert (s.mode, s.scaling, s.skip) == (
            before[s.name].mode,
            before[s.name].scaling,
            before[s.name].skip,
        )
    assert _seeds(net) == seeds
    assert (report.mode, report.scaling, report.skip) == ("batch", "expected", True)
    assert {c.setting for c in report.changes} == {"rate"}
    moved = sum(before[s.name].rate != s.rate for s in report.sites)
    assert moved > 0 and report.changed_settings() == {"rate": moved}
    assert report.to_dict()["changes"][0]["setting"] == "rate"


def test_retune_changes_what_it_names(net: nn.Module) -> None:
    x = example()
    inject(net, 0.2, mode="batch", skip=True, example_inputs=(x,))
    report = retune(net, 0.2, mode="row", skip=False, example_inputs=(x,))
    assert all(s.mode == "row" and not s.skip for s in report.sites)
    assert {c.setting for c in report.changes} == {"mode", "skip"}
    assert all(s.scaling == "inverted" for s in report.sites)
    again = retune(net, 0.2, skip=True, seed=3, example_inputs=(x,))
    assert any(s.skip for s in again.sites) and all(s.mode == "row" for s in again.sites)
    assert _seeds(net) == [None] * len(slots(net))  # row mode keeps no host generator


def test_retune_mixed_settings_are_kept_site_by_site(net: nn.Module) -> None:
    x = example()
    inject(net, 0.2, example_inputs=(x,))
    first = next(iter(slots(net).values()))
    first.mode, first.scaling = "batch", "none"
    report = retune(net, 0.3, schedule="uniform", example_inputs=(x,))
    assert (report.mode, report.scaling) == ("mixed", "mixed")
    assert (first.mode, first.scaling, first.drop_prob) == ("batch", "none", 0.3)
    assert sum(s.mode == "batch" for s in report.sites) == 1


def test_retune_reuses_an_analysis(net: nn.Module) -> None:
    x = example()
    inject(net, 0.2, example_inputs=(x,))
    ref = copy.deepcopy(net)
    an = dpatch.analysis.analyze(net, (x,))
    fast = retune(net, 0.4, schedule="cosine", analysis=an)
    slow = retune(ref, 0.4, schedule="cosine", example_inputs=(x,))
    assert fast.sites == slow.sites and fast.changes == slow.changes
    with pytest.raises(InvalidValueError, match="same model"):
        retune(ref, 0.1, analysis=an)


def test_a_site_rate_of_one_drops_always_and_skipping_computes_nothing() -> None:
    """timm/torchvision accept p = 1 for one site; a skipping site then runs its branch on
    no row (nothing computed, every parameter still in the graph for DDP)."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 8)
    for skip in (False, True):
        block = PlainRes()
        report = inject(block, schedule="custom", rates=[1.0], skip=skip, example_inputs=(x[:2],))
        assert report.sites[0].rate == 1.0 and report.sites[0].skip == skip
        rows: list[int] = []
        block.f.register_forward_hook(lambda _m, args, _o, rows=rows: rows.append(args[0].shape[0]))
        block.train()
        assert torch.equal(block(x), x)
        assert rows == ([0] if skip else [8])  # masking computes the branch, then drops it
    with pytest.raises(InvalidValueError, match=r"max_rate has to be in \[0, 1\)"):
        inject(PlainRes(), 1.0, example_inputs=(x[:2],))
