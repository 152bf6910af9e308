"""Whole layers: grouping sites into layers, angular distance and Block Influence against
their formulas, pruning whole layers, and removing them from a transformers model so
``from_pretrained`` loads it without dpatch."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import ProjRes
from torch import nn

import dpatch
from dpatch.depth import (
    find_layers,
    prune,
    prune_order,
    remove_layers,
    sensitivity,
    suggest_rates,
    without_pruned_layers,
)
from dpatch.errors import InvalidValueError, OutputError, UnsupportedSiteError
from dpatch.files import save_pretrained
from dpatch.marks import block_meta

transformers = pytest.importorskip("transformers")


class Block(nn.Module):
    """A pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Embedding, N pre-norm blocks, a final norm and an LM head."""

    def __init__(self, vocab: int = 50, d: int = 16, n: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def tiny_lm(n: int = 4) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(n=n).eval()


def ids(n: int = 6, t: int = 10, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "vocab_size": 99,
    "max_position_embeddings": 64,
}


def prelayernorm() -> nn.Module:
    """A BERT-architecture masked LM with pre-norm layers (sites work today)."""
    torch.manual_seed(0)
    cfg = transformers.RobertaPreLayerNormConfig(**SMALL)
    return transformers.RobertaPreLayerNormForMaskedLM(cfg).eval()


def bert() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(**SMALL)).eval()


def hidden_states(model: TinyLM, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        h = [model.embed(x)]
        for b in model.blocks:
            h.append(b(h[-1]))
    return h


# --------------------------------------------------------------------------- layers
def test_layers_group_branches_by_their_layer_module() -> None:
    lm = find_layers(tiny_lm(), (ids(),))
    assert [layer.path for layer in lm] == [f"blocks.{i}" for i in range(4)]
    assert lm[1].sites == ("blocks.1.drop_path1", "blocks.1.drop_path2") and lm[1].index == 1
    # BERT: one layer holds two blocks (its attention.output and output modules add)
    layers = find_layers(bert())
    assert [layer.path for layer in layers] == [f"bert.encoder.layer.{i}" for i in range(4)]
    assert layers[2].blocks == (4, 5) and layers[2].sites == (
        "bert.encoder.layer.2.attention.output.drop_path",
        "bert.encoder.layer.2.output.drop_path",
    )
    resnet = find_layers(torchvision.models.resnet18())
    assert [layer.path for layer in resnet][:3] == ["layer1.0", "layer1.1", "layer2.0"]
    assert all(len(layer.sites) == 1 for layer in resnet) and len(resnet) == 8


def test_angular_and_bi_follow_their_formulas_in_one_pass() -> None:
    """Gromov et al.: arccos(cos(x_l, x_l+1)) / pi; ShortGPT: 1 - cos; per token, mean."""
    model, x = tiny_lm(), ids(7)
    h = hidden_states(model, x)
    calls: list[int] = []
    # real passes only (the meta-device probe that finds the layers costs nothing)
    model.register_forward_pre_hook(lambda m, a: calls.append(1) if not a[0].is_meta else None)
    seen: list[tuple[int, int]] = []
    got = {
        m: sensitivity(model, x, metric=m, batch_size=3, progress=lambda d, t: seen.append((d, t)))
        for m in ("angular", "bi")
    }
    assert len(calls) == 2 * 3  # 7 inputs in batches of 3: one pass over the data per metric
    assert seen == [(1, 3), (2, 3), (3, 3)] * 2
    for i in range(4):
        cos = F.cosine_similarity(h[i].double(), h[i + 1].double(), dim=-1)
        want = {
            "angular": float((torch.arccos(cos) / math.pi).mean()),
            "bi": float((1 - cos).mean()),
        }
        for m in ("angular", "bi"):
            assert got[m].scores[f"blocks.{i}"] == pytest.approx(want[m], rel=1e-5)
    r = got["bi"]
    assert r.per == "layer" and r.metric == "bi" and r.sites == () and r.samples == 7
    doc = r.to_dict()
    assert doc["per"] == "layer" and doc["layers"][0]["sites"] == list(r.layers[0].layer.sites)
    assert model.training is False and all(not m.training for m in model.modules())


def test_a_layer_that_changes_nothing_scores_zero() -> None:
    model = tiny_lm()
    for p in (model.blocks[2].attn, model.blocks[2].mlp[2]):
        nn.init.zeros_(p.weight)
        nn.init.zeros_(p.bias)
    for metric in ("angular", "bi"):
        score = sensitivity(model, ids(), metric=metric).scores["blocks.2"]
        assert abs(score) < 1e-7, (metric, score)


def test_feature_maps_compare_channel_vectors() -> None:
    """(B, C, H, W): one C-vector per position, as a token."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    block = model.layer2[1]
    seen: dict[str, torch.Tensor] = {}
    block.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    report = sensitivity(model, x, metric="bi")
    cos = F.cosine_similarity(seen["x"].double(), seen["y"].double(), dim=1)
    assert report.scores["layer2.1"] == pytest.approx(float((1 - cos).mean()), rel=1e-6)
    assert len(report.layers) == 8


def test_a_layer_off_the_residual_stream_is_not_measured() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ModuleList([ProjRes(8, 12)])[0], nn.Linear(12, 2))
    report = sensitivity(model, torch.randn(4, 8), metric="angular")
    (entry,) = report.layers
    assert entry.score is None and "is not its input's hidden state" in entry.reason
    assert report.scores == {}


def test_bad_metric_and_layer_reports_for_rates() -> None:
    with pytest.raises(InvalidValueError, match="unknown metric 'cka'; choose one of: loss"):
        sensitivity(tiny_lm(), ids(), metric="cka")
    report = sensitivity(tiny_lm(), ids(), metric="bi")
    with pytest.raises(InvalidValueError, match="per-branch scores"):
        suggest_rates(report, 0.2)
    loss = sensitivity(tiny_lm(), ids())  # the default stays per branch
    assert loss.per == "branch" and loss.metric == "rel_l2" and len(loss.scores) == 8


# --------------------------------------------------------------------------- pruning
def test_prune_by_bi_removes_the_lowest_layers_whole() -> None:
    model, x = tiny_lm(), ids()
    report = sensitivity(model, x, metric="bi")
    lowest = sorted(report.scores, key=report.scores.__getitem__)[:2]
    pruned = prune(model, count=2, by="bi", scores=report, inplace=False)
    assert sorted(pruned.changed) == sorted(f"{p}.drop_path{i}" for p in lowest for i in (1, 2))
    assert {s.name for s in pruned.sites if s.pruned} == set(pruned.changed)
    plain = tiny_lm()
    plain.blocks = nn.ModuleList(
        [b for i, b in enumerate(plain.blocks) if f"blocks.{i}" not in lowest]
    )
    assert pruned.model is not None
    with torch.no_grad():
        assert torch.equal(pruned.model.eval()(x), plain(x))
    # keep: the two highest stay; a mapping of layer paths works as a report does
    kept = prune(model, keep=2, by="sensitivity", scores=report.scores, inplace=False)
    assert sorted(kept.changed) == sorted(pruned.changed)


def test_prune_layer_ties_go_deeper_and_unscored_layers_stay() -> None:
    scores = {"blocks.0": 0.5, "blocks.1": 0.1, "blocks.2": 0.1}
    report = prune(tiny_lm(), count=2, by="angular", scores=scores, inplace=False)
    assert {n.rsplit(".", 1)[0] for n in report.changed} == {"blocks.1", "blocks.2"}
    with pytest.raises(InvalidValueError, match="the scores rank 3 of the model's 4 layers"):
        prune(tiny_lm(), count=4, by="angular", scores=scores)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 5, "by": "bi", "scores": "report"}, "cannot prune 5 layers"),
        ({"keep": 5, "by": "bi", "scores": "report"}, "cannot keep 5 layers"),
        ({"count": 1, "by": "bi"}, "needs the layers' scores"),
        ({"count": 1, "by": "angular", "scores": "report"}, "are 'bi' scores"),
        ({"count": 1, "by": "bi", "scores": {"blocks.0.drop_path1": 1.0}}, "name branches"),
        ({"count": 1, "by": "bi", "scores": {"layers.9": 1.0}}, "1 layer(s) this model lacks"),
    ],
)
def test_prune_layer_errors_change_nothing(kwargs: dict, message: str) -> None:
    model = tiny_lm()
    if kwargs.get("scores") == "report":
        kwargs["scores"] = sensitivity(model, ids(), metric="bi")
    with pytest.raises(InvalidValueError) as info:
        prune(model, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not any(s.pruned for s in dpatch.find_sites(model))


def test_prune_order_sends_layer_metrics_to_prune() -> None:
    with pytest.raises(InvalidValueError, match="needs the model"):
        prune_order(dpatch.find_sites(tiny_lm()), "bi", {"blocks.0": 1.0})


# --------------------------------------------------------------------------- removing
def test_remove_layers_updates_count_lists_and_indices_and_generates() -> None:
    """A Qwen2 decoder (transformers' per-layer layer_types, layer_idx for the KV cache)
    loses its layer 1 of 3: the config, the list and the indices follow, and generate()
    with its cache gives what the model run without cache gives."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=37, vocab_size=99, max_position_embeddings=64,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        use_sliding_window=True, sliding_window=8,
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    kept = [model.model.layers[0], model.model.layers[2]]
    (change,) = remove_layers(model, ["model.layers.1"])
    assert list(model.model.layers) == kept
    assert (change.container, change.removed, change.before, change.after) == (
        "model.layers", (1,), 3, 2
    )  # fmt: skip
    assert model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["full_attention", "full_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    old = ["full_attention", "sliding_attention", "full_attention"]
    assert ("layer_types", old, ["full_attention", "full_attention"]) in change.config
    prompt = torch.tensor([[5, 7, 9, 11]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        again = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(out, again) and out.shape == (1, 9)


def test_per_layer_config_lists() -> None:
    cfg = SimpleNamespace(
        num_hidden_layers=4,
        layer_types=["a", "b", "c", "d"],
        mlp_only_layers=[1, 3],
        every_layer=[0, 1, 2, 3],
        hidden_sizes=[1, 2, 3, 4],
        out_indices=[0, 1, 2, 3],
    )
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])
    model.config = cfg
    remove_layers(model, ["layers.1"])
    assert cfg.num_hidden_layers == 3 and len(model.layers) == 3
    assert cfg.layer_types == ["a", "c", "d"]
    assert cfg.mlp_only_layers == [2]  # layer 3 is now layer 2; layer 1 is gone
    assert cfg.every_layer == [0, 1, 2]
    # lists not named after layers are not layer lists, whatever their length
    assert cfg.hidden_sizes == [1, 2, 3, 4] and cfg.out_indices == [0, 1, 2, 3]
    with pytest.raises(InvalidValueError, match="not an item of a layer list"):
        remove_layers(model, ["config"])
    with pytest.raises(InvalidValueError, match="leaves no model"):
        remove_layers(model, ["layers.0", "layers.1", "layers.2"])
    odd = nn.Module()
    odd.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
    odd.config = SimpleNamespace(encoder_layers=2, decoder_layers=2)
    with pytest.raises(InvalidValueError, match="cannot tell which config entry"):
        remove_layers(odd, ["layers.0"])


def test_encoder_and_decoder_counts_are_told_apart() -> None:
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
    model.config = SimpleNamespace(encoder_layers=2, decoder_layers=2)
    remove_layers(model, ["encoder.layers.1"])
    assert (model.config.encoder_layers, model.config.decoder_layers) == (1, 2)


def _pruned_prelayernorm(count: int = 2) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    model, x = prelayernorm(), ids(4, 10, vocab=99)
    report = prune(model, count=count, by="bi", scores=sensitivity(model, x, metric="bi"),
                   inplace=False)  # fmt: skip
    assert report.model is not None
    return model, report.model.eval(), x


def test_save_pretrained_loads_without_dpatch_and_computes_the_same(tmp_path: Path) -> None:
    model, pruned, x = _pruned_prelayernorm()
    export = save_pretrained(pruned, tmp_path / "out")
    gone = [layer.path for layer in export.plain.removed]
    assert len(gone) == 2 and all(p.startswith("roberta_prelayernorm.encoder.layer.") for p in gone)
    back = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is transformers.RobertaPreLayerNormForMaskedLM
    assert not any(block_meta(m) for m in back.modules())
    assert back.config.num_hidden_layers == 2 and len(back.roberta_prelayernorm.encoder.layer) == 2
    with torch.no_grad():
        assert torch.equal(back(x).logits, pruned(x).logits)
    # the kept layers' weights moved up: new layer 0 is the first kept one
    first = min(i for i in range(4) if f"roberta_prelayernorm.encoder.layer.{i}" not in gone)
    assert torch.equal(
        back.roberta_prelayernorm.encoder.layer[0].intermediate.dense.weight,
        model.roberta_prelayernorm.encoder.layer[first].intermediate.dense.weight,
    )
    assert not any(s.pruned for s in dpatch.find_sites(model))  # the input model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    # the folder gets mkdir's mode (mkdtemp made it 0o700)
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask


def test_save_pretrained_refuses_what_a_plain_model_cannot_hold(tmp_path: Path) -> None:
    # post-norm BERT: a layer with both branches pruned still applies its LayerNorms
    model = bert()
    report = prune(model, count=1, by="bi", scores=sensitivity(model, ids(2, 8, 99), metric="bi"),
                   inplace=False)  # fmt: skip
    with pytest.raises(UnsupportedSiteError, match="post-norm layer such as BERT's"):
        save_pretrained(report.model, tmp_path / "bert")
    # one branch of a layer: not a whole layer
    half = prune(prelayernorm(), ["roberta_prelayernorm.encoder.layer.1.output.drop_path"],
                 inplace=False)  # fmt: skip
    with pytest.raises(UnsupportedSiteError, match="not the rest of its layer"):
        save_pretrained(half.model, tmp_path / "half")
    with pytest.raises(InvalidValueError, match="not a transformers model"):
        save_pretrained(tiny_lm(), tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


def test_save_pretrained_output_rules(tmp_path: Path) -> None:
    _, pruned, _ = _pruned_prelayernorm(1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for target, force, message in (
        ("mine", False, "pass --force"),
        ("mine", True, "not a save_pretrained directory"),
        ("nofolder/out", False, "does not exist"),
    ):
        with pytest.raises(OutputError, match=message):
            save_pretrained(pruned, tmp_path / target, force=force)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    save_pretrained(pruned, tmp_path / "out")
    (tmp_path / "out" / "extra.txt").write_text("old")
    save_pretrained(pruned, tmp_path / "out", force=True)  # a save_pretrained dir: replaced
    assert not (tmp_path / "out" / "extra.txt").exists()
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out")
    with pytest.raises(OutputError, match="the directory the model was loaded from"):
        save_pretrained(loaded, tmp_path / "out", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_without_pruned_layers_shares_tensors_and_leaves_the_model() -> None:
    _, pruned, _ = _pruned_prelayernorm()
    plain = without_pruned_layers(pruned)
    shared = {p.data_ptr() for p in pruned.parameters()}
    assert all(p.data_ptr() in shared for p in plain.model.parameters())
    assert pruned.config.num_hidden_layers == 4 and plain.model.config.num_hidden_layers == 2
    assert len(pruned.roberta_prelayernorm.encoder.layer) == 4


def test_llama_pruned_directory_loads_and_generates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=37, vocab_size=99, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = ids(4, 10, vocab=99)
    report = prune(model, count=2, by="angular", scores=sensitivity(model, x, metric="angular"),
                   inplace=False)  # fmt: skip
    save_pretrained(report.model, tmp_path / "llama")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert back.config.num_hidden_layers == 2 and len(back.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in back.model.layers] == [0, 1]
    with torch.no_grad():
        assert torch.allclose(back(x).logits, report.model.eval()(x).logits, atol=1e-6)
        prompt = x[:1, :4]
        cached = back.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        plain = back.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
