"""DropPathScheduler: time schedules, steps and epochs, resuming, bad input, compiled graphs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import PlainRes, example
from torch import nn

from dpatch import DropPath, DropPathScheduler, inject
from dpatch.errors import InvalidValueError


def rates(model: nn.Module) -> list[float]:
    return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


def patched(depth: int = 2, rate: float = 0.4, schedule: str = "linear") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[PlainRes() for _ in range(depth)])
    inject(model, rate, schedule=schedule, example_inputs=(example(),))
    return model


def uniform(rate: float = 0.4, depth: int = 2) -> nn.Module:
    return patched(depth, rate, "uniform")


# --------------------------------------------------------------------------- moved from
# test_training.py (assertions unchanged)
def test_linear_warmup_scheduler() -> None:
    model = nn.Sequential(PlainRes(), PlainRes())
    inject(model, 0.4, schedule="linear", example_inputs=(example(),))
    sched = DropPathScheduler(model, kind="linear", warmup_steps=4)
    rates = lambda: [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]  # noqa: E731
    assert rates() == [0.0, 0.0]
    sched.step()
    assert rates() == pytest.approx([0.0, 0.1])
    for _ in range(10):
        sched.step()
    assert rates() == pytest.approx([0.0, 0.4])
    state = sched.state_dict()
    again = DropPathScheduler(model, kind="linear", warmup_steps=4)
    again.load_state_dict(state)
    assert again.last_step == 11 and rates() == pytest.approx([0.0, 0.4])


def test_progressive_layer_drop_matches_deepspeed() -> None:
    """Layer i of L keeps with 1 - i/L (1 - theta(t)), theta = (1-theta_bar)e^(-gamma t) +
    theta_bar (Zhang & He 2020), from huang targets with max 1 - theta_bar."""
    theta_bar, gamma, depth = 0.5, 0.01, 4
    model = nn.Sequential(*[PlainRes() for _ in range(depth)])
    inject(model, 1 - theta_bar, schedule="huang", example_inputs=(example(),))
    sched = DropPathScheduler(model, kind="progressive", gamma=gamma)
    for t in range(1, 300):
        sched.step()
        theta = (1 - theta_bar) * math.exp(-gamma * t) + theta_bar
        got = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
        want = [i / depth * (1 - theta) for i in range(1, depth + 1)]
        assert got == pytest.approx(want)


def test_exp_ramp_is_layerskip_curriculum() -> None:
    """LayerSkip's p(l, t) = S(t) D(l) p_max with S(t) = e^(t ln2 / T) - 1: 0 at the start,
    p_max * D(l) once t reaches T (the run's length, or warmup_steps), and no further."""
    model = patched(4, 0.2, "exponential")
    targets = rates(model)
    sched = DropPathScheduler(model, kind="exp-ramp", total_steps=10)
    assert rates(model) == [0.0] * 4
    for t in range(1, 13):
        sched.step()
        s = 1.0 if t >= 10 else math.exp(t * math.log(2) / 10) - 1
        assert rates(model) == pytest.approx([s * p for p in targets], rel=1e-12), t
    assert sched.current_factor == 1.0
    short = DropPathScheduler(patched(4, 0.2, "exponential"), kind="exp-ramp", warmup_steps=4,
                              total_steps=10)  # fmt: skip
    assert [short.factor(t) for t in (0, 2, 4, 9)] == pytest.approx([0.0, 2**0.5 - 1, 1.0, 1.0])


def test_scheduler_errors() -> None:
    with pytest.raises(InvalidValueError, match="inject"):
        DropPathScheduler(nn.Sequential(PlainRes()), warmup_steps=3)
    model = nn.Sequential(PlainRes())
    inject(model, 0.1, example_inputs=(example(),))
    with pytest.raises(InvalidValueError, match="warmup_steps"):
        DropPathScheduler(model, kind="linear", warmup_steps=0)
    with pytest.raises(InvalidValueError, match="'cosine'"):
        DropPathScheduler(model, kind="cosine")


# --------------------------------------------------------------------------- kinds
def factors(sched: DropPathScheduler, steps: int) -> list[float]:
    """The factor in effect for each of the first ``steps`` optimizer steps."""
    out = [sched.current_factor]
    for _ in range(steps - 1):
        sched.step()
        out.append(sched.current_factor)
    return out


def test_warmup_is_linear_alias() -> None:
    a = DropPathScheduler(uniform(), kind="warmup", warmup_steps=4)
    b = DropPathScheduler(uniform(), kind="linear", warmup_steps=4)
    assert b.kind == "warmup"
    assert factors(a, 6) == factors(b, 6) == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1])


def test_constant_keeps_targets() -> None:
    model = patched(3, 0.3)
    sched = DropPathScheduler(model, kind="constant")
    assert rates(model) == pytest.approx([0.0, 0.15, 0.3])
    sched.step()
    assert rates(model) == pytest.approx([0.0, 0.15, 0.3]) and sched.current_factor == 1.0


def test_early_linear_matches_facebookresearch_dropout() -> None:
    """facebookresearch/dropout drop_scheduler(mode="early", schedule="linear"):
    np.linspace(rate, 0, early_iters) for the first early_iters steps, then 0."""
    model = uniform(0.5)
    sched = DropPathScheduler(model, kind="early", shape="linear", cutoff=5)
    got = factors(sched, 8)
    want = [1 - i / 4 for i in range(5)] + [0.0] * 3  # linspace(1, 0, 5)
    assert got == pytest.approx(want)
    assert rates(model) == [0.0, 0.0]


def test_early_constant_and_late() -> None:
    early = DropPathScheduler(uniform(), kind="early", cutoff=3)
    assert factors(early, 5) == [1, 1, 1, 0, 0]
    model = uniform(0.4)
    late = DropPathScheduler(model, kind="late", cutoff=3)
    assert rates(model) == [0.0, 0.0]
    assert factors(late, 5) == [0, 0, 0, 1, 1]
    assert rates(model) == pytest.approx([0.4, 0.4])


def test_cutoff_fraction_of_total_steps() -> None:
    """Liu et al.'s 50 of 300 epochs at 10 steps an epoch: the switch is at step 500."""
    sched = DropPathScheduler(uniform(), kind="late", cutoff_fraction=50 / 300, total_steps=3000)
    assert sched.cutoff == 500
    sched.step_update(499)
    assert sched.current_factor == 0.0
    sched.step()
    assert sched.current_factor == 1.0


def test_step_milestones() -> None:
    """PVT's recipe: rate 0 for the first part of training, then on."""
    model = uniform(0.4)
    sched = DropPathScheduler(model, kind="step", milestones=[(2, 0.0), (4, 0.5), (5, 2.0)])
    assert factors(sched, 7) == [1, 1, 0, 0, 0.5, 2, 2]
    assert rates(model) == pytest.approx([0.8, 0.8])


def test_callable_factor() -> None:
    model = uniform(0.4)
    sched = DropPathScheduler(model, kind=lambda t: 0.5 * (1 + math.cos(math.pi * t / 10)))
    assert sched.kind == "callable"
    sched.step_update(5)
    assert sched.current_factor == pytest.approx(0.5)
    assert rates(model) == pytest.approx([0.2, 0.2])


def test_readouts_for_logging() -> None:
    model = patched(3, 0.3)
    sched = DropPathScheduler(model, kind="warmup", warmup_steps=2)
    sched.step()
    assert sched.current_factor == 0.5
    assert sched.current_rates == pytest.approx(
        {"0.drop_path": 0.0, "1.drop_path": 0.075, "2.drop_path": 0.15}
    )
    assert sched.target_rates == pytest.approx(
        {"0.drop_path": 0.0, "1.drop_path": 0.15, "2.drop_path": 0.3}
    )
    assert sched.mean_rate == pytest.approx(0.075)


def names_are_slots(model: nn.Module, sched: DropPathScheduler) -> bool:
    return set(sched.current_rates) == {
        n for n, m in model.named_modules() if isinstance(m, DropPath)
    }


def test_rate_names_are_module_names() -> None:
    model = patched(3, 0.3)
    assert names_are_slots(model, DropPathScheduler(model, kind="constant"))


# --------------------------------------------------------------------------- steps/epochs
def test_step_update_and_step_epoch_follow_timm_convention() -> None:
    """timm: step_update(num_updates) after each update, step(epoch + 1) after an epoch."""
    a = DropPathScheduler(uniform(), kind="warmup", warmup_steps=40, steps_per_epoch=10)
    b = DropPathScheduler(uniform(), kind="warmup", warmup_steps=40, steps_per_epoch=10)
    for _ in range(20):
        a.step()
    b.step_update(20)
    assert a.last_step == b.last_step == 20 and a.current_factor == b.current_factor == 0.5
    b.step_epoch(3)  # start of epoch 3
    assert b.last_step == 30 and b.current_factor == 0.75
    b.step_update(30)  # idempotent
    assert b.last_step == 30


def test_step_epoch_needs_steps_per_epoch() -> None:
    sched = DropPathScheduler(uniform(), kind="constant")
    with pytest.raises(InvalidValueError, match="steps_per_epoch"):
        sched.step_epoch(1)
    assert sched.last_step == 0


# --------------------------------------------------------------------------- resume
KINDS = {
    "warmup": {"kind": "warmup", "warmup_steps": 6},
    "progressive": {"kind": "progressive", "gamma": 0.3},
    "exp-ramp": {"kind": "exp-ramp", "total_steps": 8},
    "early-linear": {"kind": "early", "shape": "linear", "cutoff": 7},
    "late": {"kind": "late", "cutoff_fraction": 0.5, "total_steps": 10},
    "step": {"kind": "step", "milestones": [(3, 0.5), (6, 1.5)]},
}


@pytest.mark.parametrize("name", list(KINDS))
def test_resume_continues_exactly(name: str) -> None:
    """Train N steps, save as JSON, resume on a fresh model: rates at N+k equal an
    uninterrupted run's."""
    model = patched(3, 0.5)
    sched = DropPathScheduler(model, **KINDS[name])
    history = []
    for _ in range(10):
        history.append(rates(model))
        sched.step()
    fresh = patched(3, 0.5)
    again = DropPathScheduler(fresh, **KINDS[name])
    replay = DropPathScheduler(patched(3, 0.5), **KINDS[name])
    for _ in range(4):
        replay.step()
    again.load_state_dict(json.loads(json.dumps(replay.state_dict())))
    resumed = []
    for _ in range(6):
        resumed.append(rates(fresh))
        again.step()
    assert resumed == history[4:]


def test_resume_restores_targets_and_kind_from_state() -> None:
    """A scheduler built with other settings takes the saved ones (targets and schedule)."""
    model = patched(2, 0.4)
    sched = DropPathScheduler(model, kind="early", cutoff=5)
    for _ in range(2):
        sched.step()
    state = sched.state_dict()
    other = patched(2, 0.2)
    again = DropPathScheduler(other, kind="warmup", warmup_steps=100)
    again.load_state_dict(state)
    assert again.kind == "early" and again.last_step == 2
    assert rates(other) == pytest.approx([0.0, 0.4])


def test_callable_state_needs_the_function_again() -> None:
    fn = lambda t: min(1.0, t / 5)  # noqa: E731
    model = uniform(0.4)
    sched = DropPathScheduler(model, kind=fn)
    for _ in range(3):
        sched.step()
    state = sched.state_dict()
    assert state["kind"] == "callable" and state["last_step"] == 3
    fresh = uniform(0.4)
    plain = DropPathScheduler(fresh, kind="constant")
    with pytest.raises(InvalidValueError, match="same function"):
        plain.load_state_dict(state)
    assert plain.kind == "constant" and rates(fresh) == [0.4, 0.4]  # nothing changed
    again = DropPathScheduler(fresh, kind=fn)
    again.load_state_dict(state)
    assert again.last_step == 3 and rates(fresh) == pytest.approx([0.24, 0.24])


def test_state_from_another_model_changes_nothing() -> None:
    sched = DropPathScheduler(patched(3), kind="warmup", warmup_steps=4)
    state = sched.state_dict()
    model = patched(2)
    other = DropPathScheduler(model, kind="warmup", warmup_steps=4)
    other.step()
    before = rates(model)
    with pytest.raises(InvalidValueError, match="another model") as info:
        other.load_state_dict(state)
    assert "\n" not in str(info.value) and "2.drop_path" in str(info.value)
    assert other.last_step == 1 and rates(model) == before


def test_state_of_dpatch_0_1_loads() -> None:
    """The first format had only kind/last_step/warmup_steps/gamma/targets."""
    model = patched(2, 0.4)
    sched = DropPathScheduler(model, kind="constant")
    sched.load_state_dict(
        {"kind": "linear", "last_step": 2, "warmup_steps": 4, "gamma": 0.001,
         "targets": {"0.drop_path": 0.0, "1.drop_path": 0.4}}
    )  # fmt: skip
    assert sched.kind == "warmup" and rates(model) == pytest.approx([0.0, 0.2])


# --------------------------------------------------------------------------- bad input
BAD = [
    ({"kind": "cosine"}, "'cosine'"),
    ({"kind": "early", "cutoff": 20, "total_steps": 10}, "cutoff 20 is beyond total_steps 10"),
    ({"kind": "early"}, "cutoff"),
    ({"kind": "early", "cutoff": 3, "cutoff_fraction": 0.5, "total_steps": 10}, "exactly one"),
    ({"kind": "late", "cutoff_fraction": 0.2}, "needs total_steps"),
    ({"kind": "late", "cutoff_fraction": 1.5, "total_steps": 10}, "1.5"),
    ({"kind": "early", "cutoff": 3, "shape": "cosine"}, "'cosine'"),
    ({"kind": "late", "cutoff": 3, "shape": "linear"}, "shape='linear' has no meaning"),
    ({"kind": "warmup", "warmup_steps": 3, "cutoff": 4}, "cutoff=4 has no meaning"),
    ({"kind": "step", "milestones": [(5, 0.5), (3, 1.0)]}, "out of order: step 3"),
    ({"kind": "step", "milestones": [(5, 0.5), (5, 1.0)]}, "out of order: step 5"),
    ({"kind": "step", "milestones": [(5, 2.5)]}, "factor 2.5 is outside"),
    ({"kind": "step", "milestones": [(5, -0.5)]}, "-0.5"),
    ({"kind": "step", "milestones": [(50, 0.5)], "total_steps": 10}, "beyond total_steps"),
    ({"kind": "step", "milestones": []}, "empty"),
    ({"kind": lambda t: 3.0}, "factor 3.0 is outside"),
    ({"kind": "warmup", "warmup_steps": True}, "True"),
    ({"kind": "constant", "total_steps": 0}, "total_steps"),
    ({"kind": "progressive", "gamma": -1.0}, "-1.0"),
    ({"kind": "exp-ramp"}, "needs total_steps"),
    ({"kind": "exp-ramp", "warmup_steps": 20, "total_steps": 10}, "beyond total_steps 10"),
    ({"kind": "exp-ramp", "total_steps": 10, "gamma": 0.1}, "gamma=0.1 has no meaning"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_changes_nothing(kwargs: dict, message: str) -> None:
    model = uniform(0.4)  # factor limit 1 / 0.4 = 2.5
    with pytest.raises(InvalidValueError) as info:
        DropPathScheduler(model, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert rates(model) == [0.4, 0.4]


def test_callable_going_bad_mid_run_changes_nothing() -> None:
    model = uniform(0.4)
    sched = DropPathScheduler(model, kind=lambda t: 1.0 if t < 3 else float("nan"))
    sched.step_update(2)
    with pytest.raises(InvalidValueError, match="step 3"):
        sched.step()
    assert sched.last_step == 2 and rates(model) == [0.4, 0.4]


# --------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_compiled_graph_follows_scheduler_without_recompiling() -> None:
    """Masking sites read the rate tensor the scheduler fills: after the early phase the
    compiled training forward is the plain (eval) computation, with no recompile."""
    torch._dynamo.reset()
    model = uniform(0.5)
    sched = DropPathScheduler(model, kind="early", cutoff=2)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = example()
    model.train()
    compiled(x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        sched.step()
        sched.step()  # factor 0 from here
        out = compiled(x)
    assert sched.current_factor == 0.0
    assert torch.allclose(out, model.eval()(x), atol=1e-6)
