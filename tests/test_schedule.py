"""Schedules: pure functions, checked against their formulas."""

from __future__ import annotations

import itertools
import math

import pytest

from dpatch import expected_depth, schedule_rates
from dpatch.errors import InvalidValueError


def test_linear_matches_timm_linspace() -> None:
    import torch

    rates = schedule_rates("linear", 12, 0.3)
    timm = [x.item() for x in torch.linspace(0, 0.3, 12)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx(timm, abs=1e-7)


def test_linear_with_min_rate() -> None:
    assert schedule_rates("linear", 3, 0.3, 0.1) == pytest.approx([0.1, 0.2, 0.3])


def test_uniform_huang_efficientnet() -> None:
    assert schedule_rates("uniform", 3, 0.2) == [0.2, 0.2, 0.2]
    assert schedule_rates("huang", 4, 0.5) == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert schedule_rates("efficientnet", 4, 0.2) == pytest.approx([0.0, 0.05, 0.1, 0.15])


def test_cosine_endpoints_and_midpoint() -> None:
    rates = schedule_rates("cosine", 5, 0.4, 0.0)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.4)
    assert rates[2] == pytest.approx(0.2)
    assert rates[1] == pytest.approx(0.4 * (1 - math.cos(math.pi / 4)) / 2)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_single_block_gets_max(kind: str) -> None:
    assert schedule_rates(kind, 1, 0.3) == [0.3]


def test_zero_depth_is_empty() -> None:
    assert schedule_rates("linear", 0, 0.3) == []


def test_custom() -> None:
    assert schedule_rates("custom", 3, 0.0, rates=[0.0, 0.1, 0.2]) == [0.0, 0.1, 0.2]
    with pytest.raises(InvalidValueError, match="3 values but the model has 4"):
        schedule_rates("custom", 4, 0.0, rates=[0.0, 0.1, 0.2])
    with pytest.raises(InvalidValueError, match="custom rate #1"):
        schedule_rates("custom", 2, 0.0, rates=[0.0, 1.2])
    with pytest.raises(InvalidValueError, match="needs rates"):
        schedule_rates("custom", 2, 0.1)


@pytest.mark.parametrize("bad", [1.0, -0.01, float("nan"), "0.2", None])
def test_bad_max_rate_named(bad: object) -> None:
    with pytest.raises(ValueError, match="max_rate"):
        schedule_rates("linear", 4, bad)  # type: ignore[arg-type]


def test_other_errors() -> None:
    with pytest.raises(InvalidValueError, match="unknown schedule 'step'"):
        schedule_rates("step", 4, 0.1)
    with pytest.raises(InvalidValueError, match=r"min_rate=0\.3 is above"):
        schedule_rates("linear", 4, 0.1, 0.3)
    with pytest.raises(InvalidValueError, match="no meaning for schedule 'huang'"):
        schedule_rates("huang", 4, 0.1, 0.05)
    with pytest.raises(InvalidValueError, match="only used with schedule 'custom'"):
        schedule_rates("linear", 2, 0.1, rates=[0.1, 0.1])
    with pytest.raises(InvalidValueError, match="depth"):
        schedule_rates("linear", -1, 0.1)


def test_expected_depth() -> None:
    assert expected_depth([0.0, 0.5, 0.5]) == pytest.approx(2.0)
    # Huang et al.: linear decay to p_L = 0.5 over L blocks keeps about 3L/4 of them.
    rates = schedule_rates("huang", 54, 0.5)
    assert expected_depth(rates) == pytest.approx(54 - 0.5 * 55 / 2)


def test_exponential_is_layerskip_d_of_l() -> None:
    """LayerSkip's D(l) = e^(l ln2 / (L-1)) - 1 (torchtune get_scale(EXP, L-1, l)) times
    p_max: 0 at the first block, p_max at the last, rising faster towards the end."""
    rates = schedule_rates("exponential", 5, 0.2)
    expected = [0.2 * (math.exp(i * math.log(2) / 4) - 1) for i in range(5)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[0] == 0.0 and rates[-1] == 0.2
    steps = [b - a for a, b in itertools.pairwise(rates)]
    assert all(b > a for a, b in itertools.pairwise(steps))
    assert schedule_rates("exponential", 1, 0.3) == [0.3]
    with pytest.raises(InvalidValueError, match="no meaning for schedule 'exponential'"):
        schedule_rates("exponential", 4, 0.2, 0.1)
