"""Many checkpoints per command: the library (dpatch.files) and the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import cli

import dpatch
import dpatch.files._batch as batch_mod
from dpatch.errors import InvalidValueError, OutputError
from dpatch.files import inspect_many, patch_many, prepare_batch, verify_many

TINY = """
import torch.nn as nn
from timm.layers import DropPath


class Blk(nn.Module):
    def __init__(self, c, rate):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, c))
        self.drop_path = DropPath(rate) if rate else nn.Identity()

    def forward(self, x):
        return x + self.drop_path(self.f(x))


def tiny(c=16):
    rates = [0.0, 0.05, 0.1]
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, c), *[Blk(c, r) for r in rates], nn.Linear(c, 4))


def wide():
    return tiny(24)
"""


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a model module (``tinymodels:tiny``) as the current directory."""
    (tmp_path / "tinymodels.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def plain(folder: Path, name: str, seed: int, factory: str = "tiny") -> Path:
    import tinymodels  # type: ignore[import-not-found]

    torch.manual_seed(seed)
    folder.mkdir(exist_ok=True)
    path = folder / name
    save_file(getattr(tinymodels, factory)().state_dict(), str(path))
    return path


def patched(folder: Path, name: str, seed: int, **kwargs: object) -> Path:
    torch.manual_seed(seed)
    model = dpatch.models.create_model("tinymodels:tiny")
    report = dpatch.inject(model, **kwargs)  # type: ignore[arg-type]
    folder.mkdir(exist_ok=True)
    return dpatch.save(model, folder / name, report)


def counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def no_temp_files(folder: Path) -> bool:
    return not any(p.name.startswith(".") and p.suffix == ".tmp" for p in folder.iterdir())


# --------------------------------------------------------------------------- inputs
def test_folders_and_globs_expand(work: Path) -> None:
    plain(work / "ck", "a.safetensors", 0)
    plain(work / "ck", "b.pt", 1)
    (work / "ck" / "notes.txt").write_text("not a checkpoint")
    (work / "ck" / ".hidden.safetensors").write_text("")
    batch = prepare_batch(["ck", "ck/*.safetensors", "tinymodels:tiny"])
    assert [i.text for i in batch.inputs] == ["ck/a.safetensors", "ck/b.pt", "tinymodels:tiny"]
    assert [i.is_file for i in batch.inputs] == [True, True, False]
    assert not batch.problems


def test_input_problems_are_per_input(work: Path) -> None:
    (work / "empty").mkdir()
    batch = prepare_batch(["nothing/*.pt", "empty", "tinymodels:tiny"])
    assert sorted(batch.problems) == [0, 1]
    assert "matches no file" in str(batch.problems[0])
    assert "holds no checkpoint" in str(batch.problems[1])


def test_output_names_and_their_problems(work: Path) -> None:
    x1 = plain(work / "a", "x.safetensors", 0)
    x2 = plain(work / "b", "x.pt", 1)
    y = plain(work / "a", "y.safetensors", 2)
    (work / "out").mkdir()
    (work / "out" / "y-dp.safetensors").write_bytes(b"keep me")
    batch = prepare_batch([str(x1), str(x2), str(y)], out_dir=work / "out")
    assert set(batch.problems) == {0, 1, 2}
    assert "both map to" in str(batch.problems[0]) and "--output-template" in str(batch.problems[0])
    assert "exists" in str(batch.problems[2])
    fine = prepare_batch(
        [str(x1), str(x2)], out_dir=work / "out", template="{parent}-{stem}.safetensors"
    )
    assert [p.name for p in fine.outputs.values()] == ["a-x.safetensors", "b-x.safetensors"]
    assert not fine.problems
    two = plain(work / "a", "2.safetensors", 3)
    clobber = prepare_batch([str(two), str(y)], out_dir=work / "a", template="{index}.safetensors")
    assert list(clobber.problems) == [1] and "another input" in str(clobber.problems[1])


@pytest.mark.parametrize(
    ("template", "match"), [("{nope}.st", "nope"), ("../x.st", "inside"), ("{0}", "not valid")]
)
def test_bad_templates(work: Path, template: str, match: str) -> None:
    plain(work / "ck", "a.safetensors", 0)
    with pytest.raises(InvalidValueError, match=match):
        prepare_batch(["ck"], out_dir=work / "out", template=template)


def test_output_folder_that_is_a_file_or_read_only(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain(work / "ck", "a.safetensors", 0)
    (work / "file").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        prepare_batch(["ck"], out_dir=work / "file")
    (work / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p).endswith("ro") else real(p, m))
    with pytest.raises(OutputError, match="not writable"):
        prepare_batch(["ck"], out_dir=work / "ro")


# --------------------------------------------------------------------------- running
def test_inject_many_builds_and_analyses_once(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [plain(work / "ck", f"{i}.safetensors", i) for i in range(3)]
    builds = counting(monkeypatch, batch_mod, "create_model")
    probes = counting(monkeypatch, dpatch.patching._patch, "analyze")
    batch = prepare_batch(["ck"], out_dir=work / "out")
    results = list(patch_many("inject", batch, model="tinymodels:tiny", max_rate=0.2))
    assert [r.ok for r in results] == [True] * 3
    assert len(builds) == 1 and len(probes) == 1
    for src, r in zip(files, results, strict=True):
        assert r.output is not None and Path(r.output).name == f"{src.stem}-dp.safetensors"
        assert all(torch.equal(v, load_file(r.output)[k]) for k, v in load_file(src).items())
        loaded = dpatch.load(r.output)
        assert [s.rate for s in dpatch.find_sites(loaded)] == pytest.approx([0, 0.1, 0.2])


def test_retune_many_keeps_each_files_settings(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = patched(work / "ck", "a.safetensors", 0, max_rate=0.2, mode="batch", scaling="expected")
    b = patched(work / "ck", "b.safetensors", 1, max_rate=0.2, skip=True)
    c = patched(work / "ck", "c.safetensors", 2, max_rate=0.3, mode="batch", scaling="expected")
    builds = counting(monkeypatch, batch_mod, "create_model")
    batch = prepare_batch([str(a), str(b), str(c)], out_dir=work / "out")
    results = list(patch_many("retune", batch, max_rate=0.1, schedule="uniform"))
    assert [r.ok for r in results] == [True] * 3
    assert len(builds) == 2  # one per (architecture, skipping form)
    outs = {Path(r.input).name: dpatch.files.read_manifest(r.output or "") for r in results}
    for name, want in (("a", ("batch", "expected", False)), ("c", ("batch", "expected", False))):
        sites = outs[f"{name}.safetensors"]["sites"]  # type: ignore[index]
        assert {(s["mode"], s["scaling"], s["skip"]) for s in sites} == {want}
        assert {s["rate"] for s in sites} == {0.1}
    b_sites = outs["b.safetensors"]["sites"]  # type: ignore[index]
    assert all(s["skip"] and s["mode"] == "row" for s in b_sites)
    # Same result as one file at a time (load, retune).
    single = dpatch.load(c)
    ref = dpatch.retune(single, 0.1, schedule="uniform")
    assert [s.to_dict() for s in ref.sites] == outs["c.safetensors"]["sites"]  # type: ignore[index]


def test_mixed_architectures(work: Path) -> None:
    a = patched(work / "ck", "a.safetensors", 0, max_rate=0.2)
    b = plain(work / "ck", "b.safetensors", 1, factory="wide")
    batch = prepare_batch([str(a), str(b)], out_dir=work / "out")
    results = list(patch_many("inject", batch, keep_going=True))
    assert [r.ok for r in results] == [True, False]
    assert results[1].error is not None and "--model" in results[1].error
    again = prepare_batch([str(a), str(b)], out_dir=work / "out2")
    wrong = list(patch_many("inject", again, model="tinymodels:tiny", keep_going=True))
    assert [r.exit_code for r in wrong] == [0, 1] and "do not fit" in (wrong[1].error or "")


def test_keep_going_and_stopping(work: Path) -> None:
    plain(work / "ck", "a.safetensors", 0)
    (work / "ck" / "b.safetensors").write_bytes(b"\x00garbage" * 10)
    plain(work / "ck", "c.safetensors", 2)
    batch = prepare_batch(["ck"], out_dir=work / "out")
    stopped = list(patch_many("inject", batch, model="tinymodels:tiny"))
    assert [r.ok for r in stopped] == [True, False]
    assert sorted(p.name for p in (work / "out").iterdir()) == ["a-dp.safetensors"]
    went_on = list(
        patch_many(
            "inject",
            prepare_batch(["ck"], out_dir=work / "out2"),
            model="tinymodels:tiny",
            keep_going=True,
        )
    )
    assert [r.exit_code for r in went_on] == [0, 1, 0]
    assert sorted(p.name for p in (work / "out2").iterdir()) == [
        "a-dp.safetensors",
        "c-dp.safetensors",
    ]
    assert no_temp_files(work / "out") and no_temp_files(work / "out2")


def test_unreadable_file_in_a_folder(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain(work / "ck", "a.safetensors", 0)
    plain(work / "ck", "b.safetensors", 1)
    real = os.access  # root reads everything: make b unreadable the way dpatch asks
    monkeypatch.setattr(
        os, "access", lambda p, m: False if str(p).endswith("b.safetensors") else real(p, m)
    )
    results = list(
        patch_many(
            "inject", prepare_batch(["ck"], out_dir=work / "out"), model="tinymodels:tiny",
            keep_going=True,
        )
    )  # fmt: skip
    assert [r.ok for r in results] == [True, False]
    assert "not readable (permissions)" in (results[1].error or "")


def test_failed_write_leaves_no_partial_file_and_keeps_earlier_ones(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    for i in range(3):
        plain(work / "ck", f"{i}.safetensors", i)
    real = safetensors.torch.save_file
    written: list[str] = []

    def flaky(tensors: dict, path: str, metadata: dict | None = None) -> None:
        written.append(path)
        if len(written) == 2:
            Path(path).write_bytes(b"half a file")
            raise OSError("disk full")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    batch = prepare_batch(["ck"], out_dir=work / "out")
    results = list(patch_many("inject", batch, model="tinymodels:tiny", keep_going=True))
    assert [r.ok for r in results] == [True, False, True]
    assert "disk full" in (results[1].error or "")
    assert sorted(p.name for p in (work / "out").iterdir()) == [
        "0-dp.safetensors",
        "2-dp.safetensors",
    ]
    assert dpatch.load(work / "out" / "0-dp.safetensors") is not None


def test_inspect_many_reads_manifests_without_building(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    patched(work / "ck", "a.safetensors", 0, max_rate=0.2)
    plain(work / "ck", "b.safetensors", 1)
    builds = counting(monkeypatch, batch_mod, "create_model")
    results = list(inspect_many(prepare_batch(["ck"])))
    assert not builds
    assert results[0].report is not None and len(results[0].report.sites) == 3
    assert results[1].report is None and results[1].info is not None
    assert results[1].info["manifest"] is None
    with_model = list(inspect_many(prepare_batch(["ck"]), model="tinymodels:tiny"))
    assert len(builds) == 1 and all(r.ok and r.report is not None for r in with_model)


def test_verify_many_checks_each_file_against_its_manifest(work: Path) -> None:
    a = patched(work / "ck", "a.safetensors", 0, max_rate=0.2)
    b = patched(work / "ck", "b.safetensors", 1, max_rate=0.3, skip=True)
    results = list(verify_many(prepare_batch([str(a), str(b)]), draws=512))
    assert [r.ok for r in results] == [True, True]
    reports = [r.report for r in results]
    assert all(isinstance(r, dpatch.VerifyReport) for r in reports)
    assert [c.declared for c in reports[1].sites] == pytest.approx([0.0, 0.15, 0.3])  # type: ignore[union-attr]
    assert all(c.measured.exact for c in reports[1].sites[1:])  # type: ignore[union-attr]


# --------------------------------------------------------------------------- command line
def test_cli_many_files_one_line_each(work: Path) -> None:
    for i in range(3):
        plain(work / "ck", f"{i}.safetensors", i)
    code, out, err = cli("inject", "ck", "--model", "tinymodels:tiny", "-o", "out", cwd=work)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all("-> out/" in ln and "3 sites" in ln for ln in lines)
    assert "3 inputs: 3 ok, 0 failed" in err
    code, out, err = cli("inspect", "out", "--json", cwd=work)
    docs = [json.loads(ln) for ln in out.strip().splitlines()]
    assert (
        code == 0 and len(docs) == 3 and all(d["ok"] and d["summary"]["sites"] == 3 for d in docs)
    )


def test_cli_json_lines_keep_going_and_worst_exit_code(work: Path) -> None:
    plain(work / "ck", "a.safetensors", 0)
    (work / "ck" / "b.pt").write_bytes(b"\x00garbage" * 10)
    args = ("inject", "ck", "--model", "tinymodels:tiny", "-o", "out", "--json")
    code, out, err = cli(*args, "--keep-going", cwd=work)
    docs = [json.loads(ln) for ln in out.strip().splitlines()]
    assert code == 1 and [d["ok"] for d in docs] == [True, False]
    assert "not a readable checkpoint" in docs[1]["error"] and err == ""
    code, out, err = cli("inject", "ck", "--model", "tinymodels:tiny", "-o", "out2", cwd=work)
    assert code == 1 and "error: ck/b.pt:" in err and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["inject", "none/*.pt", "ck", "-o", "out"], ["none/*.pt", "matches no file"]),
        (["inject", "ck", "ck2", "-o", "out"], ["both map to", "--output-template"]),
        (["inject", "ck", "-o", "file.txt"], ["file.txt", "is a file"]),
        (["inject", "ck", "--weights", "x.pt", "-o", "out"], ["--weights", "single MODEL"]),
    ],
)
def test_cli_bad_batch_input(work: Path, args: list[str], needles: list[str]) -> None:
    plain(work / "ck", "a.safetensors", 0)
    plain(work / "ck2", "a.safetensors", 1)
    (work / "file.txt").write_text("")
    code, out, err = cli(*args, "--model", "tinymodels:tiny", cwd=work)
    assert code == 1 and out == ""
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), err
    assert not (work / "out").exists() or not any((work / "out").iterdir())


def test_cli_retune_keeps_skip_mode_and_scaling(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    code, _, err = cli(
        "inject",
        "tv:resnet18",
        "--max-rate",
        "0.2",
        "--skip",
        "--mode",
        "batch",
        "--scaling",
        "expected",
        "-o",
        str(a),
    )
    assert code == 0, err
    code, out, err = cli("retune", str(a), "--max-rate", "0.1", "-o", str(b))
    assert code == 0, err
    assert (
        "changed: rate on 7 of 8 sites; kept: schedule linear (per block), mode, scaling, skip"
        in out
    )
    sites = dpatch.files.read_manifest(b)["sites"]  # type: ignore[index]
    assert {(s["mode"], s["scaling"]) for s in sites} == {("batch", "expected")}
    assert all(s["skip"] for s in sites)
    code, out, _ = cli("retune", str(b), "--max-rate", "0.1", "--no-skip", "--json")
    assert code == 0 and not any(s["skip"] for s in json.loads(out)["sites"])


def test_cli_verify(work: Path) -> None:
    a = patched(work / "ck", "a.safetensors", 0, max_rate=0.2)
    code, out, err = cli("verify", str(a), "--draws", "512", cwd=work)
    assert code == 0, err
    assert "3 sites, 3 measured: ok" in out and " s" in out.splitlines()[-1]
    code, out, _ = cli("verify", str(a), "--json", cwd=work)
    doc = json.loads(out)
    assert doc["ok"] and doc["file"] == str(a) and len(doc["sites"]) == 3


BUGGY = """
import torch.nn as nn
from timm.layers import DropPath


class Blk(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)
        self.drop_path = DropPath(0.3)

    def forward(self, x):
        return x + self.f(x)  # forgets self.drop_path


def buggy():
    return nn.Sequential(
        nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 8), Blk(), Blk()
    )
"""


def test_cli_verify_exits_1_with_one_line_per_mismatch(work: Path) -> None:
    (work / "buggy.py").write_text(BUGGY)
    code, _, err = cli("verify", "buggy:buggy", cwd=work)
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("mismatch:")]
    assert lines == [
        "mismatch: [never-called] 4.drop_path: rate 0.3000 but never called in training",
        "mismatch: [never-called] 5.drop_path: rate 0.3000 but never called in training",
    ]
    code, _, _ = cli("verify", "buggy:buggy", "--ignore", "never-called", cwd=work)
    assert code == 0


def test_cli_verify_many(work: Path) -> None:
    patched(work / "ck", "a.safetensors", 0, max_rate=0.2)
    patched(work / "ck", "b.safetensors", 1, max_rate=0.1, mode="batch")
    code, out, err = cli("verify", "ck", "--draws", "256", cwd=work)
    assert code == 0, err
    assert [ln.split(": ")[1] for ln in out.strip().splitlines()] == ["ok", "ok"]


def test_single_input_keeps_todays_output(tmp_path: Path) -> None:
    """One model, no template: the table and summary as before (no per-file lines)."""
    code, out, err = cli("inject", "tv:resnet18", "-o", str(tmp_path / "x.safetensors"))
    assert code == 0 and "8 sites in 8 blocks" in out and "inputs:" not in err
    assert err.strip().endswith(f"wrote {tmp_path / 'x.safetensors'}")


def test_cli_verify_help_and_dry_run(work: Path) -> None:
    code, out, _ = cli("verify", "--help")
    assert code == 0 and "Example: dpatch verify" in " ".join(out.split())
    plain(work / "ck", "a.safetensors", 0)
    plain(work / "ck", "b.safetensors", 1)
    code, out, err = cli(
        "inject", "ck", "--model", "tinymodels:tiny", "-o", "out", "--dry-run", cwd=work
    )
    assert code == 0, err
    assert out.count("dry run: would write out/") == 2 and not (work / "out").exists()


def test_cli_inspect_many_plain_files(work: Path) -> None:
    plain(work / "ck", "a.safetensors", 0)
    patched(work / "ck", "b.safetensors", 1, max_rate=0.2)
    code, out, err = cli("inspect", "ck", cwd=work)
    assert code == 0, err
    a, b = out.strip().splitlines()
    assert "ck/a.safetensors: no dpatch manifest" in a and "--model" in a
    assert b.startswith("ck/b.safetensors: tinymodels:tiny: 3 sites in 3 blocks")
