"""Many checkpoints in one command against one command per checkpoint.

Writes N ResNet-50 checkpoints with random weights (plain safetensors state dicts) to a
temporary folder, then times, as real processes (imports included on both sides):

- one ``dpatch inject FOLDER --model timm:resnet50 -o OUT`` (the model is built and
  traced once, then each file only loads its weights and is saved);
- N ``dpatch inject FILE --model timm:resnet50 -o OUT/FILE`` invocations;

and prints seconds per checkpoint for both and their ratio. ``--command verify`` or
``retune`` times those instead (retune and verify read the injected files).

    python benchmarks/batch_files.py [--count 20] [--command inject]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import base_parser, environment, print_table, setup, write_json

DPATCH = [sys.executable, "-c", "from dpatch.cli import main; main()"]


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
        path = folder / f"ckpt{i:03d}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def _run(args: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([*DPATCH, *args], capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1) or (done.returncode == 1 and args[0] != "verify"):
        raise SystemExit(f"dpatch {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return time.perf_counter() - started


def _args(command: str, inputs: list[str], out: Path | None, model: str) -> list[str]:
    args = [command, *inputs]
    if command == "inject":
        args += ["--model", model, "--max-rate", "0.2"]
    elif command == "retune":
        args += ["--max-rate", "0.1"]
    if out is not None:
        args += ["-o", str(out)]
    return args


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--model", default="timm:resnet50")
    p.add_argument("--command", choices=("inject", "retune", "verify"), default="inject")
    args = p.parse_args()
    device = setup(args)
    root = Path(tempfile.mkdtemp(prefix="dpatch-batch-"))
    try:
        plain = root / "plain"
        plain.mkdir()
        files = _checkpoints(plain, args.model, args.count)
        source = plain
        if args.command != "inject":  # retune and verify take dpatch files
            source = root / "patched"
            _run(_args("inject", [str(plain)], source, args.model))
            files = sorted(source.iterdir())
        print(f"  {len(files)} checkpoints in {source}", file=sys.stderr)

        out_many = root / "many" if args.command != "verify" else None
        many = _run(_args(args.command, [str(source)], out_many, args.model))
        print(f"  one command: {many:.1f} s", file=sys.stderr)

        one_by_one = 0.0
        (root / "single").mkdir()
        for f in files:
            out = root / "single" / f.name if args.command != "verify" else None
            one_by_one += _run(_args(args.command, [str(f)], out, args.model))
        print(f"  {len(files)} commands: {one_by_one:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = len(files)
    env = environment(device)
    title = (
        f"dpatch {args.command}, {n} x {args.model}: {env['device']} "
        f"(torch {env['torch']}, timm {env['timm']})"
    )
    header = ["run", "total s", "s per checkpoint", "ratio"]
    rows = [
        [f"{n} separate commands", one_by_one, one_by_one / n, 1.0],
        ["one command, many files", many, many / n, many / one_by_one],
    ]
    print_table(title, header, rows)
    print(f"one command costs {many / one_by_one:.3f}x of {n} separate commands")
    write_json(
        args.json,
        {
            "benchmark": "batch_files",
            "command": args.command,
            "count": n,
            **env,
            "rows": [dict(zip(header, r, strict=False)) for r in rows],
        },
    )


if __name__ == "__main__":
    main()
