"""The command line: every command, every documented error, exit codes, JSON, files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import SCRIPT, cli, one_line_error
from safetensors.torch import load_file, save_file


# --------------------------------------------------------------------------- commands
def test_version_and_help() -> None:
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("dpatch ")
    for cmd in ("inject", "inspect", "retune", "schedule", "list"):
        code, out, _ = cli(cmd, "--help")
        assert code == 0 and "Example: dpatch " + cmd in " ".join(out.split())


def test_inject_save_inspect_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "r18.safetensors"
    code, stdout, err = cli("inject", "tv:resnet18", "--max-rate", "0.2", "-o", str(out), "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["output"] == str(out) and doc["summary"]["sites"] == 8
    code, stdout, err = cli("inspect", str(out), "--json")
    assert code == 0, err
    again = json.loads(stdout)
    assert [s["rate"] for s in again["sites"]] == [s["rate"] for s in doc["sites"]]
    torchvision.models.resnet18().load_state_dict(load_file(str(out)), strict=True)


def test_inject_without_output_writes_nothing(tmp_path: Path) -> None:
    code, out, _ = cli("inject", "tv:resnet18", cwd=tmp_path)
    assert code == 0 and "8 sites in 8 blocks" in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    code, _, err = cli("inject", "tv:resnet18", "-o", str(out), "--dry-run")
    assert code == 0 and "would write" in err and not out.exists()


def test_retune_a_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli("inject", "tv:resnet18", "-o", str(a))[0] == 0
    code, out, err = cli(
        "retune", str(a), "--schedule", "uniform", "--max-rate", "0.3", "-o", str(b), "--json"
    )
    assert code == 0, err
    assert {s["rate"] for s in json.loads(out)["sites"]} == {0.3}
    code, out, _ = cli("inspect", str(b), "--json")
    assert {s["rate"] for s in json.loads(out)["sites"]} == {0.3}


def test_retune_native_slots_of_a_timm_model() -> None:
    code, out, err = cli("retune", "timm:convnext_atto", "--max-rate", "0.2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["summary"]["sites"] == 12 and all(s["kind"] == "native" for s in doc["sites"])


def test_retune_model_without_slots_exits_3() -> None:
    code, _, err = cli("retune", "tv:resnet18")
    assert code == 3
    one_line_error(err, "inject")


def test_inspect_unpatched_model_shows_native_rates() -> None:
    code, out, _ = cli("inspect", "tv:convnext_tiny", "--json")
    assert code == 0
    rates = [s["rate"] for s in json.loads(out)["sites"]]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)  # torchvision's default


def test_inspect_plain_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), str(path))
    code, out, _ = cli("inspect", str(path), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["manifest"] is None and doc["tensors"] == 122 and doc["sites"] is None
    code, out, err = cli("inspect", str(path), "--model", "tv:resnet18", "--json")
    assert code == 0, err
    assert json.loads(out)["summary"]["sites"] == 8


def test_schedule_command() -> None:
    code, out, _ = cli(
        "schedule", "--depth", "4", "--max-rate", "0.3", "--schedule", "huang", "--json"
    )
    assert code == 0
    assert json.loads(out)["rates"] == pytest.approx([0.075, 0.15, 0.225, 0.3])
    code, out, _ = cli("schedule", "--depth", "3", "--max-rate", "0.2")
    assert code == 0 and "expected depth" in out


def test_list_command() -> None:
    code, out, _ = cli("list", "convnext_at*", "--json")
    assert code == 0
    names = {e["model"]: e["native"] for e in json.loads(out)}
    assert names["timm:convnext_atto"] is True
    code, out, _ = cli("list", "resnet18", "--source", "tv", "--json")
    assert {e["model"]: e["native"] for e in json.loads(out)} == {
        "tv:resnet18": False,
        "tv:quantized_resnet18": False,  # every torchvision builder is listed
    }


def test_python_factory_spec(tmp_path: Path) -> None:
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "class B(nn.Module):\n"
        "    def __init__(s):\n"
        "        super().__init__(); s.f = nn.Linear(8, 8)\n"
        "    def forward(s, x):\n"
        "        return x + s.f(x)\n"
        "def build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 224 * 224, 8), B(), B())\n"
        "def lazy():\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(8), B())\n"
    )
    code, out, err = cli("inject", "mymodels:build", "--max-rate", "0.2", "--json", cwd=tmp_path)
    assert code == 0, err
    assert [s["path"] for s in json.loads(out)["sites"]] == ["2", "3"]
    code, out, err = cli("inject", "mymodels:lazy", cwd=tmp_path)
    assert code == 1
    one_line_error(err, "'1.weight'", "lazy")
    code, out, err = cli("inject", "mymodels:nothing", cwd=tmp_path)
    assert code == 1
    one_line_error(err, "'nothing'")
    code, out, err = cli("inject", "nomodule:build", cwd=tmp_path)
    assert code == 1
    one_line_error(err, "'nomodule'")


def test_bare_name_says_which_library(tmp_path: Path) -> None:
    code, _, err = cli("inspect", "resnet18")
    assert code == 0 and "timm:resnet18" in err
    code, _, err = cli("inspect", "regnet_y_400mf")
    assert code == 0 and "tv:regnet_y_400mf" in err


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        (["inject", "resnet5O"], 1, ["'resnet5O'", "did you mean", "resnet50"]),
        (["inject", "tv:resnet18", "--max-rate", "1.5"], 1, ["--max-rate", "1.5"]),
        (["inject", "tv:resnet18", "--max-rate", "nan"], 1, ["--max-rate", "nan"]),
        (["inject", "tv:resnet18", "--max-rate", "abc"], 1, ["--max-rate", "'abc'"]),
        (["inject", "tv:resnet18", "--min-rate", "-1"], 1, ["--min-rate", "-1"]),
        (
            ["inject", "tv:resnet18", "--schedule", "custom", "--rates", "0,0.1"],
            1,
            ["2 values", "8 blocks"],
        ),
        (["inject", "tv:resnet18", "--schedule", "custom", "--rates", "0,x"], 1, ["'x'"]),
        (["inject", "tv:resnet18", "--schedule", "step"], 1, ["'step'", "linear"]),
        (["inject", "tv:resnet18", "--mode", "sample"], 1, ["'sample'", "row"]),
        (["inject", "tv:resnet18", "--scaling", "up"], 1, ["'up'", "inverted"]),
        (["inject", "tv:resnet18", "--schedule", "native"], 1, ["stochastic_depth_prob"]),
        (["inject", "tv:vgg11"], 3, ["no residual branch", "--allow-empty"]),
        (["inspect", "tv:vgg11"], 3, ["no residual branch"]),
        (["inject", "tv:resnet18", "--bogus"], 2, ["--bogus"]),
        (["inject"], 2, ["MODEL"]),
        (["schedule", "--depth", "x"], 2, ["--depth"]),
        (["inject", "tv:resnet18", "--weights", "missing.pt"], 1, ["missing.pt", "does not exist"]),
        (["inject", "hf-hub:timm/resnet18.a1_in1k"], 1, ["could not download", "--weights"]),
        (["inject", "tv:resnet18", "--pretrained"], 1, ["could not download"]),
        (["inject", "timm:resnet18", "--pretrained"], 1, ["could not download"]),
    ],
)
def test_errors_are_one_line(args: list[str], code: int, needles: list[str]) -> None:
    got, out, err = cli(*args)
    assert got == code, (out, err)
    one_line_error(err, *needles)
    assert out == ""


def test_allow_empty() -> None:
    code, out, _ = cli("inject", "tv:vgg11", "--allow-empty", "--json")
    assert code == 0 and json.loads(out)["sites"] == []


@pytest.fixture
def weights(tmp_path: Path) -> dict[str, Path]:
    state = torchvision.models.resnet18().state_dict()
    files = {}
    files["ok"] = tmp_path / "ok.pt"
    torch.save({"model": state, "epoch": 1}, files["ok"])
    files["pickle"] = tmp_path / "pickle.pt"
    torch.save({"model": state, "cfg": _Config()}, files["pickle"])
    files["truncated"] = tmp_path / "trunc.safetensors"
    save_file(state, str(files["truncated"]))
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["corrupt"] = tmp_path / "corrupt.pth"
    files["corrupt"].write_bytes(b"\x00garbage" * 100)
    files["garbage"] = tmp_path / "garbage.safetensors"  # no safetensors header at all
    files["garbage"].write_bytes(bytes(range(256)) * 4)
    files["other"] = tmp_path / "r34.safetensors"
    save_file(torchvision.models.resnet34().state_dict(), str(files["other"]))
    files["unreadable"] = tmp_path / "folder.pt"
    files["unreadable"].mkdir()
    return files


class _Config:
    pass


@pytest.mark.parametrize(
    ("kind", "needles"),
    [
        ("pickle", ["weights-only"]),
        ("truncated", ["corrupt or truncated"]),
        ("corrupt", ["corrupt.pth", "not a readable checkpoint"]),
        ("garbage", ["garbage.safetensors", "corrupt or truncated"]),
        ("other", ["do not fit tv:resnet18", "unexpected keys"]),
        ("unreadable", ["is a folder"]),
    ],
)
def test_weight_errors(
    weights: dict[str, Path], tmp_path: Path, kind: str, needles: list[str]
) -> None:
    out = tmp_path / "out.safetensors"
    code, stdout, err = cli(
        "inject", "tv:resnet18", "--weights", str(weights[kind]), "-o", str(out)
    )
    assert code == 1 and stdout == ""
    one_line_error(err, *needles)
    assert not out.exists()


@pytest.mark.parametrize("command", ["inspect", "retune", "verify"])
def test_damaged_safetensors_file_is_a_one_line_error(
    weights: dict[str, Path], tmp_path: Path, command: str
) -> None:
    out = tmp_path / "out.safetensors"
    args = ["--max-rate", "0.1", "-o", str(out)] if command == "retune" else []
    code, stdout, err = cli(command, str(weights["garbage"]), *args)
    assert code == 1 and stdout == ""
    one_line_error(err, "garbage.safetensors", "not a valid safetensors file")
    assert not out.exists()


def test_weights_load(weights: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    code, _, err = cli("inject", "tv:resnet18", "--weights", str(weights["ok"]), "-o", str(out))
    assert code == 0, err
    ref = torch.load(weights["ok"], weights_only=True)["model"]
    assert all(torch.equal(load_file(str(out))[k], v) for k, v in ref.items())


def test_output_errors(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = cli("inject", "tv:resnet18", "-o", str(out))
    assert code == 1
    one_line_error(err, "exists", "--force")
    assert out.read_bytes() == b"keep me"
    code, _, err = cli("inject", "tv:resnet18", "-o", str(tmp_path / "no" / "x.safetensors"))
    assert code == 1
    one_line_error(err, "does not exist")
    assert cli("inject", "tv:resnet18", "-o", str(out), "--force")[0] == 0


def test_debug_shows_traceback() -> None:
    r = subprocess.run(
        [SCRIPT, "inject", "tv:resnet18", "--max-rate", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "DPATCH_DEBUG": "1"},
        check=False,
    )
    assert r.returncode == 1 and "Traceback" in r.stderr


# --------------------------------------------------------------------------- real process
def test_installed_script_main_job(tmp_path: Path) -> None:
    """`dpatch inject resnet50 --max-rate 0.2` works as written (and with -o)."""
    r = subprocess.run(
        [SCRIPT, "inject", "resnet50", "--max-rate", "0.2", "-o", "out.safetensors"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "16 sites in 16 blocks" in r.stdout and "timm:resnet50" in r.stderr
    r = subprocess.run(
        [SCRIPT, "inspect", "out.safetensors", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 0 and r.stderr == ""
    doc = json.loads(r.stdout)  # stdout is one JSON document, nothing else
    assert doc["summary"]["sites"] == 16 and doc["sites"][-1]["rate"] == pytest.approx(0.2)


def test_installed_script_error_exit_codes(tmp_path: Path) -> None:
    r = subprocess.run([SCRIPT, "inject", "tv:vgg11"], capture_output=True, text=True, check=False)
    assert r.returncode == 3 and r.stderr.count("\n") == 1
    r = subprocess.run([SCRIPT, "inspect"], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: ")


def test_list_bare_word_is_a_substring() -> None:
    code, out, _ = cli("list", "vit_small", "--source", "timm", "--json")
    names = [e["model"] for e in json.loads(out)]
    assert code == 0 and "timm:vit_small_patch16_224" in names
    assert all("vit_small" in n for n in names)
    code, out, _ = cli("list", "vit_small_patch16_22?", "--source", "timm", "--json")
    assert [e["model"] for e in json.loads(out)] == ["timm:vit_small_patch16_224"]


# --------------------------------------------------------------------------- env
def test_env_prints_what_a_bug_report_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPATCH_KERNELS", raising=False)
    monkeypatch.setenv("DPATCH_DEBUG", "0")
    code, out, err = cli("env")
    assert code == 0, err
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert rows["dpatch"] == dpatch_version()
    assert rows["torch"].startswith(torch.__version__)
    for name in ("python", "torchvision", "timm", "transformers", "lightning", "triton"):
        assert rows[name], name
    if not torch.cuda.is_available():
        assert rows["cuda"] == "no device"
        assert rows["kernels"].startswith("off: no CUDA device")
        assert rows["self-check"] == "not run (kernels not in use)"
    assert rows["DPATCH_DEBUG"] == "0"


def test_env_json_with_interpreted_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """With DPATCH_KERNELS=interpret the kernels' self-check runs in Triton's interpreter
    and its verdicts are part of the one JSON document on stdout."""
    pytest.importorskip("triton")
    monkeypatch.setenv("DPATCH_KERNELS", "interpret")
    code, out, err = cli("env", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["dpatch"] == dpatch_version() and doc["packages"]["torch"] == torch.__version__
    assert set(doc["packages"]) == {
        "torch", "torchvision", "timm", "transformers", "lightning", "triton"
    }  # fmt: skip
    kernels = doc["kernels"]
    assert kernels["state"] == "interpreted"
    assert [c["case"] for c in kernels["self_checks"]] == [
        f"{d} contiguous (rank 3) on cpu" for d in ("float32", "bfloat16", "float16")
    ]
    assert all(c["ok"] for c in kernels["self_checks"])
    assert doc["variables"]["DPATCH_KERNELS"] == "interpret"
    assert isinstance(doc["cuda"]["devices"], list)


def test_env_names_a_bad_kernel_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPATCH_KERNELS", "yes")
    code, out, _ = cli("env", "--json", "--no-self-check")
    assert code == 0
    kernels = json.loads(out)["kernels"]
    assert kernels["state"] == "invalid" and "'yes'" in kernels["reason"]


def dpatch_version() -> str:
    from dpatch import __version__

    return __version__
