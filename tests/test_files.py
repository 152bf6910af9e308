"""Files: manifest, plain-loadable safetensors, atomic writes, safe weight loading."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file

import dpatch
from dpatch import files as dfiles
from dpatch import models as zoo
from dpatch.errors import ManifestError, OutputError, WeightsError
from dpatch.files import _manifest as dmanifest


@pytest.fixture
def patched(tmp_path: Path) -> tuple[torch.nn.Module, dpatch.PatchReport, Path]:
    torch.manual_seed(0)
    model = zoo.create_model("timm:resnet18")
    report = dpatch.inject(model, 0.2, schedule="cosine")
    out = dfiles.save(model, tmp_path / "r18.safetensors", report)
    return model, report, out


def test_file_loads_into_plain_timm_model_strictly(patched) -> None:
    model, _, out = patched
    plain = timm.create_model("resnet18")
    plain.load_state_dict(load_file(str(out)), strict=True)
    assert sorted(load_file(str(out))) == sorted(plain.state_dict())  # file order is sorted
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), model.eval()(x))


def test_file_loads_into_plain_torchvision_model_strictly(tmp_path: Path) -> None:
    model = zoo.create_model("tv:resnet18")
    dpatch.inject(model, 0.1)
    out = dfiles.save(model, tmp_path / "tv.safetensors")
    torchvision.models.resnet18().load_state_dict(load_file(str(out)), strict=True)


def test_manifest_contents(patched) -> None:
    _, report, out = patched
    m = dfiles.read_manifest(out)
    assert m is not None and m["format"] == dmanifest.FORMAT
    assert m["model"] == {"spec": "timm:resnet18", "kwargs": {}}
    assert set(m["versions"]) == {"dpatch", "torch", "timm", "torchvision"}
    assert m["schedule"]["schedule"] == "cosine" and m["schedule"]["max_rate"] == 0.2
    assert [s["rate"] for s in m["sites"]] == [s.rate for s in report.sites]
    assert all({"path", "branch", "rate", "mode", "scaling"} <= set(s) for s in m["sites"])


def test_round_trip_inject_save_load_inspect(patched) -> None:
    model, report, out = patched
    loaded = dfiles.load(out)
    again = dpatch.inspect(loaded)
    assert [(s.name, s.rate, s.mode, s.scaling) for s in again.sites] == [
        (s.name, s.rate, s.mode, s.scaling) for s in report.sites
    ]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_round_trip_keeps_constructor_kwargs(tmp_path: Path) -> None:
    model = zoo.create_model("timm:vit_tiny_patch16_224", img_size=32)
    dpatch.inject(model, 0.1, skip=True)
    out = dfiles.save(model, tmp_path / "vit.safetensors")
    loaded = dfiles.load(out)
    assert loaded.patch_embed.img_size == (32, 32)
    assert all(s.skip for s in dpatch.find_sites(loaded))


def test_never_overwrites_without_force(patched) -> None:
    model, report, out = patched
    with pytest.raises(OutputError, match="--force"):
        dfiles.save(model, out, report)
    dfiles.save(model, out, report, force=True)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_mode_a_plain_write_gives(tmp_path: Path, umask: int) -> None:
    """Written through a private temporary, a file still gets 0o666 less the umask (it
    was 0o600 whatever the umask), as `open(path, "w")` would give it."""
    old = os.umask(umask)
    try:
        out = dfiles.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask


def test_output_folder_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(OutputError, match="does not exist"):
        dfiles.save(model, tmp_path / "nope" / "x.safetensors")
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # tests may run as root
    with pytest.raises(OutputError, match="not writable"):
        dfiles.save(model, tmp_path / "x.safetensors")


def test_interrupted_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch as st

    real = st.save_file

    def half_then_interrupt(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        dfiles.save(torch.nn.Linear(3, 3), tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- weights
def sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet18().state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s},
        lambda s: {"model": s, "optimizer": {"lr": 0.1}, "epoch": 3},
        lambda s: {"model_state_dict": s},
        lambda s: {"state_dict_ema": s},
        lambda s: OrderedDict((f"module.{k}", v) for k, v in s.items()),  # DDP
        lambda s: {f"_orig_mod.{k}": v for k, v in s.items()},  # torch.compile
        lambda s: {"n_averaged": torch.tensor(3), **{f"module.{k}": v for k, v in s.items()}},
    ],
    ids=["plain", "state_dict", "model", "model_state_dict", "ema", "ddp", "compile", "swa"],
)
def test_weights_only_checkpoints_load(tmp_path: Path, wrap) -> None:  # type: ignore[no-untyped-def]
    state = sd()
    path = tmp_path / "w.pt"
    torch.save(wrap(state), path)
    model = torchvision.models.resnet18()
    dfiles.load_weights(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_pickle_that_is_not_weights_only_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": sd(), "obj": _Opaque()}, path)
    with pytest.raises(WeightsError, match="weights-only"):
        dfiles.load_state_dict_file(path)


class _Opaque:
    pass


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(sd(), path)
    else:
        save_file(sd(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"corrupt or truncated|not a readable"):
        dfiles.load_state_dict_file(path)


def test_garbage_empty_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match=r"junk\.pth"):
        dfiles.load_state_dict_file(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        dfiles.load_state_dict_file(empty)
    with pytest.raises(WeightsError, match="does not exist"):
        dfiles.load_state_dict_file(tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="folder"):
        dfiles.load_state_dict_file(tmp_path)


def test_weights_of_another_architecture_list_keys(tmp_path: Path) -> None:
    path = tmp_path / "r34.safetensors"
    save_file(torchvision.models.resnet34().state_dict(), str(path))
    with pytest.raises(WeightsError, match=r"unexpected keys \(e\.g\. layer1\.2"):
        dfiles.load_weights(torchvision.models.resnet18(), path)
    path2 = tmp_path / "r18_10.safetensors"
    save_file(torchvision.models.resnet18(num_classes=10).state_dict(), str(path2))
    with pytest.raises(
        WeightsError, match=r"shape mismatches \(e\.g\. fc\.weight: file \(10, 512\)"
    ):
        dfiles.load_weights(torchvision.models.resnet18(), path2)


def test_load_without_manifest_or_spec(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    assert dfiles.read_manifest(plain) is None
    with pytest.raises(ManifestError, match="no dpatch manifest"):
        dfiles.load(plain)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    out = dfiles.save(model, tmp_path / "nospec.safetensors")
    with pytest.raises(ManifestError, match=r"model=\.\.\."):
        dfiles.load(out)
    assert isinstance(
        dfiles.load(out, model=torch.nn.Sequential(torch.nn.Linear(2, 2))), torch.nn.Module
    )


def test_manifest_of_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    meta = {dmanifest.MANIFEST_KEY: json.dumps({"format": "dpatch/99", "sites": []})}
    save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
    with pytest.raises(ManifestError, match="dpatch/99"):
        dfiles.read_manifest(path)


def test_manifest_of_another_model_is_refused(tmp_path: Path, patched) -> None:
    _, _, out = patched
    with pytest.raises((ManifestError, WeightsError)):
        dfiles.load(out, model=timm.create_model("resnet34"))
