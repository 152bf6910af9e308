"""The depth commands: sensitivity, prune, fold, and inject --rates-from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import cli, one_line_error
from safetensors.torch import load_file, save_file

FACTORY = """
import torch
import torch.nn as nn
from timm.layers import DropPath


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(3, 3, 1)
        self.drop_path = DropPath(0.1)

    def forward(self, x):
        if float(x.abs().sum()) >= 0:  # data-dependent: torch.fx cannot trace it
            return x + self.drop_path(self.f(x))
        return x


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))

    def forward(self, x):
        return x + self.f(x)


def loose():
    return nn.Sequential(Untraceable(), Res())


def small():
    torch.manual_seed(0)
    m = nn.Sequential(Res(), Res(), Res(), nn.Flatten(), nn.LazyLinear(4))
    m(torch.zeros(1, 3, 8, 8))
    m.pretrained_cfg = {"input_size": (3, 8, 8)}
    return m


def unsized():  # runs on 3x8x8 images only, and says so nowhere
    m = small()
    del m.pretrained_cfg
    return m
"""


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "mods.py").write_text(FACTORY)
    return tmp_path


def test_help_has_examples() -> None:
    for cmd in ("sensitivity", "prune", "fold"):
        code, out, _ = cli(cmd, "--help")
        assert code == 0 and "Example: dpatch " + cmd in " ".join(out.split())


def test_sensitivity_suggest_and_inject_rates_from(work: Path) -> None:
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file(
        {"inputs": x, "targets": torch.tensor([0, 1, 2, 3, 0, 1])}, str(work / "d.safetensors")
    )
    code, out, err = cli(
        "sensitivity", "mods:small", "--data", "d.safetensors", "--json",
        "--suggest", "0.3", "-o", "rates.json", cwd=work,
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["metric"] == "ce_increase" and doc["samples"] == 6 and not doc["synthetic"]
    assert set(doc["scores"]) == {"0.drop_path", "1.drop_path", "2.drop_path"}
    rates = json.loads((work / "rates.json").read_text())
    assert rates["model"] == "mods:small" and max(rates["rates"]) == 0.3
    code, out, err = cli(
        "inject", "mods:small", "--schedule", "custom", "--per", "branch",
        "--rates-from", "rates.json", "--json", cwd=work,
    )  # fmt: skip
    assert code == 0, err
    assert [s["rate"] for s in json.loads(out)["sites"]] == pytest.approx(rates["rates"])


def test_sensitivity_table_and_synthetic_note(work: Path) -> None:
    code, out, err = cli("sensitivity", "mods:small", "--synthetic", "4", cwd=work)
    assert code == 0, err
    assert "3 of 3 sites measured on 4 samples" in out
    assert "a smoke test, not a measurement" in out
    assert out.index("0.drop_path") < out.index("1.drop_path") < out.index("2.drop_path")
    code, out, err = cli("sensitivity", "mods:small", "--synthetic", "4", "--json", cwd=work)
    assert code == 0 and json.loads(out)["note"].endswith("not a measurement")


def test_sensitivity_bad_data_writes_nothing(work: Path) -> None:
    (work / "empty" / "cls").mkdir(parents=True)
    save_file({"x": torch.zeros(2)}, str(work / "noinputs.safetensors"))
    for data, needle in (("empty", "holds no images"), ("noinputs.safetensors", "no 'inputs'")):
        code, _, err = cli(
            "sensitivity", "mods:small", "--data", data, "--suggest", "0.2", "-o", "r.json",
            cwd=work,
        )  # fmt: skip
        assert code == 1
        one_line_error(err, needle)
        assert not (work / "r.json").exists()
    code, _, err = cli(
        "sensitivity", "mods:small", "--synthetic", "2", "--suggest", "0.2", cwd=work
    )
    assert code == 1
    one_line_error(err, "-o")


def test_prune_writes_a_smaller_file_that_loads(work: Path, tmp_path: Path) -> None:
    full = tmp_path / "full.safetensors"
    assert (
        cli("inject", "tv:resnet18", "--schedule", "huang", "--max-rate", "0.5", "-o", str(full))[0]
        == 0
    )
    out = tmp_path / "p.safetensors"
    code, stdout, err = cli(
        "prune", str(full), "--drop", "2", "--iterations", "1", "-o", str(out), "--json"
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert sorted(doc["changed"]) == ["layer4.0.drop_path", "layer4.1.drop_path"]
    stats = doc["stats"]
    assert stats["parameters_after"] < stats["parameters_before"]
    assert doc["file_bytes"] == out.stat().st_size < full.stat().st_size
    assert stats["latency_before_ms"] > 0 and stats["device"] == "cpu"
    code, stdout, err = cli("inspect", str(out))
    assert code == 0 and stdout.count("pruned") == 2
    code, stdout, err = cli("prune", str(full), "--keep", "7", "--iterations", "1")
    assert code == 0 and stdout.count("pruned") == 1 and "eval latency on cpu" in stdout
    result = torchvision.models.resnet18().load_state_dict(load_file(str(out)), strict=False)
    assert result.unexpected_keys == [] and "layer4.1.conv1.weight" in result.missing_keys


def test_prune_by_sensitivity_file_and_drop_zero(work: Path) -> None:
    code, out, err = cli("sensitivity", "mods:small", "--synthetic", "4", "--json", cwd=work)
    assert code == 0, err
    (work / "sens.json").write_text(out)
    least = min(json.loads(out)["scores"].items(), key=lambda kv: kv[1])[0]
    code, out, err = cli(
        "prune", "mods:small", "--drop", "1", "--by", "sens.json", "--iterations", "1", "--json",
        cwd=work,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["changed"] == [least]
    code, out, err = cli(
        "prune", "mods:small", "--drop", "0", "--iterations", "1", "-o", "same.safetensors",
        cwd=work,
    )  # fmt: skip
    assert code == 0, err
    import importlib
    import sys

    sys.path.insert(0, str(work))
    try:
        small = importlib.import_module("mods").small()
    finally:
        sys.path.remove(str(work))
    saved = load_file(str(work / "same.safetensors"))
    assert set(saved) == set(small.state_dict())
    assert all(torch.equal(saved[k], v) for k, v in small.state_dict().items())


@pytest.mark.parametrize(
    "args,needle",
    [
        (("mods:small", "--sites", "0.drop_path,nope"), "no site named 'nope'"),
        (("mods:small", "--drop", "4"), "cannot prune 4 branches"),
        (("mods:small", "--keep", "9"), "cannot keep 9"),
        (("mods:loose", "--sites", "0.drop_path"), "cannot prune 0.drop_path"),
        (("mods:small", "--drop", "1", "--keep", "1"), "exactly one"),
        (("mods:small", "--drop", "1", "--by", "widest"), "--by 'widest'"),
        (("mods:small", "--sites", "0.drop_path", "--by", "rate"), "--sites names them"),
    ],
)
def test_prune_errors_write_nothing(work: Path, args: tuple[str, ...], needle: str) -> None:
    code, _, err = cli("prune", *args, "--iterations", "1", "-o", "out.safetensors", cwd=work)
    assert code == 1
    one_line_error(err, needle)
    assert not (work / "out.safetensors").exists()


def test_fold_round_trip_and_refusal(work: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    code, _, err = cli(
        "inject", "tv:resnet18", "--scaling", "expected", "--max-rate", "0.3", "-o", str(a)
    )
    assert code == 0, err
    code, out, err = cli("fold", str(a), "-o", str(b), "--json")
    assert code == 0, err
    doc = json.loads(out)
    # linear schedule: block 0 has rate 0, nothing to fold there
    assert len(doc["folded"]) == 7 and doc["folded"][0]["tensors"] == [
        "layer1.1.bn2.weight",
        "layer1.1.bn2.bias",
    ]
    import dpatch

    x = torch.randn(2, 3, 64, 64)
    patched = dpatch.load(a).eval()
    plain = torchvision.models.resnet18().eval()
    plain.load_state_dict(load_file(str(b)), strict=True)
    with torch.no_grad():
        ref, got = patched(x), plain(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    code, out, _ = cli("inspect", str(b), "--json")
    assert {s["scaling"] for s in json.loads(out)["sites"]} == {"inverted"}

    (work / "gelu.py").write_text(
        "import torch.nn as nn, torch.nn.functional as F\n"
        "class B(nn.Module):\n"
        "    def __init__(s):\n"
        "        super().__init__(); s.c = nn.Conv2d(3, 3, 1)\n"
        "    def forward(s, x):\n"
        "        return x + F.gelu(s.c(x))\n"
        "def build():\n"
        "    return nn.Sequential(B())\n"
    )
    c = work / "c.safetensors"
    assert cli("inject", "gelu:build", "--scaling", "expected", "--max-rate", "0.2",
               "--schedule", "uniform", "-o", str(c), cwd=work)[0] == 0  # fmt: skip
    code, _, err = cli("fold", str(c), "-o", "d.safetensors", cwd=work)
    assert code == 1
    one_line_error(err, "cannot fold 0.drop_path")
    assert not (work / "d.safetensors").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("sensitivity", "--synthetic", "4"),
        ("prune", "--drop", "1", "--iterations", "1"),
        ("fold", "-o", "folded.safetensors"),
    ],
)
def test_depth_commands_take_the_input_shape(work: Path, args: tuple[str, ...]) -> None:
    command, *rest = args
    code, _, err = cli(command, "mods:unsized", *rest, cwd=work)
    assert code == 1
    one_line_error(err, "could not run Sequential", "--input-shape")
    code, out, err = cli(command, "mods:unsized", *rest, "--input-shape", "2,3,8,8", cwd=work)
    if command == "fold":  # the model ran: an unpatched model has nothing to fold
        assert code == 1
        one_line_error(err, "nothing to fold")
        return
    assert code == 0, err
    assert ("3 sites" in out) if command == "prune" else out


# --------------------------------------------------------------------------- whole layers
LM = """
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), nn.Linear(d, d)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, n=4, d=16, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def lm():
    torch.manual_seed(0)
    return TinyLM()
"""


@pytest.fixture
def lm_work(work: Path) -> Path:
    (work / "lms.py").write_text(LM)
    return work


def test_sensitivity_by_layer_and_prune_by_its_file(lm_work: Path) -> None:
    code, out, err = cli("sensitivity", "lms:lm", "--synthetic", "6", "--metric", "bi", "--json",
                         cwd=lm_work)  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["metric"] == "bi" and doc["per"] == "layer" and doc["data"] == "6 random token ids"
    assert set(doc["scores"]) == {f"blocks.{i}" for i in range(4)}
    assert [len(e["sites"]) for e in doc["layers"]] == [2, 2, 2, 2]
    (lm_work / "bi.json").write_text(out)
    lowest = min(doc["scores"], key=doc["scores"].__getitem__)
    code, out, err = cli("prune", "lms:lm", "--drop", "1", "--by", "bi.json", "--iterations", "1",
                         "--json", cwd=lm_work)  # fmt: skip
    assert code == 0, err
    pruned = json.loads(out)
    assert pruned["pruned_layers"] == [lowest]
    assert sorted(pruned["changed"]) == [f"{lowest}.drop_path1", f"{lowest}.drop_path2"]
    code, out, err = cli("sensitivity", "lms:lm", "--synthetic", "4", "--metric", "angular",
                         cwd=lm_work)  # fmt: skip
    assert code == 0, err
    assert "4 of 4 layers measured on 4 samples" in out and "angular distance" in out


def test_prune_by_bi_measures_on_random_ids_and_says_so(lm_work: Path) -> None:
    code, out, err = cli("prune", "lms:lm", "--drop", "2", "--by", "bi", "--iterations", "1",
                         "--json", cwd=lm_work)  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert "a smoke test, not a measurement" in err
    assert doc["measured"]["synthetic"] is True and doc["measured"]["metric"] == "bi"
    two = sorted(doc["measured"]["scores"], key=doc["measured"]["scores"].__getitem__)[:2]
    assert sorted(doc["pruned_layers"]) == sorted(two) and len(doc["changed"]) == 4
    code, out, err = cli("prune", "lms:lm", "--drop", "1", "--by", "angular", "--synthetic", "3",
                         "--iterations", "1", cwd=lm_work)  # fmt: skip
    assert code == 0, err
    assert "layers pruned whole: blocks." in out


LAYER_BAD = [
    ("sensitivity lms:lm --synthetic 2 --metric cka", "unknown --metric 'cka'"),
    (
        "sensitivity lms:lm --synthetic 2 --metric bi --suggest 0.2 -o out.json",
        "--suggest needs per-branch scores",
    ),
    ("prune lms:lm --drop 5 --by bi -o out.safetensors", "cannot prune 5 layers"),
    ("prune mods:small --drop 1 --by bi -o out.safetensors", "--by bi measures each layer"),
    ("prune lms:lm --drop 1 --synthetic 3 -o out.safetensors", "--data and --synthetic are for"),
    ("prune lms:lm --drop 1 --by bi -o outdir", "only transformers models have"),
    # a text model given --input-shape without --input-dtype long
    ("inspect lms:lm --input-shape 2,8", "--input-dtype long"),
    ("sensitivity lms:lm --synthetic 2 --input-shape 2,8", "its first layer is an Embedding"),
    ("prune lms:lm --drop 1 --by bi --input-shape 2,8 -o out.safetensors", "--input-dtype long"),
]


@pytest.mark.parametrize(("args", "needle"), LAYER_BAD, ids=[a for a, _ in LAYER_BAD])
def test_layer_bad_input_is_one_line_and_writes_nothing(
    lm_work: Path, args: str, needle: str
) -> None:
    argv = args.split() + (["--iterations", "1"] if args.startswith("prune") else [])
    code, _, err = cli(*argv, cwd=lm_work)
    assert code == 1
    one_line_error(err, needle)
    assert not any((lm_work / n).exists() for n in ("out.json", "out.safetensors", "outdir"))


transformers = pytest.importorskip("transformers")


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A tiny pre-norm BERT-architecture masked LM saved with save_pretrained."""
    torch.manual_seed(0)
    cfg = transformers.RobertaPreLayerNormConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
        vocab_size=99, max_position_embeddings=64,
    )  # fmt: skip
    transformers.RobertaPreLayerNormForMaskedLM(cfg).save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_prune_writes_a_save_pretrained_directory(hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    code, stdout, err = cli("prune", f"hf:{hf_dir}", "--drop", "2", "--by", "bi",
                            "--synthetic", "4", "--iterations", "1", "-o", str(out), "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(stdout)
    assert len(doc["pruned_layers"]) == 2 and doc["output"] == str(out)
    change = doc["save_pretrained"]["changes"][0]
    assert change["before"] == 4 and change["after"] == 2
    assert {"key": "num_hidden_layers", "old": 4, "new": 2} in change["config"]
    back = transformers.AutoModelForMaskedLM.from_pretrained(out)
    assert back.config.num_hidden_layers == 2 and len(back.roberta_prelayernorm.encoder.layer) == 2
    code, stdout, err = cli("inspect", f"hf:{out}", "--json")  # hf:DIR, offline
    assert code == 0, err
    paths = {s["path"] for s in json.loads(stdout)["sites"]}
    assert "roberta_prelayernorm.encoder.layer.1.output" in paths
    assert not any(".layer.2." in p for p in paths)
    # a pruned directory over an existing one: only with --force, never over its source
    before = _tree(out)
    code, _, err = cli("prune", f"hf:{hf_dir}", "--drop", "1", "--by", "bi", "--synthetic", "2",
                       "--iterations", "1", "-o", str(out))  # fmt: skip
    assert code == 1
    one_line_error(err, "exists; pass --force")
    assert _tree(out) == before
    src = _tree(hf_dir)
    code, _, err = cli("prune", f"hf:{hf_dir}", "--drop", "1", "--by", "bi", "--synthetic", "2",
                       "--iterations", "1", "-o", str(hf_dir), "--force")  # fmt: skip
    assert code == 1
    one_line_error(err, "the directory the model was loaded from")
    assert _tree(hf_dir) == src
    code, _, err = cli("prune", f"hf:{hf_dir}", "--drop", "1", "--by", "bi", "--synthetic", "2",
                       "--iterations", "1", "-o", str(out), "--force")  # fmt: skip
    assert code == 0, err
    assert transformers.AutoConfig.from_pretrained(out).num_hidden_layers == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "src"]


def test_prune_directory_refusals_write_nothing(hf_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, vocab_size=99, max_position_embeddings=64)  # fmt: skip
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    cases = [
        ((f"hf:{tmp_path / 'bert'}", "--drop", "1", "--by", "bi"), "post-norm"),
        ((f"hf:{hf_dir}", "--drop", "7", "--by", "bi"), "cannot prune 7 layers"),
        ((f"hf:{hf_dir}", "--drop", "1", "--by", "rate"), "not the rest of its layer"),
    ]
    for args, needle in cases:
        code, _, err = cli("prune", *args, "--iterations", "1", "-o", str(tmp_path / "out"))
        assert code == 1, err
        one_line_error(err, needle)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "src"]


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from dpatch.cli.sensitivity import progress_bar

    with progress_bar("Measuring layers", quiet=True) as update:
        assert update is None  # --json
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    with progress_bar("Measuring layers", quiet=False) as update:
        assert update is None  # piped
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    with progress_bar("Measuring layers", quiet=False) as update:
        assert update is not None
        update(1, 2)
        update(2, 2)
