"""One settings record: checked where it is built, merged defaults < recipe < given, and the
keyword signatures of inject/retune are its fields."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import PlainRes, example

import dpatch
from dpatch.errors import InvalidValueError
from dpatch.settings import DEFAULTS, KEPT, SETTING_NAMES, Settings


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_rate": 1.0}, "max_rate has to be in [0, 1)"),
        ({"max_rate": "0.2"}, "max_rate must be a number"),
        ({"min_rate": -0.1}, "min_rate has to be in [0, 1)"),
        ({"schedule": "steep"}, "unknown schedule 'steep'"),
        ({"mode": "rows"}, "unknown mode 'rows'"),
        ({"scaling": "inv"}, "unknown scaling 'inv'"),
        ({"per": "layer"}, "unknown per 'layer'"),
        ({"skip": 1}, "skip must be True or False"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"rates": [0.1, 1.2]}, "rates[1] has to be in [0, 1]"),
        ({"rates": "0.1"}, "rates must be a list"),
        ({"rates": [0.1], "schedule": "linear"}, "rates are for schedule 'custom'"),
        ({"schedule": "native", "min_rate": 0.1}, "no meaning for schedule 'native'"),
        ({"max_rate": 0.1, "min_rate": 0.2, "schedule": "linear"}, "min_rate"),
    ],
)
def test_bad_values_fail_where_the_record_is_built(kwargs: dict, needle: str) -> None:
    with pytest.raises(InvalidValueError) as info:
        Settings(**kwargs)
    assert needle in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_merging_and_keeping() -> None:
    given = Settings(max_rate=0.3, mode="batch")
    merged = given.over(DEFAULTS)
    assert (merged.max_rate, merged.mode, merged.schedule) == (0.3, "batch", "linear")
    assert merged.skip is False
    kept = given.over(DEFAULTS.without(KEPT))
    assert (kept.mode, kept.scaling, kept.skip, kept.seed) == ("batch", None, None, None)
    assert Settings.of({"max_rate": 0.2, "model": object()}) == Settings(max_rate=0.2)
    assert Settings(rates=[0.1, 0.2]).rates == (0.1, 0.2)  # a list becomes a tuple


@pytest.mark.parametrize("fn", [dpatch.inject, dpatch.retune])
def test_inject_and_retune_take_the_record_fields_as_keywords(fn: object) -> None:
    params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    for name in SETTING_NAMES:
        assert name in params and params[name].default is None, name
    assert "settings" in params


def test_settings_or_keywords_not_both() -> None:
    torch.manual_seed(0)
    model = PlainRes()
    report = dpatch.inject(model, settings=Settings(max_rate=0.3, schedule="uniform"),
                           example_inputs=(example(),))  # fmt: skip
    assert {s.rate for s in report.sites} == {0.3}
    with pytest.raises(InvalidValueError, match="not both"):
        dpatch.inject(model, 0.2, settings=Settings(max_rate=0.3), example_inputs=(example(),))


def test_rates_without_custom_are_refused_not_ignored() -> None:
    torch.manual_seed(0)
    with pytest.raises(InvalidValueError, match="custom"):
        dpatch.inject(PlainRes(), rates=[0.2], example_inputs=(example(),))


def test_many_checkpoints_check_settings_before_any_work(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    from safetensors.torch import save_file

    from dpatch.files import patch_many, prepare_batch

    files = [str(Path(str(tmp_path)) / f"{n}.safetensors") for n in "ab"]
    for f in files:
        save_file({"w": torch.zeros(1)}, f)
    import dpatch.files._batch as batch_module

    built: list[object] = []
    monkeypatch.setattr(batch_module, "_build", lambda members: built.append(members))
    batch = prepare_batch(files)
    with pytest.raises(InvalidValueError, match="unknown schedule"):
        list(patch_many("inject", batch, model="tv:resnet18", schedule="steep"))
    assert built == []
