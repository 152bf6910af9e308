"""A wrong model is never returned, nothing is silent: traces shared only between blocks
their forward cannot tell apart, parts the input never reached reported, "no residual
branch" only for what was analysed, and files and commands as a new user meets them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import cli, one_line_error
from torch import nn

import dpatch
from dpatch.errors import InvalidValueError, NoResidualSitesError, UnanalysedError


# --------------------------------------------------------------------------- shared traces
class Stage(nn.Module):
    def __init__(self, c: int, n: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for cv in self.convs:
            x = x + cv(x)
        return x


@pytest.mark.parametrize("depths", [(1, 2), (2, 1), (2, 2, 6, 2), (3, 3)])
def test_one_class_at_several_depths_gets_a_trace_each(depths: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*(Stage(8, n) for n in depths)).eval()
    x = torch.randn(2, 8, 6, 6)
    report = dpatch.inject(net, 0.1, example_inputs=(x,))  # eval identity: conftest
    assert len(report.sites) == sum(depths)
    assert [s.path for s in report.sites] == [
        str(i) for i, n in enumerate(depths) for _ in range(n)
    ]


class Attn(nn.Module):
    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(c, c)


class HeadsBlock(nn.Module):
    """Reads a child's plain attribute: the same structure, another trace per value."""

    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.attn = Attn(c, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.attn.heads
        y = self.attn.qkv(x).reshape(b, n, h, c // h).transpose(2, 3).reshape(b, n, c)
        return x + y


def test_a_child_attribute_read_by_the_forward_keeps_traces_apart() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(HeadsBlock(16, 2), HeadsBlock(16, 4), HeadsBlock(16, 2)).eval()
    report = dpatch.inject(net, 0.2, example_inputs=(torch.randn(2, 3, 16),))
    assert len(report.sites) == 3


def test_identical_blocks_still_share_a_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop rates differ per block (timm's linear rule) but no forward reads them."""
    import timm

    from dpatch.analysis import _analyze

    traced: list[str] = []
    real = _analyze.TraceCache._trace
    monkeypatch.setattr(
        _analyze.TraceCache,
        "_trace",
        lambda self, m, *a: traced.append(type(m).__name__) or real(self, m, *a),
    )
    dpatch.find_sites(timm.create_model("vit_tiny_patch16_224", drop_path_rate=0.2, depth=6))
    assert traced.count("Block") == 2  # block 0 holds Identity slots, 1-5 DropPath ones


# --------------------------------------------------------------------------- unreached
class TwoTower(nn.Module):
    """CLIP-style: the inferred input (an image) reaches the image tower only."""

    def __init__(self) -> None:
        super().__init__()
        self.image_tower = nn.Sequential(nn.Conv2d(3, 8, 8, 8), nn.Flatten(2))
        self.image_block = Stage(8, 2)
        self.text_tower = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16))

    def forward(
        self, image: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        out = []
        if image is not None:
            feats = self.image_tower(image)
            out.append(self.image_block(feats.reshape(-1, 8, 28, 28)))
        if text is not None:
            out.append(self.text_tower(text))
        return out


def test_modules_the_input_never_reached_are_reported() -> None:
    torch.manual_seed(0)
    model = TwoTower()
    report = dpatch.inject(model, 0.1)
    assert len(report.sites) == 2
    assert [(u.path, u.parameters) for u in report.unreached] == [
        ("text_tower", 50 * 16 + 16 * 16 + 16)
    ]
    assert report.to_dict()["unreached"] == [{"path": "text_tower", "parameters": 1072}]
    assert dpatch.verify(model).unreached == report.unreached
    assert not dpatch.inspect(nn.Sequential(Stage(8, 1)), (torch.randn(1, 8, 4, 4),)).unreached


def _write_factory(folder: Path, body: str) -> str:
    (folder / "models_here.py").write_text(textwrap.dedent(body))
    return "models_here.py:make"


TWO_TOWER_FILE = """
import torch
from torch import nn

class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + self.f(x)

class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_tower = nn.Sequential(nn.Conv2d(3, 8, 8, 8), Stage())
        self.text_tower = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16))

    def forward(self, image=None, text=None):
        out = []
        if image is not None:
            out.append(self.image_tower(image))
        if text is not None:
            out.append(self.text_tower(text))
        return out

def make():
    torch.manual_seed(0)
    return TwoTower()
"""


def test_cli_notes_unreached_modules_and_json_lists_them(tmp_path: Path) -> None:
    spec = _write_factory(tmp_path, TWO_TOWER_FILE)
    code, out, err = cli("inspect", spec, cwd=tmp_path)
    assert code == 0, err
    assert (
        "note: 1 modules holding 1,072 parameters did not run on the inferred input (text_tower.*)"
        in out
    )
    code, out, err = cli("inspect", spec, "--json", cwd=tmp_path)
    assert json.loads(out)["unreached"] == [{"path": "text_tower", "parameters": 1072}]
    code, out, err = cli("verify", spec, cwd=tmp_path)
    assert "text_tower.*" in out


# --------------------------------------------------------------------------- unanalysed
class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x + self.f(x)
        return x - self.f(x)


def test_never_no_residual_branch_for_blocks_that_could_not_be_analysed() -> None:
    model = nn.Sequential(ValueBranch(), ValueBranch())
    x = torch.randn(2, 8)
    for call in (dpatch.inject, dpatch.inspect):
        with pytest.raises(UnanalysedError) as info:
            call(model, example_inputs=(x,), allow_empty=False)  # type: ignore[operator]
        text = str(info.value)
        assert "2 of its blocks could not be analysed" in text and "0: could not trace" in text
        assert info.value.exit_code == 1 and not isinstance(info.value, NoResidualSitesError)
    # analysed everything, found none: that is "no residual branch"
    with pytest.raises(NoResidualSitesError):
        dpatch.inject(
            nn.Sequential(nn.Linear(8, 8), nn.ReLU()), example_inputs=(x,), allow_empty=False
        )


VALUE_FILE = """
import torch
from torch import nn

class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return x + self.f(x)
        return x - self.f(x)

def make():
    return nn.Sequential(nn.Linear(8, 8), ValueBranch())
"""


def test_cli_untraceable_model_exits_1_naming_the_block(tmp_path: Path) -> None:
    spec = _write_factory(tmp_path, VALUE_FILE)
    code, out, err = cli("inject", spec, cwd=tmp_path)
    assert code == 1 and out == ""
    one_line_error(err, "could not be analysed", "1: could not trace")


# --------------------------------------------------------------------------- files
def _file(tmp_path: Path, name: str, *args: str) -> Path:
    out = tmp_path / name
    code, _, err = cli("inject", "tv:resnet18", *args, "-o", str(out))
    assert code == 0, err
    return out


def test_pruned_files_verify_alone_and_beside_others(tmp_path: Path) -> None:
    a = _file(tmp_path, "a.safetensors", "--max-rate", "0.2", "--schedule", "huang")
    p = tmp_path / "p.safetensors"
    assert cli("prune", str(a), "--drop", "2", "-o", str(p))[0] == 0
    code, out, err = cli("verify", str(p))
    assert code == 0, err + out
    assert "schedule huang" in out and "mismatch" not in err
    code, out, err = cli("verify", str(a), str(p))
    assert code == 0, err + out
    assert out.count(": ok:") == 2


def test_save_describes_the_model_as_it_is_now(tmp_path: Path) -> None:
    import timm

    model = timm.create_model("resnet18")
    old = dpatch.inject(model, max_rate=0.2, schedule="linear")
    new = dpatch.retune(model, max_rate=0.4, schedule="uniform")
    with pytest.raises(InvalidValueError, match="does not describe the model as it is now"):
        dpatch.save(model, tmp_path / "x.safetensors", old)
    assert list(tmp_path.iterdir()) == []
    for report in (new, None):
        out = dpatch.save(model, tmp_path / f"{report is None}.safetensors", report)
        manifest = dpatch.files.read_manifest(out)
        assert manifest is not None and manifest["schedule"]["schedule"] == "uniform"
        assert {s["rate"] for s in manifest["sites"]} == {0.4}


def test_retune_keeps_the_schedule_kind_and_per(tmp_path: Path) -> None:
    c = _file(tmp_path, "c.safetensors", "--schedule", "cosine", "--per", "branch")
    d = tmp_path / "d.safetensors"
    code, out, err = cli("retune", str(c), "--max-rate", "0.3", "-o", str(d), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["schedule"], doc["per"], doc["previous"]) == (
        "cosine",
        "branch",
        "cosine (per branch)",
    )
    assert [s["rate"] for s in doc["sites"]] == pytest.approx(
        dpatch.schedule_rates("cosine", 8, 0.3)
    )
    code, out, err = cli("retune", str(c), "--max-rate", "0.3")
    assert "kept: schedule cosine (per branch)" in out
    code, out, err = cli("retune", str(c), "--max-rate", "0.3", "--schedule", "linear")
    assert "changed: schedule cosine (per branch) -> linear (per branch)" in out
    # the library keeps it too; a custom schedule has no max_rate
    import timm

    model = timm.create_model("resnet18")
    dpatch.inject(model, 0.2, schedule="cosine")
    assert dpatch.retune(model, 0.4).schedule == "cosine"
    dpatch.retune(model, schedule="custom", rates=[0.1] * 8)
    with pytest.raises(InvalidValueError, match="custom"):
        dpatch.retune(model, 0.3)


def test_retune_without_output_says_nothing_was_written(tmp_path: Path) -> None:
    a = _file(tmp_path, "a.safetensors")
    before = sorted(tmp_path.iterdir())
    code, _, err = cli("retune", str(a), "--max-rate", "0.3")
    assert code == 0 and "note: nothing written (pass -o" in err
    assert sorted(tmp_path.iterdir()) == before


def test_fold_applies_the_manifest_and_refuses_nothing_to_fold(tmp_path: Path) -> None:
    a = _file(tmp_path, "a.safetensors", "--max-rate", "0.2")
    out = tmp_path / "folded.safetensors"
    code, _, err = cli("fold", str(a), "--model", "tv:resnet18", "-o", str(out))
    assert code == 1 and not out.exists()
    one_line_error(err, "nothing to fold", "nothing written")
    e = _file(tmp_path, "e.safetensors", "--max-rate", "0.2", "--scaling", "expected")
    code, _, err = cli("fold", str(e), "--model", "tv:resnet18", "-o", str(out))
    assert code == 0, err
    manifest = dpatch.files.read_manifest(out)
    assert manifest is not None and {s["scaling"] for s in manifest["sites"]} == {"inverted"}


PLAIN_FILE = """
import torch
from torch import nn

class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.f(x)

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), Res(), Res())
"""


def test_a_python_file_is_a_model_spec(tmp_path: Path) -> None:
    spec = _write_factory(tmp_path, PLAIN_FILE)
    out = tmp_path / "m.safetensors"
    code, _, err = cli("inject", spec, "-o", str(out), cwd=tmp_path)
    assert code == 0, err
    code, stdout, err = cli("inspect", str(tmp_path / spec), "--json")  # a path, from elsewhere
    assert code == 0 and json.loads(stdout)["summary"]["sites"] == 2
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(
        dict(dpatch.models.create_model(f"{tmp_path / 'models_here.py'}:make").state_dict()),
        str(weights),
    )
    code, stdout, err = cli("inspect", str(weights), "--model", str(tmp_path / spec), "--json")
    assert code == 0 and json.loads(stdout)["summary"]["sites"] == 2
    code, _, err = cli("inject", "missing.py:make", cwd=tmp_path)
    assert code == 1
    one_line_error(err, "missing.py", "does not exist")


def test_outputs_already_named_dp_keep_their_name(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    _file(runs, "run0-dp.safetensors")
    _file(runs, "run1.safetensors")
    out = tmp_path / "out"
    code, _, err = cli("retune", str(runs), "--max-rate", "0.3", "-o", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["run0-dp.safetensors", "run1-dp.safetensors"]


def test_labels_say_what_the_file_holds_and_pruned_blocks_count_zero(tmp_path: Path) -> None:
    a = _file(tmp_path, "a.safetensors", "--max-rate", "0.4", "--schedule", "huang")
    p = tmp_path / "p.safetensors"
    code, out, err = cli("prune", str(a), "--drop", "2", "-o", str(p), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schedule"] == "huang"
    rates = dpatch.schedule_rates("huang", 8, 0.4)
    kept = [r for s, r in zip(doc["sites"], rates, strict=True) if not s["pruned"]]
    assert doc["summary"]["expected_depth"] == pytest.approx(sum(1 - r for r in kept))
    for args in (["inspect", str(p), "--json"], ["verify", str(p), "--json"]):
        code, out, err = cli(*args)
        assert code == 0, err
        assert json.loads(out)["schedule"] == "huang"
