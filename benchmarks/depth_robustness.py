"""Does stochastic depth make a network robust to losing residual blocks at inference?

scikit-learn's bundled digits data set (1,797 8x8 grey images of 10 digits; no download),
upsampled, and a CIFAR-style ResNet of 3 stages x 3 BasicBlocks written here. Each seed trains
two models with the same initialisation, data order and epochs: plain, and with
``dpatch.inject(schedule="huang", max_rate=0.5)`` (Huang et al. 2016's linear decay to
p_L = 0.5). Both are then pruned by 0, 1, 2, ... blocks with ``dpatch.prune`` - by rate (the
highest-rate branches first, which for Huang's schedule is deepest first) and every other
block (fairseq's advice) - and their test accuracy is measured. The same sites are pruned in
both models. Prints the table (mean and spread over seeds), writes JSON and, when matplotlib
is installed, a PNG plot.

    python benchmarks/depth_robustness.py --json depth_robustness.json --png depth_robustness.png
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment

import dpatch


class BasicBlock(nn.Module):
    """He et al.'s CIFAR block: two 3x3 convolutions, identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3 stages x ``blocks`` BasicBlocks, widths ``widths``, global pooling, linear head."""

    def __init__(self, widths: tuple[int, int, int], blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


def digits(size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits, upsampled to ``size`` x ``size``, normalised; a fixed stratified 80/20
    split (the same for every seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    tr_t, te_t = torch.tensor(tr), torch.tensor(te)
    mean, std = x[tr_t].mean(), x[tr_t].std()
    x = (x - mean) / std
    return x[tr_t], y[tr_t], x[te_t], y[te_t]


def shift(x: Tensor, gen: torch.Generator, pad: int = 2) -> Tensor:
    """Random translation by up to ``pad`` pixels (one offset per batch)."""
    i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    return F.pad(x, (pad, pad, pad, pad))[:, :, i : i + x.shape[2], j : j + x.shape[3]]


def train(
    model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, seed: int, batch: int = 64
) -> None:
    """SGD with momentum, cosine learning rate, random shifts; seeded data order."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # DropPath masks
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for k in range(0, len(y), batch):
            idx = order[k : k + batch]
            loss = F.cross_entropy(model(shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def curve(
    model: nn.Module, order: list[str], x: Tensor, y: Tensor, example: tuple[Tensor, ...]
) -> list[float]:
    """Test accuracy with the first k sites of ``order`` pruned, k = 0 .. len(order)."""
    out = [accuracy(model, x, y)]
    pruned = copy.deepcopy(model)
    for name in order:
        dpatch.prune(pruned, [name], example_inputs=example)
        out.append(accuracy(pruned, x, y))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--size", type=int, default=16, help="image side after upsampling")
    p.add_argument("--widths", default="8,16,32")
    p.add_argument("--max-rate", type=float, default=0.5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: two OpenMP threads on a busy 2-core box run 4-8x slower)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--png", type=Path, default=None, help="plot here (needs matplotlib)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    widths = tuple(int(w) for w in args.widths.split(","))
    assert len(widths) == 3, "--widths takes three numbers"
    start = time.perf_counter()
    xtr, ytr, xte, yte = digits(args.size)
    example = (xte[:2],)

    runs: dict[str, dict[str, list[list[float]]]] = {
        "plain": {"rate": [], "every-other": []},
        "huang": {"rate": [], "every-other": []},
    }
    orders: dict[str, list[str]] = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        plain = CifarResNet(widths)  # type: ignore[arg-type]
        dp = copy.deepcopy(plain)  # same initialisation
        report = dpatch.inject(dp, schedule="huang", max_rate=args.max_rate, example_inputs=example)
        for name, model in (("plain", plain), ("huang", dp)):
            t0 = time.perf_counter()
            train(model, xtr, ytr, epochs=args.epochs, seed=seed)
            print(
                f"seed {seed} {name}: trained in {time.perf_counter() - t0:.1f} s, "
                f"test accuracy {accuracy(model, xte, yte):.4f}",
                file=sys.stderr,
            )
        # The same sites, in the same order, for both models: the DropPath model's rates
        # decide "by rate" (the plain model has none).
        for by in ("rate", "every-other"):
            order = [s.name for s in dpatch.prune_order(list(report.sites), by)]
            orders[by] = order
            for name, model in (("plain", plain), ("huang", dp)):
                runs[name][by].append(curve(model, order, xte, yte, example))

    seconds = time.perf_counter() - start
    depth = len(orders["rate"])
    table = []
    for by in ("rate", "every-other"):
        for k in range(depth + 1):
            row: dict[str, Any] = {"by": by, "removed": k}
            for name in ("plain", "huang"):
                accs = [r[k] for r in runs[name][by]]
                row[name] = {
                    "mean": statistics.mean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "min": min(accs),
                    "max": max(accs),
                    "runs": accs,
                }
            table.append(row)

    print(
        f"\ndigits {args.size}x{args.size}, ResNet 3x3 BasicBlocks widths {widths}, "
        f"{args.epochs} epochs, {args.seeds} seeds, huang max_rate {args.max_rate}; "
        f"test accuracy, mean ± std (min-max) over seeds\n"
    )
    print(f"{'by':<12} {'removed':>7}  {'plain':>24}  {'huang 0.5':>24}")
    for row in table:
        cells = [
            f"{row[n]['mean']:.3f} ± {row[n]['std']:.3f} ({row[n]['min']:.3f}-{row[n]['max']:.3f})"
            for n in ("plain", "huang")
        ]
        print(f"{row['by']:<12} {row['removed']:>7}  {cells[0]:>24}  {cells[1]:>24}")
    print(f"\norders: rate {orders['rate']}\n        every-other {orders['every-other']}")
    print(f"total time {seconds:.1f} s ({torch.get_num_threads()} threads)")

    doc = {
        "environment": environment(torch.device("cpu")),
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "orders": orders,
        "table": table,
        "seconds": seconds,
    }
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
            return
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, by in zip(axes, ("rate", "every-other"), strict=True):
            rows = [r for r in table if r["by"] == by]
            ks = [r["removed"] for r in rows]
            for name, label in (("plain", "plain"), ("huang", f"huang {args.max_rate}")):
                mean = [r[name]["mean"] for r in rows]
                ax.errorbar(ks, mean, yerr=[r[name]["std"] for r in rows], label=label, capsize=3)
            ax.set_title(f"pruned by {by}")
            ax.set_xlabel("residual blocks removed")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
