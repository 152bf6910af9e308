"""Published recipes: the numbers against their sources, size detection, and the arguments
they hand to inject and the scheduler."""

from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch
import torchvision
from helpers import PlainRes, example
from torch import nn

from dpatch import DropPath, DropPathScheduler, inject
from dpatch.errors import InvalidValueError
from dpatch.recipes import (
    Recipe,
    Source,
    get_recipe,
    list_recipes,
    model_shape,
    resolve_recipe,
)

# The figures of the sources (see /work/shared/ANCHORS.md and each recipe's source.url):
# (recipe, size) -> (rate, per-layer schedule).
PUBLISHED = {
    ("deit", None): (0.1, "linear"),
    ("deit3-in1k", "S"): (0.05, "uniform"),
    ("deit3-in1k", "B"): (0.2, "uniform"),
    ("deit3-in1k", "L"): (0.45, "uniform"),
    ("deit3-in1k", "H"): (0.6, "uniform"),
    ("deit3-in21k", "S"): (0.05, "uniform"),
    ("deit3-in21k", "B"): (0.1, "uniform"),
    ("deit3-in21k", "L"): (0.3, "uniform"),
    ("deit3-in21k", "H"): (0.5, "uniform"),
    ("deit3-in21k-ft", "S"): (0.05, "uniform"),
    ("deit3-in21k-ft", "B"): (0.15, "uniform"),
    ("deit3-in21k-ft", "L"): (0.4, "uniform"),
    ("deit3-in21k-ft", "H"): (0.45, "uniform"),
    ("convnext-in1k", "T"): (0.1, "linear"),
    ("convnext-in1k", "S"): (0.4, "linear"),
    ("convnext-in1k", "B"): (0.5, "linear"),
    ("convnext-in1k", "L"): (0.5, "linear"),
    ("convnext-in22k", "B"): (0.1, "linear"),
    ("convnext-in22k", "L"): (0.1, "linear"),
    ("convnext-in22k", "XL"): (0.2, "linear"),
    ("convnext-in22k-ft", "B"): (0.2, "linear"),
    ("convnext-in22k-ft", "L"): (0.3, "linear"),
    ("convnext-in22k-ft", "XL"): (0.4, "linear"),
    ("swin", "T"): (0.2, "linear"),
    ("swin", "S"): (0.3, "linear"),
    ("swin", "B"): (0.5, "linear"),
    ("dinov2", "S"): (0.3, "uniform"),
    ("dinov2", "B"): (0.3, "uniform"),
    ("dinov2", "L"): (0.4, "uniform"),
    ("dinov2", "g"): (0.4, "uniform"),
    ("huang-cifar", None): (0.5, "huang"),
    ("early-sd-vit-t", None): (0.5, "linear"),
    ("late-sd-vit-b", None): (0.4, "linear"),
    ("composer-resnet", "50"): (0.2, "huang"),
    ("composer-resnet", "101"): (0.4, "huang"),
    ("layerskip", None): (0.2, "exponential"),
}


@pytest.mark.parametrize(("name", "size"), list(PUBLISHED), ids=[f"{n}-{s}" for n, s in PUBLISHED])
def test_rates_match_the_sources(name: str, size: str | None) -> None:
    r = resolve_recipe(name, size=size)
    assert (r.max_rate, r.inject_kwargs["schedule"]) == PUBLISHED[(name, size)]
    assert r.size == size and r.size_from == ("argument" if size else "")


def test_every_size_of_every_recipe_is_in_the_table() -> None:
    listed = {(r.name, s.size) for r in list_recipes() for s in r.sizes}
    listed |= {(r.name, None) for r in list_recipes() if not r.sized}
    assert listed == set(PUBLISHED)


def test_modes_and_time_schedules() -> None:
    huang = resolve_recipe("huang-cifar").inject_kwargs
    assert (huang["mode"], huang["scaling"], huang["per"]) == ("batch", "expected", "block")
    composer = resolve_recipe("composer-resnet", size="50").inject_kwargs
    assert (composer["mode"], composer["scaling"]) == ("batch", "expected")
    assert resolve_recipe("dinov2", size="g").inject_kwargs["skip"] is True
    early = resolve_recipe("early-sd-vit-t").scheduler_kwargs
    assert early == {"kind": "early", "shape": "linear", "cutoff_fraction": 50 / 300}
    late = resolve_recipe("late-sd-vit-b").scheduler_kwargs
    assert late == {"kind": "late", "cutoff_fraction": 50 / 300}
    assert resolve_recipe("deit").scheduler_kwargs == {"kind": "constant"}
    assert resolve_recipe("deit").needs_total_steps is False
    assert resolve_recipe("late-sd-vit-b").needs_total_steps is True
    layerskip = resolve_recipe("layerskip")
    assert layerskip.scheduler_kwargs == {"kind": "exp-ramp"} and layerskip.needs_total_steps
    assert (layerskip.inject_kwargs["per"], layerskip.inject_kwargs["scaling"]) == (
        "block",
        "none",
    )
    assert "could not be checked" in layerskip.recipe.notes


def test_every_recipe_cites_a_paper_and_a_file_in_listing_and_json() -> None:
    for r in list_recipes():
        assert r.source.paper and r.source.url.startswith("https://github.com/"), r.name
        row = r.summary()
        assert set(row) == {"name", "title", "rates", "schedule", "time", "source"}
        assert r.source.url in row["source"] and r.source.paper in row["source"]
        data = json.loads(json.dumps(r.to_dict()))
        assert data["source"] == {"paper": r.source.paper, "url": r.source.url,
                                  "detail": r.source.detail}  # fmt: skip
        size = r.sizes[0].size if r.sized else None
        resolved = json.loads(json.dumps(resolve_recipe(r.name, size=size).to_dict()))
        assert resolved["source"]["url"] == r.source.url and resolved["recipe"] == r.name


def test_results_are_frozen_and_kwargs_fresh() -> None:
    r = resolve_recipe("deit")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.max_rate = 0.9  # type: ignore[misc]
    kwargs = r.inject_kwargs
    kwargs["max_rate"] = 0.9
    assert r.inject_kwargs["max_rate"] == 0.1


# --------------------------------------------------------------------------- bad input
def one_line(exc: pytest.ExceptionInfo[InvalidValueError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_unknown_recipe_names_it_and_lists_choices() -> None:
    with pytest.raises(InvalidValueError) as info:
        get_recipe("deit4")
    message = one_line(info)
    assert "'deit4'" in message and "deit3-in1k" in message and "composer-resnet" in message
    assert get_recipe("DeiT") is get_recipe("deit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "deit3-in1k", "size": "XXL"}, "unknown size 'XXL'"),
        ({"name": "deit3-in1k"}, "size="),
        ({"name": "deit", "size": "B"}, "size='B' has no meaning"),
    ],
)
def test_bad_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidValueError) as info:
        resolve_recipe(**kwargs)
    assert message in one_line(info)


def test_size_aliases() -> None:
    for alias in ("L", "l", "large", "ViT-L", "vit_large"):
        assert resolve_recipe("deit3-in1k", size=alias).size == "L"
    assert resolve_recipe("composer-resnet", size="ResNet-101").max_rate == 0.4
    assert resolve_recipe("dinov2", size="giant").size == "g"


def test_own_recipes_are_checked() -> None:
    src = Source("me", "https://github.com/me/x")
    with pytest.raises(InvalidValueError, match="'cosinus'"):
        Recipe("mine", "t", "cosinus", src, max_rate=0.1)
    with pytest.raises(InvalidValueError, match="either max_rate or sizes"):
        Recipe("mine", "t", "linear", src)
    with pytest.raises(InvalidValueError, match=r"1\.5"):
        Recipe("mine", "t", "linear", src, max_rate=1.5)
    mine = Recipe("mine", "t", "uniform", src, max_rate=0.3, mode="batch")
    assert resolve_recipe(mine).inject_kwargs["mode"] == "batch"


# --------------------------------------------------------------------------- sizes from models
def meta(factory: object, *args: object, **kwargs: object) -> nn.Module:
    with torch.device("meta"):
        return factory(*args, **kwargs)  # type: ignore[operator, no-any-return]


DETECT = [
    ("timm", "vit_small_patch16_224", "deit3-in1k", "S"),
    ("timm", "vit_base_patch16_224", "deit3-in21k", "B"),
    ("timm", "vit_large_patch16_224", "deit3-in21k-ft", "L"),
    ("timm", "vit_huge_patch14_224", "deit3-in1k", "H"),
    ("timm", "convnext_tiny", "convnext-in1k", "T"),
    ("timm", "convnext_small", "convnext-in1k", "S"),
    ("tv", "convnext_base", "convnext-in1k", "B"),
    ("timm", "convnext_xlarge", "convnext-in22k", "XL"),
    ("timm", "swin_tiny_patch4_window7_224", "swin", "T"),
    ("tv", "swin_s", "swin", "S"),
    ("timm", "swin_base_patch4_window7_224", "swin", "B"),
    ("timm", "vit_giant_patch14_dinov2", "dinov2", "g"),
    ("tv", "resnet50", "composer-resnet", "50"),
    ("timm", "resnet101", "composer-resnet", "101"),
]


@pytest.mark.parametrize(("lib", "arch", "recipe", "size"), DETECT, ids=[d[1] for d in DETECT])
def test_size_read_from_the_model(lib: str, arch: str, recipe: str, size: str) -> None:
    model = (
        meta(timm.create_model, arch) if lib == "timm" else meta(getattr(torchvision.models, arch))
    )
    r = resolve_recipe(recipe, model)
    assert (r.size, r.size_from) == (size, "model")
    assert r.max_rate == PUBLISHED[(recipe, size)][0]


def test_size_argument_wins_over_the_model() -> None:
    model = meta(timm.create_model, "vit_small_patch16_224")
    assert resolve_recipe("deit3-in1k", model, size="B").size == "B"


def test_unrecognised_model_asks_for_size() -> None:
    model = meta(timm.create_model, "vit_tiny_patch16_224")  # width 192: no DeiT III size
    with pytest.raises(InvalidValueError) as info:
        resolve_recipe("deit3-in1k", model)
    message = one_line(info)
    assert "12 residual blocks, width 192" in message and "size=" in message


def test_model_without_residuals_asks_for_size() -> None:
    with pytest.raises(InvalidValueError, match="size="):
        model_shape(nn.Sequential(nn.Linear(8, 8)), (torch.randn(2, 8),))


# --------------------------------------------------------------------------- applying one
def test_resolved_recipe_drives_inject_and_scheduler() -> None:
    """early-sd-vit-t on a 3-block model, 12 steps: cutoff 50/300 of 12 = 2 steps, with the
    linear early shape linspace(1, 0, 2); targets timm-linear 0, 0.25, 0.5."""
    torch.manual_seed(0)
    model = nn.Sequential(*[PlainRes() for _ in range(3)])
    r = resolve_recipe("early-sd-vit-t")
    report = inject(model, **r.inject_kwargs, example_inputs=(example(),))
    assert report.rates == pytest.approx((0.0, 0.25, 0.5))
    sched = DropPathScheduler(model, **r.scheduler_kwargs, total_steps=12)
    rates = lambda: [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]  # noqa: E731
    assert rates() == pytest.approx([0.0, 0.25, 0.5])
    sched.step()
    assert rates() == [0.0, 0.0, 0.0]
    assert sched.cutoff == 2


def test_huang_recipe_sets_batch_mode_and_expected_scaling() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[PlainRes() for _ in range(4)])
    report = inject(model, **resolve_recipe("huang-cifar").inject_kwargs,
                    example_inputs=(example(),))  # fmt: skip
    assert {(s.mode, s.scaling) for s in report.sites} == {("batch", "expected")}
    assert report.rates == pytest.approx((0.125, 0.25, 0.375, 0.5))


# --------------------------------------------------------------------------- inject/CLI wiring
def test_inject_with_a_recipe_reads_the_size_and_explicit_arguments_win() -> None:
    import timm

    from dpatch import inject

    model = timm.create_model("vit_small_patch16_224")
    report = inject(model, recipe="deit3-in1k")
    assert {s.rate for s in report.sites} == {0.05} and report.schedule == "uniform"
    assert report.recipe is not None and report.recipe["size"] == "S"
    assert report.recipe["size_from"] == "model"
    report = inject(model, recipe="deit3-in1k", size="B", schedule="linear")
    assert report.schedule == "linear" and max(s.rate for s in report.sites) == 0.2
    assert report.to_dict()["recipe"]["recipe"] == "deit3-in1k"


def test_size_without_recipe_and_unknown_recipe_are_errors() -> None:
    from dpatch import inject

    model = nn.Sequential(PlainRes(), PlainRes())
    with pytest.raises(InvalidValueError, match="size='B' needs recipe="):
        inject(model, size="B", example_inputs=(example(),))
    with pytest.raises(InvalidValueError, match="unknown recipe 'nope'"):
        inject(model, recipe="nope", example_inputs=(example(),))
    assert not any(isinstance(m, DropPath) for m in model.modules())


def test_cli_recipes_listing_and_recipe_option(tmp_path: object) -> None:
    import json

    from helpers import cli, one_line_error

    code, out, _ = cli("recipes", "--json")
    assert code == 0
    doc = {r["name"]: r for r in json.loads(out)}
    assert doc["deit3-in1k"]["source"]["url"].startswith("https://github.com/facebookresearch/")
    assert all(r["source"]["paper"] and r["source"]["url"] for r in doc.values())
    out_file = f"{tmp_path}/vit.safetensors"
    code, out, err = cli(
        "inject", "timm:vit_small_patch16_224", "--recipe", "deit3-in1k", "-o", out_file, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["recipe"]["size"] == "S"
    code, out, _ = cli("inspect", out_file, "--json")
    assert json.loads(out)["recipe"]["recipe"] == "deit3-in1k"  # the manifest keeps it
    code, _, err = cli("inject", "tv:resnet18", "--recipe", "swin")
    assert code == 1
    one_line_error(err, "recipe 'swin'", "--size")
