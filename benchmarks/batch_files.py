"""Many checkpoints in one command against one command per checkpoint, and against a
hand-written loop.

Writes N ResNet-50 state dicts with random weights (``torch.save``, ``.pt``) to a
temporary folder, then times, as real processes (imports included on every side),
interleaved round by round (``_common.interleave``):

- ``one dpatch command``: ``dpatch inject FOLDER --model timm:resnet50 -o OUT`` (the model
  is built and traced once, then each file only loads its weights and is saved);
- ``separate dpatch commands``: ``dpatch inject FILE --model timm:resnet50 -o OUT/FILE``,
  one process per checkpoint; ``--separate`` of them per round (a different file each
  time; every such process does the same work), so a round stays short;
- ``plain loop``: one Python process that builds the model once, then per file
  ``torch.load`` + ``load_state_dict`` + safetensors ``save_file`` (no stochastic depth:
  the floor of what reading and writing N checkpoints costs).

Each sample is seconds per checkpoint; ratios are paired within a round. ``--threads``
sets this process's torch threads only: the processes timed run with torch's default, as a
user's would. ``--command
verify`` or ``retune`` times those dpatch commands instead (on injected files; the plain
loop then only loads).

    python benchmarks/batch_files.py [--count 20] [--command inject]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from itertools import count as counter
from pathlib import Path
from typing import Any

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import Case, Run, parser, wall_timer

DPATCH = [sys.executable, "-c", "from dpatch.cli import main; main()"]
PLAIN_LOOP = """
import sys
from pathlib import Path
import timm, torch
from safetensors.torch import save_file
model = timm.create_model(sys.argv[1])
out = Path(sys.argv[3]) if len(sys.argv) > 3 else None
for f in sorted(Path(sys.argv[2]).iterdir()):
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(f))
    else:
        state = torch.load(f, weights_only=True)
    model.load_state_dict(state, strict=False)
    if out is not None:
        save_file(model.state_dict(), str(out / (f.stem + ".safetensors")))
"""


def _checkpoints(folder: Path, model: str, count: int) -> list[Path]:
    """``count`` state dicts of ``model`` with different random weights."""
    net = timm.create_model(model.removeprefix("timm:"))
    state = net.state_dict()
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        tensors = {
            k: (torch.randn(v.shape, generator=g) * 0.02).to(v.dtype)
            if v.is_floating_point()
            else v.clone()
            for k, v in state.items()
        }
        path = folder / f"ckpt{i:03d}.pt"
        torch.save(tensors, path)
        paths.append(path)
    return paths


def _run(cmd: list[str], verify: bool = False) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1) or (done.returncode == 1 and not verify):
        raise RuntimeError(f"{' '.join(cmd[3:])} failed ({done.returncode}): {done.stderr}")


def _args(command: str, inputs: list[str], out: Path | None, model: str) -> list[str]:
    args = [command, *inputs]
    if command == "inject":
        args += ["--model", model, "--max-rate", "0.2"]
    elif command == "retune":
        args += ["--max-rate", "0.1"]
    if out is not None:
        args += ["-o", str(out)]
    return args


def _empty(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def main() -> None:
    p = parser(__doc__ or "", rounds=(3, 1), warmup=(0, 0))
    p.add_argument("--count", type=int, default=None, help="checkpoints (default 20)")
    p.add_argument("--separate", type=int, default=None, help="separate commands per round (2)")
    p.add_argument("--model", default="timm:resnet50")
    p.add_argument("--command", choices=("inject", "retune", "verify"), default="inject")
    args = p.parse_args()
    run = Run("batch_files", args)
    n = args.count or (3 if args.quick else 20)
    per_round = min(args.separate or (1 if args.quick else 2), n)
    arch = args.model.removeprefix("timm:")
    command = args.command
    writes = command != "verify"
    root = Path(tempfile.mkdtemp(prefix="dpatch-batch-"))
    try:
        source = root / "plain"
        source.mkdir()
        files = _checkpoints(source, args.model, n)
        if command != "inject":  # retune and verify take dpatch files
            patched = root / "patched"
            _run([*DPATCH, *_args("inject", [str(source)], patched, args.model)])
            source = patched
            files = sorted(source.iterdir())
        run.note(f"{len(files)} checkpoints in {source}")
        out = root / "out"
        next_file = counter()

        def one_command(_: Any) -> None:
            _run(
                [*DPATCH, *_args(command, [str(source)], out if writes else None, args.model)],
                not writes,
            )

        def separate(_: Any) -> None:
            for _ in range(per_round):
                f = files[next(next_file) % len(files)]
                target = out / (f.stem + ".safetensors") if writes else None
                _run([*DPATCH, *_args(command, [str(f)], target, args.model)], not writes)

        def plain_loop(_: Any) -> None:
            _run(
                [
                    sys.executable,
                    "-c",
                    PLAIN_LOOP,
                    arch,
                    str(source),
                    *([str(out)] if writes else []),
                ]
            )

        reset = lambda: _empty(out)  # noqa: E731 (untimed: outputs of the last sample removed)
        to_s = 1e-3  # the timer's milliseconds to seconds
        timing = run.interleave(
            f"{command} x{n}",
            [
                Case("one dpatch command", one_command, setup=reset, scale=to_s / n),
                Case("separate dpatch commands", separate, setup=reset, scale=to_s / per_round),
                Case("plain loop", plain_loop, setup=reset, scale=to_s / n),
            ],
            timer=wall_timer(),
            unit="s",
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    sep = "separate dpatch commands"
    plain_what = "torch.load + load_state_dict" + (" + save_file" if writes else "")
    rows = [
        [
            f"{n} files, one `dpatch {command}` command",
            timing.spread("one dpatch command").cell("s"),
            timing.ratio("one dpatch command", sep).ratio_cell(),
            timing.ratio("one dpatch command", "plain loop").ratio_cell(),
        ],
        [
            f"one `dpatch {command}` command per file ({per_round} per round)",
            timing.spread(sep).cell("s"),
            "1",
            timing.ratio(sep, "plain loop").ratio_cell(),
        ],
        [
            f"plain loop in one process: {plain_what}",
            timing.spread("plain loop").cell("s"),
            timing.ratio("plain loop", sep).ratio_cell(),
            "1",
        ],
    ]
    run.table(
        f"{n} x {args.model} checkpoints, `dpatch {command}`: seconds per checkpoint",
        ["run", "s per checkpoint", "vs separate commands", "vs plain loop"],
        rows,
        note=f"median [min-max] of {run.rounds} interleaved rounds, every run a real "
        "process; ratios paired within a round",
    )
    run.finish()


if __name__ == "__main__":
    main()
