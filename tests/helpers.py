"""Shared test helpers: toy models (every spelling of a residual, and non-residuals), running
models reproducibly, and the invariants every patch must keep."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from dpatch.cli import app


def mlp(c: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, c))


class PlainRes(nn.Module):
    """``x + f(x)``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.f = mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(self.norm(x))


class ProjRes(nn.Module):
    """ResNet style: ``relu(proj(x) + f(x))`` with a cheaper projection shortcut."""

    def __init__(self, cin: int = 8, cout: int = 12) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(cin, cout), nn.ReLU(), nn.Linear(cout, cout))
        self.proj = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.proj(x) + self.f(x))


class IAddRes(nn.Module):
    """``out = f(x); out += x``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.f = mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.f(x)
        out += x
        return out


class TorchAddRes(nn.Module):
    """``torch.add(x, f(x))``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.f = mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(x, self.f(x))


class MethodAddRes(nn.Module):
    """``f(x).add(x)`` (branch first) and then ``y.add_(g(y))`` in place."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.f = mlp(c)
        self.g = mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.f(x).add(x)
        return y.clone().add_(self.g(y))


class ScaledRes(nn.Module):
    """``x + gamma * f(x)`` (layer scale) and ``f(x) * 0.5 + x``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.f = mlp(c)
        self.g = mlp(c)
        self.gamma = nn.Parameter(torch.full((c,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma * self.f(x)
        return self.g(x) * 0.5 + x


class MulAddRes(nn.Module):
    """``out.mul_(alpha).add_(shortcut)`` and ``torch.add(x, f(x), alpha=0.2)``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.f = mlp(c)
        self.g = mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.f(x)
        x = out.mul_(0.7).add_(x)
        return torch.add(x, self.g(x), alpha=0.2)


class HFOutput(nn.Module):
    """Hugging Face ``ViTOutput``: the shortcut comes in as an argument."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dense = nn.Linear(c, c)

    def forward(self, hidden: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden) + input_tensor


class HFLayer(nn.Module):
    """Hugging Face ``ViTLayer``: attention residual here, MLP residual in ``output``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c)
        self.attn = nn.Linear(c, c)
        self.norm2 = nn.LayerNorm(c)
        self.intermediate = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU())
        self.output = HFOutput2(c)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attention_output = self.attn(self.norm1(hidden_states))
        hidden_states = attention_output + hidden_states
        layer_output = self.intermediate(self.norm2(hidden_states))
        return self.output(layer_output, hidden_states)


class HFOutput2(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dense = nn.Linear(2 * c, c)
        self.dropout = nn.Dropout(0.0)

    def forward(self, hidden: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.dense(hidden))
        return hidden + input_tensor


class NotResidual(nn.Module):
    """Additions that are not residual branches: position embedding, a bias, a tanh-GELU
    polynomial, and two parallel branches of equal weight (RepVGG-style)."""

    def __init__(self, c: int = 8, n: int = 4) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, n, c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.a = nn.Linear(c, c)
        self.b = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos
        x = x + self.bias
        x = 0.5 * x * (1 + torch.tanh(0.79788 * (x + 0.044715 * x**3)))
        return self.a(x) + self.b(x)


class Net(nn.Module):
    """Nested containers, a block reused twice, and non-residual adds at the top level."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = NotResidual(c)
        self.stage = nn.Sequential(PlainRes(c), nn.Sequential(IAddRes(c), TorchAddRes(c)))
        self.shared = PlainRes(c)
        self.blocks = nn.ModuleList([ScaledRes(c), MulAddRes(c), MethodAddRes(c), HFLayer(c)])
        self.head = ProjRes(c, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage(x)
        x = self.shared(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.shared(x)  # reused
        return self.head(x)


class TimmSlots(nn.Module):
    """A user's block wired with timm's DropPath (native slots)."""

    def __init__(self, c: int = 8, rate: float = 0.0) -> None:
        super().__init__()
        from timm.layers import DropPath as TimmDropPath

        self.f = mlp(c)
        self.g = mlp(c)
        self.drop_path1 = TimmDropPath(rate) if rate > 0 else nn.Identity()
        self.drop_path2 = TimmDropPath(rate) if rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.f(x))
        return x + self.drop_path2(self.g(x))


def example(batch: int = 4, n: int = 4, c: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, c, generator=g)


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict (to check a patch changed nothing)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(model: nn.Module, x: Any, *, train: bool, seed: int = 0) -> torch.Tensor:
    """Run ``model`` in train or eval mode with a fixed seed, restoring buffers after."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    if isinstance(out, dict):  # some torchvision models (GoogLeNet aux) return structures
        out = next(iter(out.values()))
    if isinstance(out, tuple | list):
        out = out[0]
    return out


def check_invariants(model: nn.Module, x: Any, patch: Callable[[nn.Module], Any]) -> Iterator[str]:
    """Patch ``model`` and yield a message for every broken invariant: state_dict keys and
    tensors, bit-identical eval output, bit-identical train output at rate 0."""
    run(model, x, train=False)  # warm-up: ConViT's first call differs from later ones
    before = snapshot(model)
    eval_ref = run(model, x, train=False)
    zero_native_rates(model)
    train_ref = run(model, x, train=True)
    patch(model)
    yield from state_changes(before, model.state_dict())
    if not torch.equal(run(model, x, train=False), eval_ref):
        yield "eval output differs"
    from dpatch import DropPath

    for m in model.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    if not torch.equal(run(model, x, train=True), train_ref):
        yield "train output at rate 0 differs"


def eval_outputs_equal(reference: nn.Module, patched: nn.Module, inputs: tuple[Any, ...]) -> str:
    """'' when ``patched`` in eval gives ``reference``'s eval output bit for bit (values,
    dtypes, shapes and strides of every tensor in the output), else what differs. Both run
    with the same seed (some models draw random numbers in eval), modes restored after."""
    outs = []
    for model in (reference, patched):
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        torch.manual_seed(0)
        try:
            with torch.no_grad():
                outs.append(("ok", model(*inputs)))
        except Exception as exc:  # the reference may not run: then neither may the patch
            outs.append(("error", type(exc).__name__))
        finally:
            for m, was in modes:
                m.training = was
    (kind_a, a), (kind_b, b) = outs
    if kind_a != kind_b or (kind_a == "error" and a != b):
        return f"reference gave {kind_a} {a if kind_a == 'error' else ''}, patched {kind_b} {b if kind_b == 'error' else ''}"
    return "" if kind_a == "error" else _differs(a, b, "output")


def _differs(a: Any, b: Any, where: str) -> str:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            return f"{where}: tensors differ"
        if a.numel() > 1 and a.stride() != b.stride():
            return f"{where}: strides {a.stride()} vs {b.stride()}"
        return ""
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return f"{where}: keys {list(a)} vs {list(b)}"
        return next((d for k in a if (d := _differs(a[k], b[k], f"{where}[{k!r}]"))), "")
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        return next(
            (
                d
                for i, (x, y) in enumerate(zip(a, b, strict=True))
                if (d := _differs(x, y, f"{where}[{i}]"))
            ),
            "",
        )
    return ""


def state_changes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> Iterator[str]:
    """A message if ``after`` has other state_dict keys or tensors than ``before``."""
    if list(after) != list(before):
        yield f"state_dict keys changed: {sorted(set(after) ^ set(before))[:5]}"
    elif not all(torch.equal(after[k], before[k]) for k in before):
        yield "state_dict tensors changed"


def zero_native_rates(model: nn.Module) -> None:
    """Set every stochastic-depth rate to 0: timm, torchvision and other libraries' classes
    (a model's own slots, before patching) and a model's own LayerDrop (transformers'
    ``layerdrop``, ``decoder_layerdrop``)."""
    from timm.layers import DropPath as TimmDropPath
    from torchvision.ops import StochasticDepth

    from dpatch.analysis._slots import _foreign_rate_attr
    from dpatch.models._layerdrop import find_layerdrop, set_layerdrop

    for record in find_layerdrop(model):
        if record.rate:
            set_layerdrop(model, record, 0.0)

    for m in model.modules():
        if isinstance(m, TimmDropPath):
            m.drop_prob = 0.0
        elif isinstance(m, StochasticDepth):
            m.p = 0.0
        elif (attr := _foreign_rate_attr(m)) is not None:
            setattr(m, attr, 0.0)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# --------------------------------------------------------------------------- command line
runner = CliRunner()
SCRIPT = str(Path(sys.executable).parent / "dpatch")


def cli(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run the dpatch app in-process: (exit code, stdout, stderr)."""
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = runner.invoke(app, list(args))
    finally:
        os.chdir(old)
    return r.exit_code, r.stdout, r.stderr


def one_line_error(err: str, *needles: str) -> None:
    """Assert ``err`` is one ``error:`` line (notes aside) holding every needle."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def split_families(
    families: list[dict[str, Any]], present: Callable[[dict[str, Any]], bool]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(families the installed library has, families it lacks): a zoo sweep runs the
    first and names the second in one skipped test, instead of failing to collect."""
    return [f for f in families if present(f)], [f for f in families if not present(f)]
