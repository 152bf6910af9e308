"""Sensitivity: each branch removed in turn; suggested rates; evaluation data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import PlainRes, example, snapshot
from safetensors.torch import save_file
from torch import nn

import dpatch
from dpatch import DataError, InvalidValueError
from dpatch.depth import SensitivityReport, SiteSensitivity, load_data, read_rates, read_scores


class Classifier(nn.Module):
    """Three residual blocks and a linear head on (B, 4, 8) inputs."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.blocks = nn.Sequential(PlainRes(), PlainRes(), PlainRes())
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).flatten(1))


def _zero_last(block: PlainRes) -> None:
    with torch.no_grad():
        block.f[2].weight.zero_()
        block.f[2].bias.zero_()


def test_a_branch_that_outputs_zeros_scores_zero() -> None:
    torch.manual_seed(0)
    model = Classifier()
    _zero_last(model.blocks[1])
    x = example(batch=32, seed=1)
    y = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(2))
    report = dpatch.sensitivity(model, x, y, batch_size=7)
    assert report.metric == "ce_increase" and report.samples == 32
    names = [s.name for s in report.sites]
    assert names == ["blocks.0.drop_path", "blocks.1.drop_path", "blocks.2.drop_path"]
    zero = report.sites[1]
    assert zero.score == 0.0 and zero.accuracy_drop == 0.0 and zero.kl == 0.0
    assert zero.rel_l2 == 0.0
    for s in (report.sites[0], report.sites[2]):
        assert s.rel_l2 is not None and s.rel_l2 > 0 and s.kl is not None and s.kl > 0
    assert set(report.scores) == set(names)
    assert report.accuracy is not None and 0 <= report.accuracy <= 1
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["scores"] == report.scores and doc["sites"][1]["score"] == 0.0


def test_metrics_without_targets() -> None:
    torch.manual_seed(0)
    model = Classifier()
    x = example(batch=8)
    assert dpatch.sensitivity(model, x).metric == "kl"  # 2-D outputs: a classifier
    seq = nn.Sequential(PlainRes(), PlainRes())
    _zero_last(seq[0])
    report = dpatch.sensitivity(seq, x)  # (B, 4, 8) outputs
    assert report.metric == "rel_l2"
    assert report.sites[0].score == 0.0 and report.sites[1].score > 0
    assert report.sites[0].kl is None and report.sites[0].accuracy_drop is None


def test_the_model_is_not_changed() -> None:
    torch.manual_seed(0)
    model = Classifier()
    dpatch.inject(model, max_rate=0.3, scaling="expected", example_inputs=(example(),))
    before, sites = snapshot(model), dpatch.find_sites(model, (example(),))
    model.train()
    dpatch.sensitivity(model, example(batch=4))
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dpatch.find_sites(model, (example(),)) == sites


def test_torchvision_model_and_progress() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    with torch.no_grad():
        model.layer3[0].bn2.weight.zero_()
        model.layer3[0].bn2.bias.zero_()
    seen: list[tuple[int, int]] = []
    report = dpatch.sensitivity(
        model, torch.randn(4, 3, 32, 32), progress=lambda d, t: seen.append((d, t))
    )
    assert seen[-1] == (8, 8) and len(seen) == 8
    by_name = {s.name: s.score for s in report.sites}
    assert by_name["layer3.0.drop_path"] == 0.0
    assert all(v is not None and v > 0 for k, v in by_name.items() if k != "layer3.0.drop_path")


def test_pruned_sites_are_not_measured() -> None:
    x = example()
    model = nn.Sequential(PlainRes(), PlainRes())
    dpatch.prune(model, ["0.drop_path"], example_inputs=(x,))
    report = dpatch.sensitivity(model, x)
    assert report.sites[0].score is None and report.sites[0].reason == "pruned already"
    assert list(report.scores) == ["1.drop_path"]


def test_bad_data() -> None:
    model = nn.Sequential(PlainRes())
    with pytest.raises(DataError, match="non-empty"):
        dpatch.sensitivity(model, torch.empty(0, 4, 8))
    with pytest.raises(DataError, match="integer class labels"):
        dpatch.sensitivity(Classifier(), example(batch=4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InvalidValueError, match="shape"):
        dpatch.sensitivity(model, example(batch=4), torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------- suggesting
def _report(scores: list[float | None]) -> SensitivityReport:
    return SensitivityReport(
        "kl",
        tuple(SiteSensitivity(f"s{i}", i, 0.0, v) for i, v in enumerate(scores)),
        10,
    )


def test_suggested_rates_are_monotone_in_robustness() -> None:
    rates = dpatch.suggest_rates(_report([0.5, 0.1, 0.9, 0.3]), 0.3)
    assert rates == pytest.approx([0.1, 0.3, 0.0, 0.2])
    # equal scores share a rate; unmeasured sites get 0
    rates = dpatch.suggest_rates(_report([0.2, 0.2, None, 0.4]), 0.4)
    assert rates == pytest.approx([0.3, 0.3, 0.0, 0.0])
    assert dpatch.suggest_rates(_report([0.7]), 0.25) == [0.25]
    with pytest.raises(InvalidValueError):
        dpatch.suggest_rates(_report([0.1]), 1.0)


def test_rates_and_scores_files(tmp_path: Path) -> None:
    from dpatch.depth import suggestion

    doc = suggestion(_report([0.5, 0.1]), 0.2, model="timm:resnet18")
    assert doc["model"] == "timm:resnet18" and doc["per"] == "branch"
    (tmp_path / "s.json").write_text(json.dumps(doc))
    assert read_rates(tmp_path / "s.json") == pytest.approx([0.0, 0.2])
    assert read_scores(tmp_path / "s.json") == {"s0": 0.5, "s1": 0.1}
    (tmp_path / "l.json").write_text("[0.1, 0.2]")
    assert read_rates(tmp_path / "l.json") == [0.1, 0.2]
    (tmp_path / "bad.json").write_text('{"rates": [0.1, 1.5]}')
    with pytest.raises(InvalidValueError, match="rate 1"):
        read_rates(tmp_path / "bad.json")
    with pytest.raises(InvalidValueError, match="no 'scores'"):
        read_scores(tmp_path / "l.json")


# --------------------------------------------------------------------------- data
def _image_folder(root: Path, classes: list[str]) -> None:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (40, 30), color=(10 * k, 100, 200)).save(root / c / f"{k}.png")


def test_image_folder_with_numeric_and_named_classes(tmp_path: Path) -> None:
    model = torchvision.models.resnet18()
    _image_folder(tmp_path / "num", ["3", "7"])
    data = load_data(tmp_path / "num", model)
    assert data.inputs.shape == (4, 3, 224, 224) and data.targets is not None
    assert data.targets.tolist() == [3, 3, 7, 7]
    _image_folder(tmp_path / "named", ["cat", "dog"])
    data = load_data(tmp_path / "named", model, limit=2)
    assert data.targets is not None and data.targets.tolist() == [0, 1]


def test_image_folder_uses_timm_transforms(tmp_path: Path) -> None:
    import timm

    model = timm.create_model("resnet18")
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 64, 64), "crop_pct": 1.0}
    _image_folder(tmp_path, ["0"])
    assert load_data(tmp_path, model).inputs.shape == (2, 3, 64, 64)


def test_data_errors(tmp_path: Path) -> None:
    model = torchvision.models.resnet18()
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_data(tmp_path / "empty", model)
    save_file({"x": torch.zeros(2, 3)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(DataError, match="no 'inputs'"):
        load_data(tmp_path / "t.safetensors", model)
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "missing.pt", model)
    with pytest.raises(InvalidValueError, match="not both"):
        load_data(tmp_path, model, synthetic=3)


def test_tensor_files_and_synthetic(tmp_path: Path) -> None:
    model = torchvision.models.resnet18()
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    torch.save({"inputs": x, "targets": y}, tmp_path / "d.pt")
    data = load_data(tmp_path / "d.pt", model)
    assert torch.equal(data.inputs, x) and data.targets is not None
    assert torch.equal(data.targets, y)
    torch.save({"inputs": x, "extra": nn.Linear(1, 1)}, tmp_path / "unsafe.pt")  # not weights
    with pytest.raises(DataError, match="not a readable tensor file"):
        load_data(tmp_path / "unsafe.pt", model)
    fake = load_data(None, model, synthetic=5)
    assert fake.synthetic and fake.targets is None and fake.inputs.shape == (5, 3, 224, 224)
