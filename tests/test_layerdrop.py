"""A model's own LayerDrop (``config.layerdrop``, ``encoder_layerdrop``, ``decoder_layerdrop``,
a module's ``self.layerdrop``, fairseq's ``LayerDropModuleList``): recognised by reading
code, shown by ``inspect``, measured by ``verify``, set by ``retune``, turned off by
``inject`` where dpatch's sites sit on its layers (unless kept), put back by ``strip``,
saved in the manifest and restored by ``load``; the command line's ``--layerdrop`` and
``--keep-layerdrop``.

Transformers families (tiny random configs) run under whichever transformers is installed
(4.57 and 5.x in CI); hand-written models cover the spellings transformers does not use.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import PlainRes, cli, make_net, one_line_error
from torch import nn

import dpatch
from dpatch import LayerDrop, find_layerdrop
from dpatch.files import read_manifest
from dpatch.verification._layerdrop import LAYERDROP_DRAWS

X = (torch.randn(2, 8),)


# --------------------------------------------------------------------------- hand-written
class Stack(nn.Module):
    """fairseq-style LayerDrop spelled by hand: a float attribute, Python's ``random``."""

    def __init__(self, n: int = 4, layerdrop: float = 0.2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([PlainRes() for _ in range(n)])
        self.layerdrop = layerdrop
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.training and random.random() < self.layerdrop:
                continue
            x = layer(x)
        return self.head(x)


class Liar(Stack):
    """Claims ``layerdrop`` and skips layers at a sixth of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.training and random.random() < self.layerdrop / 6:
                continue
            x = layer(x)
        return self.head(x)


class LayerDropModuleList(nn.ModuleList):
    """fairseq's: the list drops layers while it is iterated in training."""

    def __init__(self, p: float, modules: list[nn.Module]) -> None:
        super().__init__(modules)
        self.p = p

    def __iter__(self) -> Any:
        draws = torch.empty(len(self)).uniform_()
        for i, m in enumerate(super().__iter__()):
            if not self.training or draws[i] > self.p:
                yield m


class FairseqStack(nn.Module):
    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.blocks = LayerDropModuleList(p, [PlainRes() for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Copied(nn.Module):
    """Keeps its own copy of a config value, as transformers 5 encoders do; the config lives
    on its parent (wav2vec2's adapter)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList([PlainRes() for _ in range(3)])
        self.layerdrop = getattr(config, "encoder_layerdrop", 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.layers)):
            if self.training and torch.rand([]) < self.layerdrop:
                continue
            x = self.layers[i](x)
        return x


class Holder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.encoder = Copied(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class FromDropout(Copied):
    """Mask2Former's decoder: its LayerDrop rate is copied from ``config.dropout``."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.config = config
        self.layerdrop = config.dropout


class Unused(nn.Module):
    """A config that names a layerdrop no forward reads (MiniCPM-V#1118)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(layerdrop=0.1)
        self.layers = nn.ModuleList([PlainRes() for _ in range(2)])
        self.layerdrop = self.config.layerdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def record(model: nn.Module, layers: str) -> LayerDrop:
    return next(r for r in find_layerdrop(model) if r.layers == layers)


# --------------------------------------------------------------------------- recognition
def test_hand_written_spellings_are_recognised() -> None:
    assert find_layerdrop(Stack()) == (
        LayerDrop("", "layers", 4, 0.2, "layerdrop", "layerdrop", 0.2),
    )
    assert find_layerdrop(FairseqStack()) == (
        LayerDrop("", "blocks", 3, 0.3, "blocks.p", "blocks.p", 0.3),
    )
    # the module's copy of a config value: the config (on its parent) names the rate
    held = Holder(SimpleNamespace(encoder_layerdrop=0.15))
    assert find_layerdrop(held) == (
        LayerDrop("encoder", "encoder.layers", 3, 0.15, "config.encoder_layerdrop",
                  "layerdrop", 0.15),
    )  # fmt: skip
    # copied from a config value that is not a LayerDrop rate: the attribute is its own
    dropout = FromDropout(SimpleNamespace(dropout=0.25))
    assert find_layerdrop(dropout) == (
        LayerDrop("", "layers", 3, 0.25, "layerdrop", "layerdrop", 0.25),
    )
    assert find_layerdrop(make_net()) == ()
    assert find_layerdrop(Unused()) == ()  # read by no forward: no LayerDrop


def test_a_config_layerdrop_no_forward_reads_is_a_note() -> None:
    report = dpatch.inspect(Unused(), X)
    assert report.layerdrop == ()
    assert len(report.notes) == 1
    assert "config.layerdrop is 0.1, but no forward of this model reads it" in report.notes[0]


def test_set_apart_values_are_both_shown() -> None:
    held = Holder(SimpleNamespace(encoder_layerdrop=0.15))
    held.config.encoder_layerdrop = 0.4  # after building: the copy keeps 0.15
    r = record(held, "encoder.layers")
    assert (r.rate, r.read_rate) == (0.4, 0.15)
    assert r.describe() == (
        "encoder.layers (3 layers) at 0.4 (config.encoder_layerdrop; its forward reads "
        "layerdrop = 0.15)"
    )


# --------------------------------------------------------------------------- inspect
def test_inspect_reports_layerdrop_and_json() -> None:
    report = dpatch.inspect(Stack(), X)
    assert report.layerdrop == (LayerDrop("", "layers", 4, 0.2, "layerdrop", "layerdrop", 0.2),)
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["layerdrop"] == [
        {"path": "", "layers": "layers", "count": 4, "rate": 0.2, "attr": "layerdrop",
         "read": "layerdrop", "read_rate": 0.2, "original": None}
    ]  # fmt: skip
    assert doc["layerdrop_changes"] == [] and doc["notes"] == []


@pytest.mark.parametrize("model", [Stack(layerdrop=0.5), FairseqStack(p=0.6)], ids=["py", "fs"])
def test_the_probe_sees_every_layer_of_a_model_in_training(model: nn.Module) -> None:
    """A model in training mode would skip layers in the probe; LayerDrop is paused there."""
    random.seed(0)
    torch.manual_seed(0)
    model.train()
    for _ in range(3):
        assert len(dpatch.inspect(model, X).sites) == len(model.get_submodule(
            find_layerdrop(model)[0].layers))  # fmt: skip
    assert find_layerdrop(model)[0].rate in (0.5, 0.6)  # put back


# --------------------------------------------------------------------------- inject, strip
def test_inject_turns_layerdrop_off_with_a_note_and_strip_restores_it() -> None:
    model = Stack()
    report = dpatch.inject(model, 0.1, example_inputs=X)
    assert model.layerdrop == 0.0
    assert report.layerdrop == (
        LayerDrop("", "layers", 4, 0.0, "layerdrop", "layerdrop", 0.0, original=0.2),
    )
    assert [c.to_dict() for c in report.layerdrop_changes] == [
        {"layers": "layers", "attr": "layerdrop", "before": 0.2, "after": 0.0}
    ]
    assert report.notes == (
        "turned off the model's own LayerDrop (layerdrop 0.2 -> 0) on layers: dpatch's rates "
        "replace it; keep_layerdrop=True (--keep-layerdrop) keeps both",
    )
    again = dpatch.inject(model, 0.2, example_inputs=X)  # idempotent: nothing more to turn off
    assert again.layerdrop_changes == () and record(model, "layers").original == 0.2
    assert dpatch.strip(model) == 5  # 4 blocks and the LayerDrop
    assert model.layerdrop == 0.2 and record(model, "layers").original is None


def test_keep_layerdrop_keeps_both() -> None:
    model = Stack()
    report = dpatch.inject(model, 0.1, example_inputs=X, keep_layerdrop=True)
    assert model.layerdrop == 0.2 and report.layerdrop_changes == () and report.notes == ()
    assert report.layerdrop[0].rate == 0.2


def test_inject_copy_leaves_the_original_alone() -> None:
    model = Stack()
    report = dpatch.inject(model, 0.1, example_inputs=X, inplace=False)
    assert model.layerdrop == 0.2
    assert report.model is not None and report.model.layerdrop == 0.0


def test_inject_sets_config_and_copy_and_fairseq_lists() -> None:
    held = Holder(SimpleNamespace(encoder_layerdrop=0.15))
    dpatch.inject(held, 0.1, example_inputs=X)
    assert (held.config.encoder_layerdrop, held.encoder.layerdrop) == (0.0, 0.0)
    dpatch.strip(held)
    assert (held.config.encoder_layerdrop, held.encoder.layerdrop) == (0.15, 0.15)
    fs = FairseqStack()
    report = dpatch.inject(fs, 0.1, example_inputs=X)
    assert fs.blocks.p == 0.0 and report.layerdrop_changes[0].attr == "blocks.p"
    dpatch.strip(fs)
    assert fs.blocks.p == 0.3


# --------------------------------------------------------------------------- retune
def test_retune_sets_layerdrop_and_forgets_what_inject_turned_off() -> None:
    model = Stack()
    dpatch.inject(model, 0.1, example_inputs=X)
    report = dpatch.retune(model, layerdrop=0.05, example_inputs=X)
    assert model.layerdrop == 0.05 and report.layerdrop[0].original is None
    assert [(c.before, c.after) for c in report.layerdrop_changes] == [(0.0, 0.05)]
    assert report.notes == ("set the model's own LayerDrop on layers: layerdrop 0 -> 0.05",)
    dpatch.strip(model)
    assert model.layerdrop == 0.05  # the user's value: strip leaves it


def test_retune_layerdrop_alone_needs_no_slots() -> None:
    model = Stack()
    report = dpatch.retune(model, layerdrop=0.3, example_inputs=X)
    assert model.layerdrop == 0.3 and report.layerdrop[0].rate == 0.3
    with pytest.raises(dpatch.NoSlotsError):
        dpatch.retune(Stack(), max_rate=0.2, layerdrop=0.3, example_inputs=X)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.1", True])
def test_retune_bad_layerdrop_is_one_line_and_changes_nothing(bad: Any) -> None:
    model = Stack()
    with pytest.raises(dpatch.InvalidValueError, match=r"layerdrop has to be a number in \[0, 1\)"):
        dpatch.retune(model, layerdrop=bad, example_inputs=X)
    assert model.layerdrop == 0.2


def test_retune_layerdrop_of_a_model_without_it() -> None:
    with pytest.raises(dpatch.InvalidValueError, match="no LayerDrop of its own"):
        dpatch.retune(make_net(), layerdrop=0.1)


# --------------------------------------------------------------------------- verify
def test_verify_measures_layerdrop_within_its_interval() -> None:
    random.seed(0)
    report = dpatch.verify(Stack(), example_inputs=X)
    assert report.ok, [f.line() for f in report.findings]
    (check,) = report.layerdrop
    m = check.measured
    assert m.unit == "layer" and m.draws >= LAYERDROP_DRAWS and check.passes * 4 == m.draws
    assert m.low is not None and m.high is not None and m.low <= 0.2 <= m.high
    assert sum(check.skipped) == m.dropped and check.ok
    assert report.to_dict()["layerdrop"][0]["interval"] == [m.low, m.high]


def test_verify_flags_a_model_that_skips_at_another_rate() -> None:
    random.seed(0)
    liar = Liar(layerdrop=0.3)
    report = dpatch.verify(liar, example_inputs=X)
    assert not report.ok
    (finding,) = [f for f in report.findings if f.code == "layerdrop"]
    assert finding.where == "layers" and "but layerdrop is 0.3000" in finding.message
    assert not report.layerdrop[0].ok
    ignored = dpatch.verify(liar, example_inputs=X, ignore=("layerdrop",))
    assert ignored.ok and ignored.warnings


def test_verify_after_inject_and_against_a_manifest(tmp_path: Path) -> None:
    model = Stack()
    dpatch.inject(model, 0.1, example_inputs=X)
    report = dpatch.verify(model, example_inputs=X)
    assert report.ok and report.layerdrop[0].measured.dropped == 0
    path = dpatch.save(model, tmp_path / "s.safetensors")
    manifest = read_manifest(path)
    assert manifest is not None and manifest["layerdrop"][0]["original"] == 0.2
    from dpatch.files import report_from_manifest

    declared = report_from_manifest(manifest)
    assert declared.layerdrop == dpatch.inspect(model, X).layerdrop
    model.layerdrop = 0.1  # changed behind the manifest's back
    drift = dpatch.verify(model, example_inputs=X, declared=declared)
    assert any(f.code == "declared" and f.where == "layers" for f in drift.findings)


def test_manifest_round_trip_and_strip_after_load(tmp_path: Path) -> None:
    model = Stack()
    dpatch.inject(model, 0.1, example_inputs=X)
    path = dpatch.save(model, tmp_path / "s.safetensors")
    loaded = dpatch.load(path, model=Stack())  # built with 0.2: the manifest says 0
    assert loaded.layerdrop == 0.0 and record(loaded, "layers").original == 0.2
    dpatch.strip(loaded)
    assert loaded.layerdrop == 0.2
    net = nn.Sequential(PlainRes(), PlainRes())
    plain = dpatch.save(net, tmp_path / "n.safetensors", dpatch.inspect(net, X))
    assert "layerdrop" not in (read_manifest(plain) or {})  # manifests without it unchanged


# --------------------------------------------------------------------------- transformers
transformers_only = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("transformers"), reason="needs transformers"
)

_AUDIO = {
    "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 32, "conv_dim": (8, 8), "conv_stride": (5, 4),
    "conv_kernel": (10, 8), "num_feat_extract_layers": 2, "num_conv_pos_embeddings": 8,
    "num_conv_pos_embedding_groups": 2, "layerdrop": 0.1,
}  # fmt: skip
_S2S = {
    "d_model": 16, "encoder_layers": 2, "decoder_layers": 3, "encoder_attention_heads": 2,
    "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
    "encoder_layerdrop": 0.1, "decoder_layerdrop": 0.2, "vocab_size": 64,
    "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    "decoder_start_token_id": 2,
}  # fmt: skip
_ENC = ("encoder", "encoder.layers", 2, 0.1, "config.encoder_layerdrop", "layerdrop", 0.1)
_DEC = ("decoder", "decoder.layers", 3, 0.2, "config.decoder_layerdrop", "layerdrop", 0.2)
_W2V = ("encoder", "encoder.layers", 2, 0.1, "config.layerdrop", "config.layerdrop", 0.1)
#: family: (class, config, the LayerDrop records it has)
HF: dict[str, tuple[str, dict[str, Any], list[tuple[Any, ...]]]] = {
    "wav2vec2": ("Wav2Vec2Model", _AUDIO, [_W2V]),
    "hubert": ("HubertModel", _AUDIO, [_W2V]),
    "whisper": (
        "WhisperModel",
        {**_S2S, "num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 16},
        [_ENC, _DEC],
    ),
    "bart": ("BartModel", _S2S, [_ENC, _DEC]),
    "opt": (
        "OPTModel",
        {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 32,
         "vocab_size": 64, "max_position_embeddings": 64, "word_embed_proj_dim": 16,
         "layerdrop": 0.1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
        [("decoder", "decoder.layers", 2, 0.1, "config.layerdrop", "layerdrop", 0.1)],
    ),
}  # fmt: skip
#: Inputs for families whose input dpatch cannot infer yet (Whisper's decoder ids).
WHISPER_INPUTS = (torch.randn(2, 8, 32), None, torch.ones(2, 4, dtype=torch.long))


def hf(family: str, **overrides: Any) -> nn.Module:
    import transformers

    name, config, _ = HF[family]
    cls = getattr(transformers, name)
    torch.manual_seed(0)
    return cls(cls.config_class(**{**config, **overrides})).eval()


@transformers_only
@pytest.mark.parametrize("family", list(HF))
def test_transformers_families_are_recognised_without_running(family: str) -> None:
    model = hf(family)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    assert [
        (r.path, r.layers, r.count, r.rate, r.attr, r.read, r.read_rate)
        for r in find_layerdrop(model)
    ] == HF[family][2]
    assert calls == []


@transformers_only
@pytest.mark.parametrize("family", list(HF))
def test_transformers_retune_sets_what_the_forward_reads(family: str) -> None:
    model = hf(family)
    report = dpatch.retune(
        model, layerdrop=0.05, example_inputs=WHISPER_INPUTS if family == "whisper" else None
    )
    for r in find_layerdrop(model):
        owner = model.get_submodule(r.path)
        assert r.rate == r.read_rate == 0.05
        assert getattr(model.config, r.attr.removeprefix("config.")) == 0.05
        if r.read == "layerdrop":  # transformers 5 encoders keep a copy: it is set too
            assert owner.layerdrop == 0.05
    assert {c.layers for c in report.layerdrop_changes} == {r[1] for r in HF[family][2]}


@transformers_only
@pytest.mark.parametrize(
    "family",
    ["wav2vec2", "hubert", "bart"],
)
def test_transformers_inject_turns_off_layerdrop_where_sites_are(family: str) -> None:
    model = hf(family)
    report = dpatch.inject(model, 0.1)
    carrying = {
        r.layers for r in find_layerdrop(model) if any(
            s.path.startswith(r.layers + ".") for s in report.sites)
    }  # fmt: skip
    assert "encoder.layers" in carrying  # found today in 4.57 and 5.x
    assert {c.layers for c in report.layerdrop_changes} == carrying
    for r in report.layerdrop:
        assert (r.rate == 0.0) == (r.layers in carrying)
        assert (r.original is not None) == (r.layers in carrying)
    dpatch.strip(model)
    assert [r.rate for r in find_layerdrop(model)] == [r[3] for r in HF[family][2]]


@transformers_only
def test_transformers_inspect_in_training_mode() -> None:
    """LayerDrop draws ``torch.rand`` in training; the probe runs without it."""
    model = hf("wav2vec2", layerdrop=0.5).train()
    report = dpatch.inspect(model)
    assert {s.path for s in report.sites} >= {"encoder.layers.0", "encoder.layers.1"}
    assert report.layerdrop[0].rate == 0.5 and model.config.layerdrop == 0.5


@transformers_only
def test_transformers_verify_measures_encoder_and_decoder() -> None:
    report = dpatch.verify(hf("whisper"), example_inputs=WHISPER_INPUTS)
    assert report.ok, [f.line() for f in report.findings]
    assert [c.layerdrop.layers for c in report.layerdrop] == ["encoder.layers", "decoder.layers"]
    for c in report.layerdrop:
        m = c.measured
        assert m.draws >= LAYERDROP_DRAWS and m.low is not None and m.high is not None
        assert m.low <= c.layerdrop.rate <= m.high


@transformers_only
def test_transformers_verify_flags_a_config_changed_after_building() -> None:
    model = hf("bart")
    model.config.encoder_layerdrop = 0.6  # the encoder keeps its copy (transformers 5: 0.1)
    report = dpatch.verify(model, draws=2048)
    flagged = {f.where for f in report.findings if f.code == "layerdrop"}
    copies = {r.layers for r in find_layerdrop(model) if r.read == "layerdrop"}
    assert ("encoder.layers" in flagged) == ("encoder.layers" in copies)
    assert "decoder.layers" not in flagged


@transformers_only
def test_transformers_save_load_strip(tmp_path: Path) -> None:
    model = hf("bart")
    dpatch.inject(model, 0.1)
    path = dpatch.save(model, tmp_path / "b.safetensors")
    manifest = read_manifest(path)
    assert manifest is not None and manifest["model"]["config"]["encoder_layerdrop"] == 0.0
    assert manifest["layerdrop"][0] == {**manifest["layerdrop"][0], "rate": 0.0, "original": 0.1}
    loaded = dpatch.load(path)  # rebuilt from the config (0: what the model now has)
    assert loaded.config.encoder_layerdrop == 0.0 and loaded.encoder.layerdrop == 0.0
    assert [r.to_dict() for r in find_layerdrop(loaded)] == manifest["layerdrop"]
    assert dpatch.verify(loaded).ok
    dpatch.strip(loaded)
    assert loaded.config.encoder_layerdrop == 0.1 and loaded.encoder.layerdrop == 0.1


# --------------------------------------------------------------------------- command line
_FACTORIES = """
import random
import torch
from torch import nn


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.f(x)


class Stack(nn.Module):
    def __init__(self, layerdrop=0.2, share=1.0):
        super().__init__()
        self.layers = nn.ModuleList([Res() for _ in range(4)])
        self.layerdrop = layerdrop
        self.share = share

    def forward(self, x):
        for layer in self.layers:
            if self.training and random.random() < self.layerdrop * self.share:
                continue
            x = layer(x)
        return x


def stack():
    return Stack()


def liar():
    return Stack(0.3, share=1 / 6)


def plain():
    return nn.Sequential(Res(), Res())
"""


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    (tmp_path / "ldmodels.py").write_text(_FACTORIES)
    return tmp_path


def test_cli_inspect_shows_layerdrop(models_dir: Path) -> None:
    code, out, err = cli("inspect", "ldmodels:stack", "--input-shape", "2,8", cwd=models_dir)
    assert code == 0, err
    assert "layerdrop: layers (4 layers) at 0.2 (layerdrop)" in out
    code, out, err = cli(
        "inspect", "ldmodels:stack", "--input-shape", "2,8", "--json", cwd=models_dir
    )
    assert code == 0, err
    assert json.loads(out)["layerdrop"][0]["rate"] == 0.2


def test_cli_inject_turns_off_and_keeps(models_dir: Path) -> None:
    code, out, err = cli(
        "inject", "ldmodels:stack", "--input-shape", "2,8", "-o", "s.safetensors",
        cwd=models_dir,
    )  # fmt: skip
    assert code == 0, err
    assert "note: turned off the model's own LayerDrop (layerdrop 0.2 -> 0) on layers" in out
    code, out, err = cli("inspect", str(models_dir / "s.safetensors"), "--json")
    assert code == 0, err  # read from the manifest alone
    (entry,) = json.loads(out)["layerdrop"]
    assert (entry["rate"], entry["original"]) == (0.0, 0.2)
    code, out, err = cli(
        "inject", "ldmodels:stack", "--input-shape", "2,8", "--keep-layerdrop", "--json",
        cwd=models_dir,
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["layerdrop"][0]["rate"] == 0.2 and doc["layerdrop_changes"] == []


def test_cli_retune_layerdrop(models_dir: Path) -> None:
    code, out, err = cli(
        "retune", "ldmodels:stack", "--input-shape", "2,8", "--layerdrop", "0.3", cwd=models_dir
    )
    assert code == 0, err
    assert "changed: layerdrop on layers 0.2 -> 0.3" in out
    code, out, err = cli(
        "retune", "ldmodels:stack", "--input-shape", "2,8", "--layerdrop", "0.3", "--json",
        cwd=models_dir,
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["layerdrop"][0]["rate"] == 0.3
    assert doc["layerdrop_changes"] == [
        {"layers": "layers", "attr": "layerdrop", "before": 0.2, "after": 0.3}
    ]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["ldmodels:stack", "--layerdrop", "1.5"], ["--layerdrop", "'1.5'", "[0, 1)"]),
        (["ldmodels:stack", "--layerdrop", "abc"], ["--layerdrop", "'abc'"]),
        (["ldmodels:plain", "--layerdrop", "0.1"], ["layerdrop=0.1", "no LayerDrop of its own"]),
    ],
)
def test_cli_retune_bad_layerdrop(models_dir: Path, args: list[str], needles: list[str]) -> None:
    code, _, err = cli("retune", *args, "--input-shape", "2,8", cwd=models_dir)
    assert code == 1
    one_line_error(err, *needles)


def test_cli_verify_layerdrop(models_dir: Path) -> None:
    code, out, err = cli("verify", "ldmodels:stack", "--input-shape", "2,8", cwd=models_dir)
    assert code == 0, err
    assert "layerdrop: layers (4 layers) at 0.2 (layerdrop): skipped " in out
    code, out, err = cli("verify", "ldmodels:liar", "--input-shape", "2,8", cwd=models_dir)
    assert code == 1
    assert "mismatch: [layerdrop] layers: skipped " in err
    code, out, err = cli(
        "verify", "ldmodels:liar", "--input-shape", "2,8", "--ignore", "layerdrop", "--json",
        cwd=models_dir,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["layerdrop"][0]["ok"]


def test_cli_many_files_keep_each_files_layerdrop(models_dir: Path) -> None:
    """Many checkpoints share one built model: each file's LayerDrop is set from its
    manifest, and the probe of the built model (in training mode) sees every layer."""
    code, _, err = cli(
        "inject", "ldmodels:stack", "--input-shape", "2,8", "-o", "a.safetensors", cwd=models_dir
    )
    assert code == 0, err
    (models_dir / "b.safetensors").write_bytes((models_dir / "a.safetensors").read_bytes())
    code, out, err = cli(
        "verify", "a.safetensors", "b.safetensors", "--input-shape", "2,8", cwd=models_dir
    )
    assert code == 0, out + err
    code, out, err = cli(
        "retune", "a.safetensors", "b.safetensors", "--max-rate", "0.2", "--input-shape", "2,8",
        "-o", "out", cwd=models_dir,
    )  # fmt: skip
    assert code == 0, out + err
    code, out, err = cli("inspect", str(models_dir / "out" / "b-dp.safetensors"), "--json")
    assert code == 0, err
    (entry,) = json.loads(out)["layerdrop"]
    assert (entry["rate"], entry["original"]) == (0.0, 0.2)
