"""How fast the command line answers: ``dpatch --version``, ``--help``, ``inject --help``,
shell completion and a usage error, against ``python -c pass`` (the floor) and
``python -c "import torch"`` (what every call paid before the imports were made lazy).

Every command runs as a fresh process; the commands are interleaved round by round, so a
busy machine slows them alike. Prints the median and the range (min-max) per command and
its ratio to ``python -c pass``.

    python benchmarks/cli_startup.py [--rounds 15] [--json cli_startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS: dict[str, tuple[list[str], dict[str, str]]] = {
    "python -c pass": ([sys.executable, "-c", "pass"], {}),
    'python -c "import torch"': ([sys.executable, "-c", "import torch"], {}),
    "dpatch --version": (["{dpatch}", "--version"], {}),
    "dpatch --help": (["{dpatch}", "--help"], {}),
    "dpatch inject --help": (["{dpatch}", "inject", "--help"], {}),
    "dpatch inject --schedule <TAB>": (
        ["{dpatch}"],
        {
            "_DPATCH_COMPLETE": "complete_bash",
            "COMP_WORDS": "dpatch inject --schedule ",
            "COMP_CWORD": "3",
        },
    ),
    "dpatch inject x --bogus (usage error)": (["{dpatch}", "inject", "x", "--bogus"], {}),
}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=15, help="Runs of each command (interleaved).")
    p.add_argument("--json", type=Path, default=None, help="Write every sample to this file.")
    args = p.parse_args()
    script = shutil.which("dpatch") or str(Path(sys.executable).parent / "dpatch")
    samples: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, (argv, env) in COMMANDS.items():
            cmd = [a.replace("{dpatch}", script) for a in argv]
            t0 = time.perf_counter()
            subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, check=False)
            samples[name].append(time.perf_counter() - t0)
    floor = statistics.median(samples["python -c pass"])
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        "unknown CPU",
    )  # fmt: skip
    print(f"# CLI start-up: {args.rounds} interleaved rounds, {os.cpu_count()} CPUs ({cpu})")
    print(f"# {sys.executable} (Python {sys.version.split()[0]})\n")
    print("| command | median | min-max | x python -c pass |")
    print("|---|---|---|---|")
    for name, times in samples.items():
        med = statistics.median(times)
        print(
            f"| `{name}` | {med:.2f} s | {min(times):.2f}-{max(times):.2f} s | {med / floor:.1f}x |"
        )
    print(f"\n`python benchmarks/cli_startup.py --rounds {args.rounds}`")
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": args.rounds, "samples": samples}, indent=2))


if __name__ == "__main__":
    main()
