"""Hugging Face transformers as a zoo: one tiny-config model of every vision family with
residual blocks (``hf_families.json``), the ``hf:`` specs, saving and loading, and the
command line's one-line errors.

Per family (marker ``zoo``):

- invariants: state_dict keys and tensors unchanged, eval output bit-identical after
  ``inject``, train output at rate 0 bit-identical (``helpers.check_invariants``; for a
  ``ModelOutput`` the first field, ``logits`` or ``last_hidden_state``, is compared);
- sites: a family whose blocks carry DropPath slots (``*DropPath`` modules, or the
  ``nn.Identity`` transformers builds at rate 0) has one residual site per slot call of a
  forward on a residual (``coverage="slots"``: the author's choice of branches); any other
  family has one site per residual addition, counted by hand from its modeling code
  (``residual_adds``, with a note); with ``coverage="all"`` every family has one site per
  residual addition;
- native parity where the config has ``drop_path_rate``: ``schedule="native"`` gives every
  site the rate of its slot in ``from_config(config with drop_path_rate=r)``, and every slot
  that transformers gives a rate is a site.

The tables below list where dpatch and the oracle differ and what cannot work, with the
reason; each entry is checked, so it fails when the cause goes away.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import check_invariants, split_families
from safetensors.torch import load_file
from test_cli import cli, one_line_error
from torch import nn

import dpatch
from dpatch import find_sites, inject
from dpatch.analysis import analyze, probe, site_list
from dpatch.models import build_light, create_model, parse_spec, spec_of

transformers = pytest.importorskip("transformers")

#: The families the installed transformers has; the others (4.x lacks newer classes) are
#: named by ``test_families_the_installed_transformers_lacks``.
FAMILIES, MISSING = split_families(
    json.loads((Path(__file__).parent / "hf_families.json").read_text()),
    lambda f: hasattr(transformers, f["class"]),
)
IDS = [f["family"] for f in FAMILIES]
RATE = 0.3

#: Additions dpatch takes for residual that the oracle does not count, by block class:
#: sums inside a mixing layer or of two streams, not a skip around a block's branch. They
#: are sites wherever unslotted additions are (``coverage="all"``, or a model without slots).
EXTRA_SITES: dict[str, tuple[dict[str, int], str]] = {
    "dpt": (
        {"DPTFeatureFusionLayer": 3},
        "`hidden_state + self.residual_layer1(residual)` merges the top-down stream with the "
        "next backbone feature (a fusion, as torchvision's FPN top-down sum)",
    ),
    "focalnet": (
        {"FocalNetModulation": 3},
        "`ctx_all + ctx * gate` sums the gated focal levels (level l+1 is computed from "
        "level l), a multi-scale aggregation",
    ),
    "swiftformer": (
        {"SwiftFormerEfficientAdditiveAttention": 4},
        "`self.proj(global_queries * key) + query` adds the attention's own query "
        "(as torchvision's MViTv2 pooling residual, which its oracle does not count either)",
    ),
}
#: DropPath calls transformers makes on no residual branch: (calls per forward, why). Not
#: sites on a residual; dpatch reports a slot module whose every call is off the residual
#: as a ``residual=False`` site, and leaves a call of a slot it also uses on a residual
#: unreported (CvT).
OFF_RESIDUAL: dict[str, tuple[int, str]] = {
    "cvt": (
        6,
        "CvtLayer calls drop_path again on the output of CvtOutput, which already holds "
        "the residual: it drops the whole hidden state of a sample",
    ),
    "poolformer": (
        0,  # under the attribute `drop`, not counted among the drop_path* calls
        "PoolFormerOutput.drop applies DropPath(drop_path) to the MLP's hidden and output "
        "activations (timm and the paper use Dropout there)",
    ),
}
#: Families whose config has ``drop_path_rate`` but whose rate reaches no DropPath module:
#: ``schedule="native"`` raises instead of guessing.
NO_NATIVE_SLOTS = {
    "levit": "LevitResidualLayer keeps config.drop_path_rate as its own drop_rate attribute",
    "swin2sr": "Swin2SRStage takes its layers' rates but never passes them to Swin2SRLayer, so "
    "config.drop_path_rate reaches no module (every layer keeps nn.Identity)",
}
#: Families that cannot be built here at all.
UNBUILDABLE = {
    "dinat": ("DinatModel", "needs the natten package (neighbourhood-attention kernels)"),
}
_SLOT_NAMES = ("drop_path", "drop_path1", "drop_path2")


def build(fam: dict[str, Any], light: bool = False, drop_path_rate: Any = None) -> nn.Module:
    needs = fam.get("needs_transformers")
    if needs and int(transformers.__version__.split(".")[0]) < int(needs):
        pytest.skip(f"{fam['family']}: {fam['needs_transformers_why']}")
    cls = getattr(transformers, fam["class"])
    config = cls.config_class(**fam["config"])
    if drop_path_rate is not None:
        # past the validator: LeViT's and TimeSformer's configs annotate it as an int
        object.__setattr__(config, "drop_path_rate", drop_path_rate)
    torch.manual_seed(0)
    model = build_light(lambda: cls(config)) if light else cls(config)
    return model.eval()


def example(fam: dict[str, Any], meta: bool = False) -> torch.Tensor:
    size = (2, *fam["input_size"])
    if meta:
        return torch.empty(size, device="meta")
    return torch.randn(size, generator=torch.Generator().manual_seed(0))


def drop_rate(module: nn.Module) -> float | None:
    """A transformers stochastic-depth module's rate (read here, not by dpatch)."""
    if type(module).__name__.endswith("DropPath"):
        return float(module.drop_prob)
    return None


def slot_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``*DropPath`` modules, and the ``nn.Identity`` transformers builds in their place at
    rate 0 (attribute ``drop_path``/``drop_path1``/``drop_path2``)."""
    return {
        name: m
        for name, m in model.named_modules()
        if drop_rate(m) is not None
        or (isinstance(m, nn.Identity) and name.rsplit(".", 1)[-1] in _SLOT_NAMES)
    }


def slot_calls(model: nn.Module, x: torch.Tensor) -> int:
    """Calls of the slots under a residual slot name (``drop_path*``) in one forward."""
    calls = [0]
    hooks = [
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for name, m in slot_modules(model).items()
        if name.rsplit(".", 1)[-1] in _SLOT_NAMES
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls[0]


def native_value(config: Any, rate: float) -> Any:
    """``config.drop_path_rate`` for a model-wide rate: a float, or for CvT's per-stage list
    the list scaled so its largest entry is ``rate``."""
    current = config.drop_path_rate
    if isinstance(current, list | tuple):
        top = max(current)
        return [rate * v / top for v in current] if top > 0 else [rate] * len(current)
    return rate


# --------------------------------------------------------------------------- sweeps
def test_families_the_installed_transformers_lacks() -> None:
    if MISSING:
        pytest.skip(
            f"transformers {transformers.__version__} lacks {len(MISSING)} families, left out "
            "of the sweeps: " + ", ".join(f"{f['family']} ({f['class']})" for f in MISSING)
        )
    assert all(hasattr(transformers, f["class"]) for f in FAMILIES)


@pytest.mark.zoo
@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_invariants(fam: dict[str, Any]) -> None:
    model = build(fam)
    x = example(fam)
    problems = list(check_invariants(model, x, lambda m: inject(m, 0.2, example_inputs=(x,))))
    assert problems == []


@pytest.mark.zoo
@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_sites(fam: dict[str, Any]) -> None:
    model = build(fam)
    x = example(fam)
    calls = slot_calls(model, x) - OFF_RESIDUAL.get(fam["family"], (0, ""))[0]
    assert calls <= fam["residual_adds"], "a slot the oracle does not count"
    extra, _why = EXTRA_SITES.get(fam["family"], ({}, ""))

    def count(sites: list[Any], expected: int) -> None:
        by_class = Counter(type(model.get_submodule(s.path)).__name__ for s in sites)
        assert {cls: by_class[cls] for cls in extra} == extra
        assert len(sites) - sum(extra.values()) == expected

    an = analyze(model, (x,))
    found = site_list(an)
    # sites on a residual addition (slots on no residual are sites marked residual=False)
    sites = [s for s in found if s.residual]
    if calls:
        assert len(sites) == calls, [(p, r[:80]) for p, r in an.skipped]
        assert {s.kind for s in sites} == {"native"}
    else:
        count(sites, fam["residual_adds"])
        assert {s.kind for s in sites} == {"graph"}
    off = {s.slot for s in found if not s.residual}
    if fam["family"] == "poolformer":
        assert off and all(name.endswith(".output.drop") for name in off)
    else:
        assert off == set()  # CvT's second drop_path call is not reported (see OFF_RESIDUAL)
    count([s for s in find_sites(model, (x,), coverage="all") if s.residual], fam["residual_adds"])


def has_native_rate(fam: dict[str, Any]) -> bool:
    """Whether the family's config has ``drop_path_rate`` (on an instance: transformers 4.x
    sets config fields in ``__init__``, 5.x declares them on the class)."""
    cls = getattr(transformers, fam["class"])
    return hasattr(cls.config_class(**fam["config"]), "drop_path_rate")


NATIVE = [f for f in FAMILIES if has_native_rate(f)]


@pytest.mark.zoo
@pytest.mark.parametrize("fam", NATIVE, ids=[f["family"] for f in NATIVE])
def test_native_parity(fam: dict[str, Any]) -> None:
    """inject(schedule='native', r) == the rates of from_config(drop_path_rate=r)."""
    x = example(fam, meta=True)
    model = build(fam, light=True)
    if fam["family"] in NO_NATIVE_SLOTS:
        with pytest.raises(dpatch.InvalidValueError, match="no DropPath module"):
            inject(model, RATE, schedule="native", example_inputs=(x,))
        return
    report = inject(model, RATE, schedule="native", example_inputs=(x,))
    value = native_value(model.config, RATE)
    ref = build(fam, light=True, drop_path_rate=value)
    slots = slot_modules(ref)
    rates = {n: drop_rate(m) or 0.0 for n, m in slots.items()}
    assert any(r > 0 for r in rates.values())
    for s in report.sites:
        assert s.rate == pytest.approx(rates.get(s.origin, 0.0), abs=1e-6), s.name
    seen = probe(ref, (x,)).order
    called = {n for n, m in slots.items() if id(m) in seen}
    mine = {s.origin for s in report.sites}
    assert {n for n in called if rates[n] > 0} <= mine


@pytest.mark.zoo
@pytest.mark.parametrize("family", sorted(UNBUILDABLE))
def test_unbuildable_families(family: str) -> None:
    cls_name, reason = UNBUILDABLE[family]
    cls = getattr(transformers, cls_name)
    with pytest.raises(ImportError, match="natten"):
        cls(cls.config_class())
    assert reason


# --------------------------------------------------------------------------- specs
TINY_BEIT = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
#: Convolutional, so any image size runs (the CLI's probe uses 224 px).
TINY_CONVNEXT = {"num_stages": 2, "hidden_sizes": [8, 16], "depths": [1, 2], "num_labels": 3}


def test_parse_specs(tmp_path: Path) -> None:
    spec, note = parse_spec("hf:BeitForImageClassification")
    assert (spec.source, spec.name, spec.text, note) == (
        "transformers",
        "BeitForImageClassification",
        "hf:BeitForImageClassification",
        None,
    )
    assert parse_spec("hf:facebook/convnext-tiny-224")[0].name == "facebook/convnext-tiny-224"
    assert parse_spec("transformers:google/vit-base-patch16-224")[0].text.startswith("hf:")
    model = transformers.ConvNextModel(transformers.ConvNextConfig(**TINY_CONVNEXT))
    model.save_pretrained(tmp_path / "cn")
    assert parse_spec(f"hf:{tmp_path / 'cn'}")[0].name == str(tmp_path / "cn")
    with pytest.raises(dpatch.ModelNotFoundError, match=r"no config\.json"):
        parse_spec(f"hf:{tmp_path}")
    with pytest.raises(dpatch.ModelNotFoundError, match="does not exist"):
        parse_spec("hf:./no/such/dir")
    with pytest.raises(dpatch.ModelNotFoundError, match="did you mean BeitModel"):
        parse_spec("hf:BeitModle")
    with pytest.raises(dpatch.InvalidValueError, match="task 'fly'"):
        parse_spec("hf:org/name", task="fly")


def test_class_spec_builds_from_default_config_with_overrides() -> None:
    model = create_model("hf:BeitForImageClassification", drop_path_rate=0.2, **TINY_BEIT)
    assert type(model).__name__ == "BeitForImageClassification"
    assert model.config.hidden_size == 32 and model.config.drop_path_rate == 0.2
    assert spec_of(model).text == "hf:BeitForImageClassification"
    with pytest.raises(dpatch.InvalidValueError, match="drop_pth_rate"):
        create_model("hf:BeitModel", drop_pth_rate=0.1)
    with pytest.raises(dpatch.InvalidValueError, match=r"ViTConfig.*drop_path_rate"):
        create_model("hf:ViTModel", drop_path_rate=0.1)  # transformers#18137
    with pytest.raises(dpatch.InvalidValueError, match="names a class"):
        create_model("hf:BeitModel", pretrained=True)


def test_directory_spec_loads_its_weights_and_picks_its_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(**TINY_CONVNEXT)
    saved = transformers.ConvNextForImageClassification(config)
    saved.save_pretrained(tmp_path / "with")
    model = create_model(f"hf:{tmp_path / 'with'}")
    assert type(model) is type(saved)  # config.architectures, not AutoModel
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), saved.state_dict().values(), strict=True)
    )
    base = create_model(f"hf:{tmp_path / 'with'}", task="base", drop_path_rate=0.1)
    assert type(base).__name__ == "ConvNextModel" and base.config.drop_path_rate == 0.1
    bare = transformers.ConvNextConfig(**TINY_CONVNEXT)
    bare.save_pretrained(tmp_path / "bare")  # a config and no weights: random weights
    assert type(create_model(f"hf:{tmp_path / 'bare'}")).__name__ == "ConvNextModel"
    with pytest.raises(dpatch.WeightsError, match="holds no weights"):
        create_model(f"hf:{tmp_path / 'bare'}", pretrained=True)
    with pytest.raises(dpatch.ModelNotFoundError, match="no depth-estimation model"):
        create_model(f"hf:{tmp_path / 'bare'}", task="depth-estimation")


def test_levit_with_its_own_inline_drop_is_reported_in_one_line() -> None:
    # LevitResidualLayer drops its branch itself, with torch.rand on the batch size, when
    # training at drop_path_rate > 0: the training-mode trace of an eval-mode model fails
    # there, the block keeps its own forward, and the reason (a many-line torch argument
    # error) is cut to its first line
    (fam,) = [f for f in FAMILIES if f["family"] == "levit"]
    model = build(fam, drop_path_rate=0.3).eval()
    report = inject(model, 0.2, example_inputs=(example(fam),))
    assert report.sites and not any(s.fused for s in report.sites)
    assert report.skipped and all("\n" not in s.reason for s in report.skipped)
    assert all(s.reason.startswith("not patched: ") for s in report.skipped)


def test_unknown_hub_name_offline_is_a_download_error() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(dpatch.DownloadError, match=r"offline.*hf:PATH"):
        create_model("hf:nobody-here/no-such-model")


def test_native_rates_follow_transformers_rule() -> None:
    """BEiT: linspace(0, r, layers); Swin: r*i/(N-1) over all blocks; LeViT: no slots."""
    beit = create_model("hf:BeitForImageClassification", **TINY_BEIT)
    rates = dpatch.models.native_rates(beit, 0.3)
    # transformers 4.x names them beit.encoder.layer.N, 5.x beit.layers.N
    assert sorted(rates.values()) == pytest.approx([0.15 * i for i in range(3)])
    assert all(name.endswith(".drop_path") for name in rates)
    swin = create_model(
        "hf:SwinModel", image_size=32, patch_size=4, embed_dim=16, depths=[1, 2],
        num_heads=[1, 2], window_size=4,
    )  # fmt: skip
    got = dpatch.models.native_rates(swin, 0.3)
    assert sorted(got.values()) == pytest.approx([0.0, 0.15, 0.3])
    vit = create_model("hf:ViTModel", **{k: v for k, v in TINY_BEIT.items()})
    with pytest.raises(dpatch.InvalidValueError, match="no drop_path_rate"):
        dpatch.models.native_rates(vit, 0.3)


# --------------------------------------------------------------------------- files
def test_python_built_model_saves_its_config_and_loads_back(tmp_path: Path) -> None:
    config = transformers.BeitConfig(**TINY_BEIT, num_labels=5)
    torch.manual_seed(0)
    model = transformers.BeitForImageClassification(config)  # built in Python
    report = inject(model, 0.2, example_inputs=(torch.randn(2, 3, 32, 32),))
    out = dpatch.save(model, tmp_path / "beit.safetensors", report)
    entry = dpatch.files.read_manifest(out)["model"]
    assert entry["spec"] == "hf:BeitForImageClassification"
    assert entry["class"] == "BeitForImageClassification"
    assert entry["config"]["hidden_size"] == 32 and len(entry["config"]["id2label"]) == 5
    plain = transformers.BeitForImageClassification(config)
    plain.load_state_dict(load_file(str(out)), strict=True)  # transformers' own names
    loaded = dpatch.load(out)
    assert type(loaded) is type(model) and loaded.config.num_labels == 5
    assert [
        s.rate for s in dpatch.inspect(loaded, example_inputs=(torch.randn(2, 3, 32, 32),)).sites
    ] == [s.rate for s in report.sites]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, model.eval()(x).logits)


def test_directory_model_file_loads_without_the_directory(tmp_path: Path) -> None:
    transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(**TINY_CONVNEXT)
    ).save_pretrained(tmp_path / "cn")
    model = create_model(f"hf:{tmp_path / 'cn'}")
    inject(model, 0.1)
    out = dpatch.save(model, tmp_path / "cn.safetensors")
    for f in (tmp_path / "cn").iterdir():
        f.unlink()
    (tmp_path / "cn").rmdir()
    loaded = dpatch.load(out)  # the manifest holds the config: no directory, no hub
    assert type(loaded).__name__ == "ConvNextForImageClassification"
    assert spec_of(loaded).text == f"hf:{tmp_path / 'cn'}"


def test_tied_weights_are_saved_under_both_names_and_stay_tied(tmp_path: Path) -> None:
    """BERT's decoder shares the word embeddings: the file holds both names (plain strict
    loading), and the rebuilt model ties them again."""
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    tied = ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")
    assert model.get_parameter(tied[0]) is model.get_parameter(tied[1])
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    report = inject(model, 0.1, example_inputs=(ids,))
    out = dpatch.save(model, tmp_path / "bert.safetensors", report)
    tensors = load_file(str(out))
    assert torch.equal(tensors[tied[0]], tensors[tied[1]])
    transformers.BertForMaskedLM(config).load_state_dict(tensors, strict=True)
    loaded = dpatch.load(out)
    assert loaded.get_parameter(tied[0]) is loaded.get_parameter(tied[1])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)


# --------------------------------------------------------------------------- CLI
def test_cli_inject_a_directory_and_load_the_file_into_plain_transformers(tmp_path: Path) -> None:
    config = transformers.ConvNextConfig(**TINY_CONVNEXT)
    transformers.ConvNextForImageClassification(config).save_pretrained(tmp_path / "cn")
    out = tmp_path / "cn.safetensors"
    code, stdout, err = cli(
        "inject", f"hf:{tmp_path / 'cn'}", "--max-rate", "0.2", "-o", str(out), "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["summary"]["sites"] == 3
    transformers.ConvNextForImageClassification(config).load_state_dict(
        load_file(str(out)), strict=True
    )


def test_cli_inspect_a_vit_directory_infers_its_input(tmp_path: Path) -> None:
    """A 32-px BEiT: the probe reads config.image_size (no --input-shape); BEiT's one
    drop_path serves both residuals of each of its 3 layers."""
    transformers.BeitForImageClassification(transformers.BeitConfig(**TINY_BEIT)).save_pretrained(
        tmp_path / "beit"
    )
    code, stdout, err = cli("inspect", f"hf:{tmp_path / 'beit'}", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["summary"]["sites"] == 6
    assert {s["kind"] for s in doc["sites"]} == {"native"}


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("hf:nobody-here/no-such-model", ("cannot fetch", "offline", "hf:PATH")),
        ("hf:{tmp}", ("holds no config.json",)),
        ("hf:BeitModle", ("not a local directory", "BeitModel")),
    ],
)
def test_cli_bad_hf_specs_are_one_line_errors(
    tmp_path: Path, spec: str, needles: tuple[str, ...]
) -> None:
    out = tmp_path / "out.safetensors"
    code, _, err = cli("inject", spec.format(tmp=tmp_path), "-o", str(out))
    assert code == 1
    one_line_error(err, *needles)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_cli_hf_spec_without_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    out = tmp_path / "out.safetensors"
    code, _, err = cli("inject", "hf:google/vit-base-patch16-224", "-o", str(out))
    assert code == 1
    one_line_error(err, "transformers", "pip install 'dpatch[hf]'")
    assert not out.exists()


def test_without_transformers_timm_and_torchvision_work() -> None:
    """A fresh interpreter where transformers cannot be imported: timm/tv work as before."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from dpatch.models import create_model, list_models\n"
        "assert create_model('tv:resnet18') is not None\n"
        "specs = [e.spec for e in list_models('resnet18*')]\n"
        "assert 'timm:resnet18' in specs and 'tv:resnet18' in specs, specs\n"
        "assert not any(s.startswith('hf:') for s in specs)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_cli_list_shows_transformers_and_every_torchvision_task() -> None:
    code, stdout, err = cli("list", "--source", "hf", "--json")
    assert code == 0, err
    rows = {r["model"]: r for r in json.loads(stdout)}
    assert rows["hf:BeitForImageClassification"]["native"] is True
    assert rows["hf:ViTForImageClassification"]["native"] is False
    assert rows["hf:SegformerForSemanticSegmentation"]["task"] == "semantic-segmentation"
    code, stdout, err = cli("list", "convnext*", "--source", "hf", "--json")
    assert "hf:ConvNextForImageClassification" in {r["model"] for r in json.loads(stdout)}
    code, stdout, err = cli("list", "--source", "tv", "--json")
    tasks = {r["model"]: r["task"] for r in json.loads(stdout)}
    assert tasks["tv:r3d_18"] == "video" and tasks["tv:fasterrcnn_resnet50_fpn"] == "detection"
    assert tasks["tv:raft_small"] == "optical_flow" and tasks["tv:resnet50"] == "classification"
    assert tasks["tv:deeplabv3_resnet50"] == "segmentation"
