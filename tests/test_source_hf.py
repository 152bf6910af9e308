"""transformers' constructs, written by hand (no transformers needed): ``**kwargs`` forwards
that write into their kwargs dictionary, ``(cos, sin)`` tuple arguments, cache objects, a
child returning a tuple, decorators that change behaviour (``@deprecate_kwarg``-like),
transformers 5's ``GradientCheckpointingLayer`` (its ``__init_subclass__`` wraps every
subclass's forward) and 4.x's (it overrides ``__call__``), residual sums written in a helper
function (Falcon's ``dropout_add``), arguments a plain trace would have to specialise, and
pruning such blocks at source level."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from helpers import check_invariants, mlp
from torch import nn

import dpatch
from dpatch import find_sites, inject
from dpatch.analysis import wrapper_names
from dpatch.marks import block_meta

C = 8


class FakeCache:
    """Stands for transformers' ``Cache``: an object torch.fx has no node for, which the
    attention writes into."""

    def __init__(self) -> None:
        self.updates = 0

    def update(self, key: torch.Tensor) -> torch.Tensor:
        self.updates += 1
        return key


class RotaryAttention(nn.Module):
    """Takes ``position_embeddings=(cos, sin)`` and a cache; returns ``(output, weights)``."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(C, C)
        self.o = nn.Linear(C, C)

    def forward(
        self,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: FakeCache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        cos, sin = position_embeddings
        q = self.q(hidden) * cos + self.q(hidden).flip(-1) * sin
        if cache is not None:
            q = cache.update(q)
        if kwargs.get("seen_mask") is not None:
            q = q + kwargs["seen_mask"]
        return self.o(q), None


def renames(old: str, new: str):  # type: ignore[no-untyped-def]
    """Stands for transformers' ``@deprecate_kwarg``: renames a keyword argument."""

    def decorator(fn):  # type: ignore[no-untyped-def]
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapped

    return decorator


class CheckpointingLayer(nn.Module):
    """transformers 5's ``GradientCheckpointingLayer``: every subclass's forward is wrapped
    when the subclass is made."""

    gradient_checkpointing = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        forward = cls.forward

        @functools.wraps(forward)
        def forward_with_checkpointing(self: nn.Module, *args: Any, **kw: Any) -> Any:
            if self.gradient_checkpointing and self.training:
                part = functools.partial(forward, self, **kw)
                return torch.utils.checkpoint.checkpoint(part, *args, use_reentrant=False)
            return forward(self, *args, **kw)

        cls.forward = forward_with_checkpointing  # type: ignore[method-assign]


class CallOverrideLayer(nn.Module):
    """transformers 4.x's ``GradientCheckpointingLayer``: ``__call__`` is overridden."""

    gradient_checkpointing = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.gradient_checkpointing and self.training:
            part = functools.partial(super().__call__, **kwargs)
            return torch.utils.checkpoint.checkpoint(part, *args, use_reentrant=False)
        return super().__call__(*args, **kwargs)


class DecoderLayer(CheckpointingLayer):
    """A Llama decoder layer as transformers 5 writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(C)
        self.attn = RotaryAttention()
        self.post_norm = nn.LayerNorm(C)
        self.mlp = mlp(C)

    @renames("past_key_value", "cache")
    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: FakeCache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        kwargs["seen_mask"] = attention_mask  # writes into its kwargs dictionary
        residual = hidden
        hidden = self.input_norm(hidden)
        hidden, _ = self.attn(hidden, position_embeddings, cache=cache, **kwargs)
        hidden = residual + hidden
        residual = hidden
        hidden = self.post_norm(hidden)
        hidden = self.mlp(hidden)
        hidden = residual + hidden
        return hidden


class OldDecoderLayer(CallOverrideLayer):
    """The same layer as transformers 4.x writes it: a tuple out, a flag that branches."""

    def __init__(self) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(C)
        self.attn = RotaryAttention()
        self.mlp = mlp(C)

    def forward(
        self,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        output_attentions: bool = False,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        attn_outputs = self.attn(self.input_norm(hidden), position_embeddings)
        if type(attn_outputs) is not tuple:  # DistilBERT checks this
            raise TypeError("attention output must be a tuple")
        hidden = hidden + attn_outputs[0]
        hidden = hidden + self.mlp(hidden)
        outputs: tuple[torch.Tensor, ...] = (hidden,)
        if output_attentions:  # a plain trace would specialise the flag
            outputs += (hidden.mean(-1),)
        if use_cache:
            outputs += (hidden.sum(-1),)
        return outputs


class Decoder(nn.Module):
    def __init__(self, layer: type[nn.Module] = DecoderLayer, n: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([layer() for _ in range(n)])

    def forward(self, x: torch.Tensor, cache: FakeCache | None = None, **kwargs: Any) -> Any:
        cos, sin = torch.cos(x), torch.sin(x)
        for layer in self.layers:
            if isinstance(layer, DecoderLayer):
                x = layer(x, attention_mask=None, cache=cache, position_embeddings=(cos, sin))
            else:
                x = layer(x, (cos, sin), **kwargs)[0]
        return x


def _sites_fused(report: dpatch.PatchReport) -> list[tuple[str, bool]]:
    return [(s.name, s.fused) for s in report.sites]


def test_transformers5_decoder_layer_is_rewritten_with_its_wrappers() -> None:
    torch.manual_seed(0)
    model = Decoder().eval()
    x = torch.randn(2, 5, C)
    before = wrapper_names(DecoderLayer.forward)
    problems = list(check_invariants(model, x, lambda m: inject(m, 0.2)))
    assert problems == []
    report = dpatch.inspect(model)
    assert _sites_fused(report) == [
        ("layers.0.drop_path1", True),
        ("layers.0.drop_path2", True),
        ("layers.1.drop_path1", True),
        ("layers.1.drop_path2", True),
    ]
    layer = model.layers[0]
    # the checkpointing wrapper, then the decorator, around the rewritten forward
    assert wrapper_names(type(layer).forward) == before
    assert before == ["CheckpointingLayer.__init_subclass__", "renames"]
    src = block_meta(layer).code.functions[0][1]  # type: ignore[union-attr]
    assert src.startswith("@renames('past_key_value', 'cache')\ndef forward(")
    assert "hidden = self.drop_path1(hidden, residual)" in src


def test_transformers5_layer_keeps_decorator_cache_and_checkpointing_behaviour() -> None:
    torch.manual_seed(0)
    ref_model = Decoder().eval()
    model = Decoder().eval()
    model.load_state_dict(ref_model.state_dict())
    inject(model, 0.2, example_inputs=(torch.randn(2, 5, C),))
    x = torch.randn(3, 7, C)
    mask = torch.randn(3, 7, C)
    with torch.no_grad():
        for layer_ref, layer in zip(ref_model.layers, model.layers, strict=True):
            cos, sin = torch.cos(x), torch.sin(x)
            for kwargs in ({}, {"attention_mask": mask}, {"past_key_value": FakeCache()}):
                a = layer_ref(x, position_embeddings=(cos, sin), **kwargs)
                b = layer(x, position_embeddings=(cos, sin), **kwargs)
                assert torch.equal(a, b), kwargs
    cache = FakeCache()
    with torch.no_grad():
        model(x, cache=cache)
    assert cache.updates == 2  # the cache went through, as it does unpatched
    # gradient checkpointing still wraps the rewritten forward
    model.train()
    for layer in model.layers:
        layer.gradient_checkpointing = True
    out = model(x.requires_grad_())
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_transformers4_layer_with_call_override_tuple_check_and_flags() -> None:
    torch.manual_seed(0)
    model = Decoder(OldDecoderLayer).eval()
    x = torch.randn(2, 5, C)
    problems = list(check_invariants(model, x, lambda m: inject(m, 0.2)))
    assert problems == []
    assert all(fused for _, fused in _sites_fused(dpatch.inspect(model)))
    ref = Decoder(OldDecoderLayer).eval()
    ref.load_state_dict(model.state_dict(), strict=False)
    cos, sin = torch.cos(x), torch.sin(x)
    with torch.no_grad():
        for flags in ({}, {"output_attentions": True}, {"use_cache": True}):
            # the flags were recorded False: the source rewrite keeps both paths
            got = model.layers[0](x, (cos, sin), **flags)
            want = ref.layers[0](x, (cos, sin), **flags)
            assert len(got) == len(want) and all(
                torch.equal(a, b) for a, b in zip(got, want, strict=True)
            )


def test_prune_a_source_level_decoder_layer() -> None:
    torch.manual_seed(0)
    model = Decoder().eval()
    x = torch.randn(2, 5, C)
    ref_first = model.layers[0](x, position_embeddings=(torch.cos(x), torch.sin(x)))
    report = dpatch.prune(model, count=2, by="depth", example_inputs=(x,))
    assert [s.name for s in report.sites if s.pruned] == [
        "layers.1.drop_path1",
        "layers.1.drop_path2",
    ]
    calls: list[str] = []
    for name in ("attn", "mlp", "input_norm", "post_norm"):
        model.layers[1].get_submodule(name).register_forward_hook(
            lambda *_, n=name: calls.append(n)
        )
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, ref_first.detach())  # the last layer returns its input
    assert calls == []  # and never computes its branches
    meta = block_meta(model.layers[1])
    assert meta is not None
    assert {s.attr: s.dropped for s in meta.sites} == {
        "drop_path1": ("attn", "input_norm"),
        "drop_path2": ("mlp", "post_norm"),
    }
    assert set(dpatch.depth.unused_state_keys(model)) == {
        k for k in model.state_dict() if k.startswith("layers.1.")
    }


def test_prune_keeps_a_shortcut_copy_where_the_forward_writes_in_place() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = RotaryAttention()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pos = (torch.cos(x), torch.sin(x))
            h, _ = self.attn(x, pos)
            h = x + h
            h.mul_(2)
            return h

    torch.manual_seed(0)
    block = InPlace()
    x = torch.randn(2, 3, C)
    keep = x.clone()
    dpatch.prune(block, count=1, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(block(x), 2 * keep)
    assert torch.equal(x, keep)  # the input was not written into


class LookupSums(nn.Module):
    """Embeddings as BERT/BART write them: lookups of integer ids added together, then a
    learned positional convolution added back (wav2vec2: residual by the rules)."""

    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(16, C)
        self.position = nn.Embedding(16, C)
        self.token_type = nn.Embedding(2, C)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        embeds = self.word(ids) + self.token_type(torch.zeros_like(ids))
        return embeds + self.position(positions)


def test_sums_of_id_lookups_are_not_residual() -> None:
    ids = torch.randint(0, 16, (2, 6))
    assert find_sites(LookupSums(), (ids,), coverage="all") == []


def test_probe_in_training_prefers_evaluation_on_meta_to_a_real_run() -> None:
    class LayerDrop(nn.Module):
        """wav2vec2's encoder: LayerDrop draws on the host in training."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Decoder(n=1), Decoder(n=1)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                if self.training and bool(torch.rand([]) < 0.5):
                    continue
                x = layer(x)
            return x

    model = LayerDrop().train()
    for seed in range(4):
        torch.manual_seed(seed)
        assert len(find_sites(model, (torch.randn(2, 5, C),))) == 4


def test_swin_shifted_window_blocks_trace_on_every_transformers_version() -> None:
    """transformers 4.57's Swin fills its shifted-window mask by slice assignment (5.x
    computes it from ``arange``): with ``coverage="all"`` both branches of every block are
    sites on either version, the shifted blocks included."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                  num_heads=[2, 2], window_size=4)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SwinModel(cfg).eval()
    report = inject(model, 0.1, coverage="all")
    assert not report.skipped, report.skipped
    assert len(report.sites) == 8
    assert {s.path for s in report.sites} >= {"encoder.layers.0.blocks.1"}
