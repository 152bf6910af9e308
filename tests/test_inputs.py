"""Inputs inferred for the probe, and never a silent no-op when a model cannot run."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from helpers import PlainRes, cli, one_line_error
from torch import nn

import dpatch
from dpatch import ProbeError, find_sites, inject, inspect
from dpatch.analysis import probe


class VecBlock(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


class ConvBlock(nn.Module):
    def __init__(self, conv: type[nn.Module], c: int = 8) -> None:
        super().__init__()
        self.f = conv(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.blocks = nn.Sequential(VecBlock(), VecBlock(), VecBlock())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.embed(ids))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = VecBlock()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.block(x) * y


def _conv_net(conv: type[nn.Module]) -> nn.Module:
    return nn.Sequential(conv(3, 8, 1), ConvBlock(conv), ConvBlock(conv))


CASES = {
    "vector MLP (B, D)": (lambda: nn.Sequential(VecBlock(), VecBlock()), 2, "2x16 float32"),
    "Conv1d audio net": (lambda: _conv_net(nn.Conv1d), 2, "2x3x1024 float32"),
    "Conv3d video net": (lambda: _conv_net(nn.Conv3d), 2, "2x3x16x112x112 float32"),
    "token model (nn.Embedding)": (Tokens, 3, "2x16 int64"),
}


@pytest.mark.parametrize(("build", "sites", "shape"), list(CASES.values()), ids=list(CASES))
def test_first_layer_inference(build: object, sites: int, shape: str) -> None:
    model = build()  # type: ignore[operator]
    report = inject(model, 0.2)
    assert len(report.sites) == sites and all(s.fused for s in report.sites)
    assert report.example is not None and report.example.describe() == shape
    assert report.example.source.startswith("first layer")
    assert report.to_dict()["inputs"]["source"] == report.example.source


def test_torchvision_video_builder_gets_a_video_clip() -> None:
    model = torchvision.models.video.r3d_18()
    report = inspect(model)
    assert len(report.sites) == 8 and report.example is not None
    assert report.example.describe() == "2x3x16x112x112 float32"
    assert report.example.source.startswith("torchvision video")


def test_timm_pretrained_cfg_comes_first() -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32)
    assert probe(model).example.describe() == "2x3x32x32 float32"  # type: ignore[union-attr]


def test_transformers_config_gives_the_input() -> None:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_channels=1,
    )  # fmt: skip
    example = probe(ViTModel(config)).example
    assert example is not None and example.describe() == "2x1x32x32 float32"
    assert example.source == "transformers config (pixel_values)"


class ConfigOnly(nn.Module):
    """A model as transformers builds one, as far as input inference reads it: ``config``,
    ``main_input_name`` and the forward's parameters."""

    def __init__(self, config: object, main: str) -> None:
        super().__init__()
        self.config = config
        self.main_input_name = main

    def forward(
        self,
        main: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> torch.Tensor:
        return main


@pytest.mark.parametrize(
    ("config", "main", "described"),
    [
        (
            {"cls": "T5Config", "vocab_size": 64, "num_layers": 1},
            "input_ids",
            "2x16 int64, decoder_input_ids=2x16 int64, use_cache=False",
        ),
        (
            {"cls": "WhisperConfig", "num_mel_bins": 16, "max_source_positions": 12},
            "input_features",
            "2x16x24 float32, decoder_input_ids=2x16 int64, use_cache=False",
        ),
        (
            {
                "cls": "Wav2Vec2Config",
                "conv_dim": [8, 8],
                "conv_stride": [5, 4],
                "conv_kernel": [10, 4],
            },
            "input_values",
            "2x325 float32, use_cache=False",
        ),
        (
            {"cls": "LlamaConfig", "max_position_embeddings": 8},
            "input_ids",
            "2x8 int64, use_cache=False",
        ),
    ],
    ids=["encoder-decoder", "whisper", "speech", "decoder-only"],
)
def test_transformers_text_and_speech_inputs_come_from_the_config(
    config: dict[str, object], main: str, described: str
) -> None:
    transformers = pytest.importorskip("transformers")
    from dpatch.analysis._inputs import input_candidates

    kwargs = dict(config)
    cls = getattr(transformers, str(kwargs.pop("cls")))
    model = ConfigOnly(cls(**kwargs), main)
    first = input_candidates(model, 2)[0]
    assert first.describe() == described
    assert first.source == f"transformers config ({main})"
    doc = first.to_dict()
    assert doc["kwargs"]["use_cache"] is False
    wider = first.with_batch(3)
    assert all(
        v.shape[0] == 3 for v in [*wider.values, *wider.kwargs.values()] if hasattr(v, "shape")
    )


def test_given_inputs_win_and_are_reported() -> None:
    model = nn.Sequential(PlainRes(), PlainRes())
    x = torch.randn(3, 5, 8)
    report = inspect(model, (x,))
    assert report.example is not None and report.example.source == "given"
    assert report.example.describe() == "3x5x8 float32"


def test_a_model_that_runs_on_nothing_raises_never_empty() -> None:
    model = TwoInputs()
    for call in (find_sites, inspect, inject, lambda m: dpatch.retune(m, 0.1)):
        with pytest.raises(ProbeError, match="missing 1 required positional argument"):
            call(model)
    # given inputs that do not fit: the error names them
    with pytest.raises(ProbeError, match="does not run on the given input \\(2x7 float32\\)"):
        inspect(model, (torch.randn(2, 7),))
    # two inputs given: it runs
    assert len(inspect(model, (torch.randn(2, 16), torch.randn(2, 16))).sites) == 1


def test_float_input_for_a_text_model_names_the_integer_dtype() -> None:
    """A model that embeds token ids, given a float input: one line naming
    --input-dtype long, for an Embedding first layer and for a transformers config."""
    text = nn.Sequential(nn.Embedding(10, 8), PlainRes())
    with pytest.raises(ProbeError) as info:
        inspect(text, (torch.randn(2, 5),))
    msg = str(info.value)
    assert "takes token ids (its first layer is an Embedding)" in msg and "\n" not in msg
    assert "2x5 float32: add --input-dtype long" in msg
    assert len(inspect(text, (torch.zeros(2, 5, dtype=torch.long),)).sites) == 1
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, vocab_size=20)  # fmt: skip
    with pytest.raises(ProbeError, match="its transformers config takes input_ids"):
        inspect(transformers.BertModel(cfg), (torch.randn(2, 5),))
    # an image model given the wrong shape keeps the general message
    with pytest.raises(ProbeError, match="check the shapes and dtypes"):
        inspect(nn.Sequential(nn.Conv2d(3, 4, 3), PlainRes(4)), (torch.randn(2, 5),))


def test_model_that_ran_with_no_residual_is_empty_not_an_error() -> None:
    report = inject(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 0.2)
    assert report.sites == () and report.example is not None


def test_detector_in_training_mode_is_probed_in_eval() -> None:
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None
    )
    assert model.training
    report = inspect(model)
    assert report.sites and model.training  # probed in eval, mode restored
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------- command line
def test_cli_input_shape_and_dtype(tmp_path: object) -> None:
    code, out, err = cli("inspect", "tv:r3d_18", "--input-shape", "1,3,8,32,32", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["inputs"] == {
        "source": "given",
        "shapes": [[1, 3, 8, 32, 32]],
        "dtypes": ["float32"],
    }
    assert doc["summary"]["sites"] == 8
    code, out, err = cli("inspect", "tv:r3d_18")
    assert code == 0 and "input: 2x3x16x112x112 float32 (torchvision video" in out


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--input-shape", "1,a"], ["--input-shape", "'1,a'"]),
        (["--input-shape", "0,3"], ["--input-shape", "'0,3'"]),
        (["--input-shape", "1,3,8,8", "--input-dtype", "complex"], ["'complex'", "long"]),
        (["--input-dtype", "long"], ["--input-dtype needs --input-shape"]),
        (["--input-shape", "1,3,64,64"], ["VideoResNet does not run on the given input"]),
    ],
)
def test_cli_bad_input_shape(args: list[str], needles: list[str], tmp_path: object) -> None:
    out = f"{tmp_path}/x.safetensors"
    code, stdout, err = cli("inject", "tv:r3d_18", *args, "-o", out)
    assert code == 1 and stdout == ""
    one_line_error(err, *needles)
    import os

    assert not os.path.exists(out)


def test_cli_two_input_model_says_what_to_do() -> None:
    code, _, err = cli("inspect", "tv:raft_small")
    assert code == 1
    one_line_error(err, "could not run RAFT", "image2", "--input-shape")
    code, out, err = cli(
        "inspect", "tv:raft_small", "--input-shape", "1,3,128,128", "--input-shape", "1,3,128,128"
    )
    assert code == 0, err
    assert "sites in" in out


@pytest.mark.parametrize(
    "first", [nn.LayerNorm(16), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.GroupNorm(4, 16)]
)
def test_layers_answered_from_shapes_still_check_them(first: nn.Module) -> None:
    """The meta probe answers these layers from shapes; a wrong input must still fail, or
    dpatch would report a model as running on an input it rejects."""
    model = nn.Sequential(first, VecBlock())
    with pytest.raises(ProbeError, match="does not run on the given input"):
        inspect(model, (torch.randn(2, 7),))
    assert len(inspect(model, (torch.randn(2, 16),)).sites) == 1


class LinearPatches(nn.Module):
    """CaiT/ViT-style with a ``Linear`` patch embedding on unfolded image patches: its first
    layer suggests (B, 48) or (B, 16, 48) vectors, but it takes an image."""

    def __init__(self, patch: int = 4, c: int = 16) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, c)
        self.blocks = nn.Sequential(VecBlock(c), VecBlock(c))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        tokens = nn.functional.unfold(img, self.patch, stride=self.patch).transpose(1, 2)
        return self.blocks(self.embed(tokens))


def test_the_image_is_tried_after_the_first_layer_candidates() -> None:
    torch.manual_seed(0)
    model = LinearPatches()
    report = inject(model, 0.1)
    assert len(report.sites) == 2
    assert report.example is not None and report.example.source == "default image"
    assert report.example.describe() == "2x3x224x224 float32"


def test_the_image_is_the_last_input_tried() -> None:
    class Picky(nn.Module):  # runs on nothing: the error lists the image last
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Linear(48, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("never")

    with pytest.raises(ProbeError) as info:
        find_sites(Picky())
    tried = str(info.value)
    assert tried.index("2x48 float32") < tried.index("2x3x224x224 float32 [default image]")
