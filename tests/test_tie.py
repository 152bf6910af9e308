"""A layer as one unit (``tie="block"``): one decision per sample (or batch) for every
branch of a block, and with ``skip`` the whole layer run on the kept rows, every per-sample
argument (masks, position ids, rotary ``(cos, sin)``) gathered and shared ones passed as
they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cli
from torch import nn

import dpatch
from dpatch.errors import InvalidValueError
from dpatch.settings import Settings

D, T = 8, 5


class Marked(nn.Module):
    """A branch that adds a known constant: 1 (attention) or 100 (MLP), so an output row
    tells which branches ran on it."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.f = nn.Linear(D, D)
        nn.init.zeros_(self.f.weight)
        nn.init.constant_(self.f.bias, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


class DecoderLayer(nn.Module):
    """A pre-norm decoder layer taking per-sample and shared arguments the way transformers'
    layers do: an attention mask (B, 1, T, T), position ids (B, T), rotary ``(cos, sin)``
    of shape (B, T, D) or shared (1, T, D), and a shared ``cache_position`` (T,)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = Marked(1.0)
        self.mlp = Marked(100.0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = hidden_states.shape[0]
        assert attention_mask is None or attention_mask.shape[0] == b
        assert position_ids is None or position_ids.shape[0] in (1, b)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            assert cos.shape[0] in (1, b) and sin.shape == cos.shape
        assert cache_position is None or cache_position.shape == (T,)
        hidden_states = hidden_states + self.attn(hidden_states)
        return hidden_states + self.mlp(hidden_states)


class Decoder(nn.Module):
    def __init__(self, layers: int = 3, shared_rotary: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer() for _ in range(layers))
        self.shared_rotary = shared_rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        mask = torch.zeros(b, 1, T, T, device=x.device)
        ids = torch.arange(T, device=x.device).expand(b, T)
        rot = 1 if self.shared_rotary else b
        cos = torch.ones(rot, T, D, device=x.device)
        cache = torch.arange(T, device=x.device)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=ids, position_embeddings=(cos, cos),
                      cache_position=cache)  # fmt: skip
        return x


def _deltas(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the first layer added to each row (training mode)."""
    model.train()
    out = model.layers[0](x, attention_mask=torch.zeros(x.shape[0], 1, T, T),
                          position_ids=torch.arange(T).expand(x.shape[0], T),
                          position_embeddings=(torch.ones(x.shape[0], T, D),) * 2,
                          cache_position=torch.arange(T))  # fmt: skip
    return (out - x)[:, 0, 0].detach()


@pytest.mark.parametrize("skip", [False, True])
def test_the_branches_of_a_tied_block_drop_together(skip: bool) -> None:
    torch.manual_seed(0)
    model = Decoder()
    x = torch.zeros(64, T, D)
    report = dpatch.inject(model, 0.5, schedule="uniform", tie="block", skip=skip,
                           example_inputs=(x[:2],))  # fmt: skip
    assert {s.tie for s in report.sites} == {"block"} and len(report.sites) == 6
    assert not [s for s in report.skipped if "whole-layer" in s.reason]
    scale = 2.0  # 1 / (1 - 0.5), or B/k with k = 32 of 64
    deltas = _deltas(model, x)
    assert set(deltas.tolist()) <= {0.0, 101.0 * scale}, deltas
    assert (deltas == 0).any() and (deltas != 0).any()
    if skip:
        assert int((deltas != 0).sum()) == 32  # exactly k rows computed the layer


def test_untied_branches_drop_on_their_own() -> None:
    torch.manual_seed(0)
    model = Decoder()
    x = torch.zeros(64, T, D)
    dpatch.inject(model, 0.5, schedule="uniform", example_inputs=(x[:2],))
    deltas = set(_deltas(model, x).tolist())
    assert {2.0, 200.0} & deltas  # one branch kept without the other


def test_whole_layer_skip_gathers_per_sample_arguments_only() -> None:
    for shared in (False, True):
        torch.manual_seed(0)
        model = Decoder(shared_rotary=shared)
        x = torch.randn(6, T, D, requires_grad=True)
        dpatch.inject(model, 0.4, schedule="uniform", tie="block", skip=True,
                      example_inputs=(x[:2].detach(),))  # fmt: skip
        model.train()
        out = model(x)  # the layers assert every per-sample argument has the kept rows
        out.sum().backward()
        assert x.grad is not None and torch.all(x.grad != 0)  # every row reaches the loss
        assert all(p.grad is not None for p in model.parameters())


def test_dropped_rows_leave_the_layer_as_they_came() -> None:
    torch.manual_seed(1)
    model = Decoder(layers=1)
    x = torch.randn(10, T, D)
    dpatch.inject(model, 0.7, schedule="uniform", tie="block", skip=True, example_inputs=(x[:2],))
    model.train()
    with torch.no_grad():
        out = model(x)
    same = [bool(torch.equal(out[i], x[i])) for i in range(10)]
    assert sum(not s for s in same) == 3  # k = round(10 * 0.3)


def test_batch_mode_ties_one_host_decision_per_block() -> None:
    torch.manual_seed(0)
    model = Decoder()
    x = torch.zeros(4, T, D)
    dpatch.inject(model, 0.5, schedule="uniform", mode="batch", tie="block", seed=3,
                  example_inputs=(x[:2],))  # fmt: skip
    seen = set()
    for _ in range(20):
        deltas = _deltas(model, x)
        assert len(set(deltas.tolist())) == 1  # the whole batch alike
        seen.add(float(deltas[0]))
    assert seen == {0.0, 202.0}


def test_tie_needs_per_block_and_checks_its_choices() -> None:
    with pytest.raises(InvalidValueError, match="per='block'"):
        Settings(tie="block", per="branch")
    with pytest.raises(InvalidValueError, match="unknown tie 'layer'"):
        Settings(tie="layer")


def test_retune_keeps_ties_strip_and_untie_remove_the_hooks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Decoder()
    x = torch.zeros(2, T, D)
    dpatch.inject(model, 0.3, tie="block", example_inputs=(x,))
    assert {s.tie for s in dpatch.retune(model, 0.5, example_inputs=(x,)).sites} == {"block"}
    out = dpatch.save(model, tmp_path / "tied.safetensors")
    manifest = dpatch.files.read_manifest(out)
    assert manifest is not None and {s["tie"] for s in manifest["sites"]} == {"block"}
    loaded = dpatch.load(out, model=Decoder())
    assert {s.tie for s in dpatch.inspect(loaded, (x,)).sites} == {"block"}
    dpatch.inject(model, 0.3, example_inputs=(x,))  # tie='branch', the default
    assert all(not layer._forward_pre_hooks for layer in model.layers)
    dpatch.inject(model, 0.3, tie="block", example_inputs=(x,))
    dpatch.strip(model)
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in model.layers)


def test_a_copy_of_a_tied_model_unties_its_own_hooks() -> None:
    import copy

    torch.manual_seed(0)
    model = Decoder()
    x = torch.zeros(2, T, D)
    dpatch.inject(model, 0.3, tie="block", example_inputs=(x,))
    twin = copy.deepcopy(model)
    dpatch.inject(twin, 0.3, example_inputs=(x,))
    assert all(not layer._forward_pre_hooks for layer in twin.layers)
    assert all(layer._forward_pre_hooks for layer in model.layers)


FACTORY = """
import sys
sys.path.insert(0, {tests!r})
from test_tie import Decoder

def make():
    return Decoder()
"""


def test_cli_tie(tmp_path: Path) -> None:
    (tmp_path / "dec.py").write_text(FACTORY.format(tests=str(Path(__file__).parent)))
    code, out, err = cli("inject", "dec.py:make", "--tie", "block", "--skip", "--input-shape",
                         f"2,{T},{D}", "--json", cwd=tmp_path)  # fmt: skip
    assert code == 0, err
    assert {s["tie"] for s in json.loads(out)["sites"]} == {"block"}
    code, _, err = cli("inject", "dec.py:make", "--tie", "block", "--per", "branch", cwd=tmp_path)
    assert code == 1 and "per='block'" in err


def test_retune_keeps_the_whole_layer_skip() -> None:
    torch.manual_seed(0)
    model = Decoder(layers=1)
    x = torch.zeros(10, T, D)
    dpatch.inject(model, 0.5, schedule="uniform", tie="block", skip=True, example_inputs=(x[:2],))
    report = dpatch.retune(model, 0.7, example_inputs=(x[:2],))
    assert {(s.tie, s.skip) for s in report.sites} == {("block", True)}
    deltas = _deltas(model, x)
    assert int((deltas != 0).sum()) == 3  # k = round(10 * 0.3): the layer still skips


def _tiny_llama(layers: int = 3) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def test_llama_whole_layer_skip_runs_kept_rows_as_the_layer_would() -> None:
    """A real transformers Llama with a padding mask that differs per sample: with
    ``tie="block", skip=True`` (no rescaling, to compare values) a dropped sample leaves a
    layer as it came, and a kept sample leaves it exactly as the unpatched layer computes it
    on the whole batch: the mask, position ids and rotary (cos, sin) reached the layer
    gathered to the kept rows."""
    import copy

    reference = _tiny_llama()
    model = copy.deepcopy(reference)
    report = dpatch.inject(model, 0.5, schedule="uniform", tie="block", skip=True, scaling="none")
    assert {s.tie for s in report.sites} == {"block"} and len(report.sites) == 6
    ids = torch.randint(0, 50, (6, 9))
    mask = torch.ones(6, 9, dtype=torch.long)
    for row, pad in enumerate((0, 1, 2, 3, 4, 5)):
        mask[row, :pad] = 0  # left padding, a different amount per sample
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"ref": [], "patched": []}
    inputs: list[torch.Tensor] = []

    def record_input(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        # prepended: the layer's input before the tie gathers the kept rows
        inputs.append(kwargs.get("hidden_states", args[0] if args else None).detach().clone())

    def record(key: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            y = out[0] if isinstance(out, tuple) else out  # after the tie put the rows back
            seen[key].append((inputs.pop(), y.detach().clone()))

        return hook

    for key, m in (("ref", reference), ("patched", model)):
        for layer in m.model.layers:
            layer.register_forward_pre_hook(record_input, with_kwargs=True, prepend=True)
            layer.register_forward_hook(record(key), with_kwargs=True)
    model.train()
    torch.manual_seed(3)
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    dropped = kept = 0
    for x, y in seen["patched"]:
        # The unpatched layer on the same input, the whole batch, the same mask.
        seen["ref"].clear()
        with torch.no_grad():
            reference.model(inputs_embeds=x, attention_mask=mask)
        expected = seen["ref"][0][1]
        for row in range(6):
            if torch.equal(y[row], x[row]):
                dropped += 1
            else:
                kept += 1
                assert torch.allclose(y[row], expected[row], atol=1e-5), row
        break  # the first layer: its input is the embeddings, the reference's too
    assert dropped and kept
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
