"""Depth on real text: a tiny byte-level Llama trained on the Python standard library's own
source, with and without layer dropout, then cut by 1..k layers chosen four ways.

Data: every ``.py`` file of this Python's standard library, as bytes (a 256-token
vocabulary); a file goes to validation when the CRC32 of its path is 0 mod 10, so no file
is in both. Model: transformers' ``LlamaForCausalLM`` (8 layers, width 128 by default),
trained from scratch with AdamW on random windows. Three arms, each over ``--seeds`` seeds:

- ``plain``: no layer dropout (the baseline);
- ``uniform``: ``dpatch.inject(model, 0.2, schedule="uniform", tie="block", skip=True)``,
  each layer dropped as a unit (LayerDrop's scheme, computed on the kept rows only);
- ``layerskip``: ``dpatch.inject(model, recipe="layerskip", skip=True)`` and its time
  curriculum (``DropPathScheduler(kind="exp-ramp")``): LayerSkip's rate
  ``p(l, t) = S(t) D(l) p_max``.

Then, in eval, layers are removed (``dpatch.prune``: a pruned layer returns its input) in
the order each score gives, least important first, and the validation loss is measured:

- ``bi``: ShortGPT's Block Influence ``1 - cos(x_in, x_out)``, per token, averaged;
- ``angular``: Gromov et al.'s angular distance ``arccos(cos(x_in, x_out)) / pi``;
- ``loss``: the validation loss with that one layer removed (a layer at a time);
- ``last``: the deepest layers but the last (Gromov et al.'s simple rule).

BI and angular are measured on training windows (calibration), the loss score and every
reported figure on validation windows. Prints validation loss and perplexity, mean and
standard deviation over the seeds, and writes a PNG with ``--png``.

    python benchmarks/text_depth.py --png text_depth.png
"""

from __future__ import annotations

import math
import statistics
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import Run, parser

import dpatch

ARMS = ("plain", "uniform", "layerskip")
METHODS = ("bi", "angular", "loss", "last")


# --------------------------------------------------------------------------- data
def stdlib_bytes(budget: int) -> tuple[Tensor, Tensor]:
    """Training and validation bytes of the standard library's ``.py`` files, split by file
    (at most ``budget`` bytes of training text; validation a tenth of that)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train: list[bytes] = []
    val: list[bytes] = []
    sizes = [0, 0]
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        held_out = zlib.crc32(str(path.relative_to(root)).encode()) % 10 == 0
        limit = budget // 10 if held_out else budget
        if sizes[held_out] >= limit:
            continue
        try:
            text = path.read_bytes() + b"\n"
        except OSError:
            continue
        (val if held_out else train).append(text)
        sizes[held_out] += len(text)
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train).long(), as_tensor(val).long()


def windows(data: Tensor, count: int, length: int, gen: torch.Generator) -> Tensor:
    """``count`` random windows of ``length + 1`` bytes (inputs and next-byte targets)."""
    starts = torch.randint(0, data.numel() - length - 1, (count,), generator=gen)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()])


# --------------------------------------------------------------------------- model
def llama(layers: int, width: int, length: int) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=width,
        intermediate_size=(8 * width // 3 + 7) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=max(width // 32, 1),
        num_key_value_heads=max(width // 32, 1),
        max_position_embeddings=length,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    return model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # type: ignore[no-any-return]


@torch.no_grad()
def val_loss(model: nn.Module, val: Tensor, batch: int) -> float:
    model.eval()
    losses = [float(lm_loss(model, val[i : i + batch])) for i in range(0, val.shape[0], batch)]
    return statistics.fmean(losses)


def train(arm: str, seed: int, data: Tensor, args: Any, note: Callable[[str], None]) -> nn.Module:
    torch.manual_seed(seed)
    model = llama(args.layers, args.width, args.length)
    example = (torch.zeros(2, args.length, dtype=torch.long),)
    sched = None
    if arm == "uniform":
        dpatch.inject(model, args.rate, schedule="uniform", tie="block", skip=True,
                      example_inputs=example)  # fmt: skip
    elif arm == "layerskip":
        dpatch.inject(model, recipe="layerskip", skip=True, example_inputs=example)
        sched = dpatch.DropPathScheduler(model, kind="exp-ramp", total_steps=args.steps)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        loss = lm_loss(model, windows(data, args.batch, args.length, gen))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr.step()
        if sched is not None:
            sched.step()
        if (step + 1) % max(args.steps // 4, 1) == 0:
            note(f"{arm} seed {seed}: step {step + 1}/{args.steps}, loss {float(loss):.3f} "
                 f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    return model.eval()


# --------------------------------------------------------------------------- removal
def layer_order(model: nn.Module, method: str, calib: Tensor, val: Tensor, args: Any) -> list[str]:
    """The model's layers, least important first, by ``method``."""
    layers = [layer.path for layer in dpatch.depth.find_layers(model, (calib[:2, :-1],))]
    if method == "last":
        return list(reversed(layers[:-1])) + layers[-1:]  # deepest first, the last one kept
    if method in ("bi", "angular"):
        report = dpatch.sensitivity(model, calib[:, :-1], metric=method, batch_size=args.batch)
        scores = {s.name: s.score for s in report.layers if s.score is not None}
    else:
        base = val_loss(model, val, args.batch)
        scores = {}
        for path in layers:
            cut = dpatch.prune(model, count=1, by="sensitivity", scores={path: 0.0},
                               inplace=False, example_inputs=(calib[:2, :-1],))  # fmt: skip
            assert cut.model is not None
            scores[path] = val_loss(cut.model, val, args.batch) - base
    return sorted(layers, key=lambda p: (scores.get(p, math.inf), -layers.index(p)))


def removed_loss(model: nn.Module, order: list[str], k: int, val: Tensor, args: Any) -> float:
    if k == 0:
        return val_loss(model, val, args.batch)
    scores = {p: float(i) for i, p in enumerate(order)}
    cut = dpatch.prune(model, count=k, by="sensitivity", scores=scores, inplace=False,
                       example_inputs=(val[:2, :-1],))  # fmt: skip
    assert cut.model is not None
    return val_loss(cut.model, val, args.batch)


# --------------------------------------------------------------------------- main
def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 600)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--length", type=int, default=64, help="bytes per window")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rate", type=float, default=0.2, help="the uniform arm's rate")
    p.add_argument("--remove", type=int, default=4, help="remove 1..N layers")
    p.add_argument("--png", type=Path, default=None, help="write a plot here")
    args = p.parse_args()
    if args.steps is None:
        args.steps = 30 if args.quick else 600
    seeds = 1 if args.quick else args.seeds
    run = Run("text_depth", args)
    train_bytes, val_bytes = stdlib_bytes(400_000 if args.quick else 8_000_000)
    gen = torch.Generator().manual_seed(1234)
    val = windows(val_bytes, 64 if args.quick else 256, args.length, gen)
    calib = windows(train_bytes, 32 if args.quick else 128, args.length, gen)
    run.note(f"{train_bytes.numel():,} training bytes, {val_bytes.numel():,} validation bytes")
    ks = range(args.remove + 1)
    results: dict[tuple[str, str, int], list[float]] = {}
    for arm in ARMS:
        for seed in range(seeds):
            model = train(arm, seed, train_bytes, args, run.note)
            for method in METHODS:
                order = layer_order(model, method, calib, val, args)
                for k in ks:
                    results.setdefault((arm, method, k), []).append(
                        removed_loss(model, order, k, val, args)
                    )
            run.note(f"{arm} seed {seed}: done")

    def cell(losses: list[float]) -> str:
        ppl = [math.exp(v) for v in losses]
        sd = f" ± {statistics.stdev(ppl):.2f}" if len(ppl) > 1 else ""
        return f"{statistics.fmean(losses):.3f} / {statistics.fmean(ppl):.2f}{sd}"

    for arm in ARMS:
        rows = [[k, *(cell(results[(arm, m, k)]) for m in METHODS)] for k in ks]
        run.table(
            f"Validation loss / perplexity, {arm} training, layers removed by each score",
            ["removed", *METHODS],
            rows,
            note=f"{args.layers} layers, width {args.width}, {args.steps} steps; mean loss / "
            f"mean perplexity ± std over {seeds} seed(s)",
        )
    run.extra["results"] = {f"{a}/{m}/{k}": v for (a, m, k), v in results.items()}
    if args.png is not None:
        plot(results, ks, args.png)
    run.finish()


def plot(results: dict[tuple[str, str, int], list[float]], ks: range, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ARMS), figsize=(4 * len(ARMS), 3.2), sharey=True)
    for ax, arm in zip(axes, ARMS, strict=True):
        for method in METHODS:
            ppl = [[math.exp(v) for v in results[(arm, method, k)]] for k in ks]
            mean = [statistics.fmean(v) for v in ppl]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in ppl]
            ax.errorbar(list(ks), mean, yerr=sd, label=method, capsize=3, marker="o", ms=3)
        ax.set_title(f"{arm} training")
        ax.set_xlabel("layers removed")
        ax.set_yscale("log")
    axes[0].set_ylabel("validation perplexity")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
