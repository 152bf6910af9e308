"""transformers as a zoo, text and speech: one tiny-config model of every family in
``hf_text_families.json`` (decoder-only, encoders, encoder-decoders, speech), on whichever
transformers is installed (CI runs the newest 5.x and the last 4.x).

Per family (marker ``zoo``), with no example input anywhere:

- the input is inferred from the config (``input_ids``, plus ``decoder_input_ids`` for an
  encoder-decoder; ``input_features`` of ``num_mel_bins`` x ``2 * max_source_positions`` for
  Whisper; ``input_values`` for speech);
- ``find_sites`` finds the residual additions counted by hand from the modeling code
  (``sites``, with a note saying where they are); position-embedding sums are not among
  them; ``fused`` of them go through dpatch's fused op and ``skippable`` can skip compute
  (a number, or one per transformers major version where the two differ);
- ``inject``: state_dict unchanged, eval output bit-identical, train output at rate 0
  bit-identical (``helpers.check_invariants``, on the first output: logits or
  ``last_hidden_state``); ``inspect`` lists the same sites; ``dpatch.verify`` passes;
- generative families: greedy ``generate()`` (KV cache on) gives the same tokens before and
  after ``inject``, in eval.

A family whose class the installed transformers lacks is skipped with one line naming it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import check_invariants
from torch import nn

import dpatch
from dpatch import find_sites, inject
from dpatch.analysis import probe

transformers = pytest.importorskip("transformers")

FAMILIES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "hf_text_families.json").read_text()
)
IDS = [f["family"] for f in FAMILIES]
MAJOR = transformers.__version__.split(".", 1)[0]
RATE = 0.2


def build(fam: dict[str, Any]) -> nn.Module:
    cls = getattr(transformers, fam["class"], None)
    if cls is None:
        pytest.skip(
            f"{fam['family']}: transformers {transformers.__version__} has no {fam['class']}"
        )
    torch.manual_seed(0)
    return cls(cls.config_class(**fam["config"])).eval()


def real_inputs(model: nn.Module, seed: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Random values shaped like the input dpatch inferred (ids below the vocabulary)."""
    example = probe(model).example
    assert example is not None
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)

    def real(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if v.is_floating_point():
            return torch.randn(v.shape, generator=g)
        return torch.randint(3, max(vocab, 4), v.shape, generator=g)

    return tuple(real(v) for v in example.values), {k: real(v) for k, v in example.kwargs.items()}


class FirstOutput(nn.Module):
    """Calls a transformers model with keyword inputs; returns its first output tensor."""

    def __init__(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, *args: Any) -> torch.Tensor:
        out = self.model(*args, **self.kwargs)
        first = out if isinstance(out, torch.Tensor) else out[0]
        assert isinstance(first, torch.Tensor)
        return first


def expected_skippable(fam: dict[str, Any]) -> int:
    value = fam["skippable"]
    return int(value[MAJOR]) if isinstance(value, dict) else int(value)


# --------------------------------------------------------------------------- sweeps
@pytest.mark.zoo
@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_text_family(fam: dict[str, Any]) -> None:
    model = build(fam)
    example = probe(model).example
    assert example is not None and example.source.startswith("transformers config")
    if fam["kind"] == "encoder-decoder":
        assert "decoder_input_ids" in example.kwargs
    sites = find_sites(model)
    assert len(sites) == fam["sites"], [s.name for s in sites]
    assert all(s.kind == "graph" and s.residual for s in sites)

    args, kwargs = real_inputs(model)
    wrapped = FirstOutput(model, kwargs)
    reports: list[dpatch.PatchReport] = []
    problems = list(
        check_invariants(
            wrapped, args, lambda w: reports.append(inject(model.eval(), RATE, skip=True))
        )
    )
    assert problems == []
    report = reports[0]
    assert [s.name for s in report.sites] == [s.name for s in sites]
    fused = [s.name for s in report.sites if s.fused]
    assert len(fused) == fam["fused"], [(s.path, s.reason) for s in report.skipped]
    assert sum(s.skip for s in report.sites) == expected_skippable(fam)

    model.eval()
    seen = dpatch.inspect(model)
    assert [(s.name, s.fused) for s in seen.sites] == [(s.name, s.fused) for s in report.sites]
    checked = dpatch.verify(model)
    assert checked.ok, [f"{f.code} {f.where}: {f.message}" for f in checked.findings]


GENERATIVE = [f for f in FAMILIES if f["kind"] in ("decoder", "encoder-decoder")]


@pytest.mark.zoo
@pytest.mark.parametrize("fam", GENERATIVE, ids=[f["family"] for f in GENERATIVE])
def test_greedy_generation_is_unchanged(fam: dict[str, Any]) -> None:
    model = build(fam)
    args, _ = real_inputs(model, seed=1)
    prompt = args[0] if fam["family"] == "whisper" else args[0][:, :5]
    reference = copy.deepcopy(model)
    inject(model, RATE)
    assert any(s.fused for s in dpatch.inspect(model).sites)
    settings = {"max_new_tokens": 4, "do_sample": False, "use_cache": True}
    with torch.no_grad():
        want = reference.generate(prompt, **settings)
        got = model.generate(prompt, **settings)
        # and with an attention mask given, as tokenizers give one
        mask = {} if fam["family"] == "whisper" else {"attention_mask": torch.ones_like(prompt)}
        assert torch.equal(model.generate(prompt, **mask, **settings), want)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- pruning
TINY_LLAMA = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_prune_llama_decoder_layers() -> None:
    """A pruned decoder layer returns its input: the model equals one whose last layer is an
    identity, and the layer's weights are what files leave out."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_LLAMA)
    model = transformers.LlamaForCausalLM(config).eval()
    reference = copy.deepcopy(model)
    last = reference.model.layers[-1]
    last.register_forward_hook(lambda mod, args, out: args[0])  # the layer as an identity
    report = dpatch.prune(model, count=2)
    assert [s.name for s in report.sites if s.pruned] == [
        "model.layers.2.drop_path1",
        "model.layers.2.drop_path2",
    ]
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert set(dpatch.depth.unused_state_keys(model)) == {
        k for k in model.state_dict() if k.startswith("model.layers.2.")
    }


@pytest.mark.zoo
@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_prune_every_family(fam: dict[str, Any]) -> None:
    """``prune`` on every family: the two highest-rate sites (the deepest layer's branches)
    are pruned, the model still runs in eval, its output changes (something was removed),
    and the weights files leave out are exactly those of the pruned branches. Where the
    table says so, pruning is refused with a one-line reason (the model is left as it was),
    or files keep the weights (``prune: weights_kept``, with the reason)."""
    model = build(fam)
    args, kwargs = real_inputs(model)
    with torch.no_grad():
        before = FirstOutput(model, kwargs)(*args)
    expect = fam.get("prune", {})
    if "refused" in expect:
        with pytest.raises(dpatch.UnsupportedSiteError, match=expect["refused"]):
            dpatch.prune(model, count=2)
        with torch.no_grad():
            assert torch.equal(FirstOutput(model.eval(), kwargs)(*args), before)
        return
    report = dpatch.prune(model, count=2)
    pruned = [s for s in report.sites if s.pruned]
    assert len(pruned) == 2, [(s.name, s.rate) for s in report.sites]
    model.eval()
    with torch.no_grad():
        after = FirstOutput(model, kwargs)(*args)
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.equal(after, before)
    unused = dpatch.depth.unused_state_keys(model)
    if "weights_kept" in expect:
        assert unused == ()
        return
    assert unused, "pruned branches hold no weights"
    assert all(any(k.startswith(s.path + ".") for s in pruned) for k in unused), unused
