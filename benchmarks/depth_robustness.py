"""Does stochastic depth make a network robust to losing residual blocks at inference?

scikit-learn's bundled digits data set (1,797 8x8 grey images of 10 digits; no download),
upsampled, and a CIFAR-style ResNet of 3 stages x 3 BasicBlocks written here. Each seed trains
two models with the same initialisation, data order and epochs: plain, and with
``dpatch.inject(schedule="huang", max_rate=0.5)`` (Huang et al. 2016's linear decay to
p_L = 0.5). Both are then pruned by 0, 1, 2, ... blocks with ``dpatch.prune`` - by rate (the
highest-rate branches first, which for Huang's schedule is deepest first) and every other
block (fairseq's advice) - and their test accuracy is measured. The same sites are pruned in
both models. Plain training is the baseline. Prints the table (mean, standard deviation and
min-max over seeds), with ``--json`` every seed's accuracies, and with ``--png`` (when
matplotlib is installed) a plot. One torch thread unless ``--threads`` says otherwise; on
CPU the seeds' models train in ``--jobs`` worker processes (default 2: nothing is timed,
and every model seeds itself, so the numbers do not depend on it).

    python benchmarks/depth_robustness.py --json depth_robustness.json --png depth_robustness.png
"""

from __future__ import annotations

import copy
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import Run, parser

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


BY = ("rate", "every-other")  # the two pruning orders


def train_and_prune(
    seed: int, name: str, widths: tuple[int, int, int], size: int, epochs: int,
    max_rate: float, device_type: str, threads: int | None,
) -> tuple[float, float, dict[str, list[str]], dict[str, list[float]]]:  # fmt: skip
    """One seed's ``name`` model ("plain" or "huang"), trained and pruned by both orders:
    its training seconds, test accuracy, the orders and the accuracy curves. Both models of
    a seed start from the same initialisation; the orders come from the DropPath model's
    sites (its rates decide "by rate"; the plain model has none)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_type)
    xtr, ytr, xte, yte = (t.to(device) for t in digits(size))
    example = (xte[:2],)
    torch.manual_seed(seed)
    plain = CifarResNet(widths).to(device)
    dp = copy.deepcopy(plain)  # same initialisation
    report = dpatch.inject(dp, schedule="huang", max_rate=max_rate, example_inputs=example)
    model = plain if name == "plain" else dp
    t0 = time.perf_counter()
    train(model, xtr, ytr, epochs=epochs, seed=seed)
    seconds = time.perf_counter() - t0
    orders = {by: [s.name for s in dpatch.prune_order(list(report.sites), by)] for by in BY}
    curves = {by: curve(model, orders[by], xte, yte, example) for by in BY}
    return seconds, accuracy(model, xte, yte), orders, curves


def main() -> None:
    p = parser(__doc__ or "")
    p.set_defaults(threads=1)
    p.add_argument("--epochs", type=int, default=None, help="default 12 (quick: 1)")
    p.add_argument("--seeds", type=int, default=None, help="default 3 (quick: 2)")
    p.add_argument("--size", type=int, default=16, help="image side after upsampling")
    p.add_argument("--widths", default="8,16,32")
    p.add_argument("--max-rate", type=float, default=0.5)
    p.add_argument("--png", type=Path, default=None, help="plot here (needs matplotlib)")
    p.add_argument(
        "--jobs", type=int, default=2, help="worker processes on CPU (default 2; nothing is timed)"
    )
    args = p.parse_args()
    # --threads defaults to 1 here: two OpenMP threads on a busy 2-core box run 4-8x slower
    run = Run("depth_robustness", args)
    device = run.device
    epochs = args.epochs or (1 if args.quick else 12)
    seeds = args.seeds or (2 if args.quick else 3)
    widths = tuple(int(w) for w in args.widths.split(","))
    if len(widths) != 3:
        raise SystemExit(f"error: --widths takes three numbers, but got {args.widths!r}")

    runs: dict[str, dict[str, list[list[float]]]] = {
        "plain": {"rate": [], "every-other": []},
        "huang": {"rate": [], "every-other": []},
    }
    orders: dict[str, list[str]] = {}
    # Each (seed, model) trains on its own: nothing is timed, so --jobs processes share them
    # out; every job seeds itself, so the numbers are those of a run one after another.
    jobs = [
        (seed, name, widths, args.size, epochs, args.max_rate, device.type, args.threads)
        for seed in range(seeds)
        for name in ("plain", "huang")
    ]
    if args.jobs > 1 and device.type == "cpu":
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            results = list(pool.map(train_and_prune, *zip(*jobs, strict=True)))
    else:
        results = [train_and_prune(*job) for job in jobs]
    for (seed, name, *_), (seconds, acc, job_orders, curves) in zip(jobs, results, strict=True):
        run.note(f"seed {seed} {name}: trained in {seconds:.1f} s, test accuracy {acc:.4f}")
        orders.update(job_orders)
        for by in BY:
            runs[name][by].append(curves[by])

    depth = len(orders["rate"])
    table = []
    for k in range(depth + 1):
        row: dict[str, Any] = {"removed": k}
        for by in ("rate", "every-other"):
            for name in ("plain", "huang"):
                accs = [r[k] for r in runs[name][by]]
                row[f"{by} {name}"] = {
                    "mean": statistics.mean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "min": min(accs),
                    "max": max(accs),
                    "runs": accs,
                }
        table.append(row)

    def cell(c: dict[str, Any]) -> str:
        return f"{c['mean']:.3f} ± {c['std']:.3f} ({c['min']:.3f}-{c['max']:.3f})"

    huang = f"huang {args.max_rate}"
    run.table(
        f"Test accuracy with k residual blocks removed: digits {args.size}x{args.size}, "
        f"ResNet 3x3 BasicBlocks, widths {'/'.join(map(str, widths))}, {epochs} epochs",
        [
            "removed",
            "by rate: plain training (baseline)",
            f"by rate: {huang}",
            "every-other: plain training (baseline)",
            f"every-other: {huang}",
        ],
        [
            [
                row["removed"],
                *(
                    cell(row[f"{by} {n}"])
                    for by in ("rate", "every-other")
                    for n in ("plain", "huang")
                ),
            ]
            for row in table
        ],
        note=f"mean ± std (min-max) over {seeds} seeds; the same initialisation, data order "
        f"and sites for both models; removal orders: by rate {_short(orders['rate'])}; "
        f"every-other {_short(orders['every-other'])}",
    )
    run.extra.update({"orders": orders, "table": table})
    run.finish()
    if args.png:
        plot(table, args.png, huang)


def _short(order: list[str]) -> str:
    return ", ".join(n.removesuffix(".drop_path").removeprefix("layers.") for n in order)


def plot(table: list[dict[str, Any]], png: Path, huang: str) -> None:
    """The two curves per pruning order, with one standard deviation as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    ks = [r["removed"] for r in table]
    for ax, by in zip(axes, ("rate", "every-other"), strict=True):
        for name, label in (("plain", "plain training"), ("huang", huang)):
            cells = [r[f"{by} {name}"] for r in table]
            mean, std = [c["mean"] for c in cells], [c["std"] for c in cells]
            ax.errorbar(ks, mean, yerr=std, label=label, capsize=3)
        ax.set_title(f"pruned by {by}")
        ax.set_xlabel("residual blocks removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}", file=sys.stderr)


if __name__ == "__main__":
    main()
