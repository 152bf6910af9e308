"""Every CPU benchmark in its README configuration, one after another, into one Markdown
report: the way to check the README's Performance and Coverage figures in one command.

Runs, each as its own process with its default options (``--quick`` for a smoke run):
residual_op, train_step, distributed, patch_cost, batch_files, cli_startup,
depth_robustness, zoo_coverage. Their
Markdown goes to the report in that order, their progress to stderr, their raw samples to
``NAME.json`` beside the report. A script that fails is reported in its section and the
others still run; the exit status is then 1. On a quiet 2-core machine all of them took
12.6 minutes (``--threads 1``; train_step 3.6 and zoo_coverage 3.4 of them).

    python benchmarks/run_all.py                      # benchmarks/results/report.md
    python benchmarks/run_all.py --quick --out /tmp/report.md
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "residual_op",
    "train_step",
    "distributed",
    "patch_cost",
    "batch_files",
    "cli_startup",
    "depth_robustness",
    "zoo_coverage",
)


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(HERE), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__)
    p.add_argument("--out", type=Path, default=HERE / "results" / "report.md")
    p.add_argument("--quick", action="store_true", help="every script with --quick")
    p.add_argument("--threads", type=int, default=None, help="passed to every script")
    p.add_argument("--only", default=None, help=f"comma list of {', '.join(SCRIPTS)}")
    args = p.parse_args()
    chosen = args.only.split(",") if args.only else list(SCRIPTS)
    unknown = sorted(set(chosen) - set(SCRIPTS))
    if unknown:
        raise SystemExit(f"error: no benchmark {', '.join(unknown)}; choose from {SCRIPTS}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    commit = _git_commit()  # what runs, before anything can change the tree
    started = time.perf_counter()
    sections: list[str] = []
    times: list[tuple[str, float, int]] = []
    for name in chosen:
        cmd = [
            sys.executable,
            str(HERE / f"{name}.py"),
            "--json",
            str(args.out.parent / f"{name}.json"),
        ]
        if args.quick:
            cmd.append("--quick")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"run_all: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        # stdout (the Markdown) is kept; stderr (progress) goes straight to ours
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        seconds = time.perf_counter() - t0
        times.append((name, seconds, done.returncode))
        text = done.stdout.strip()
        if done.returncode != 0:
            text += (
                f"\n\n**{name} failed (exit {done.returncode}); its stderr is above the report.**"
            )
        sections.append(text)
        print(f"run_all: {name} done in {seconds:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = " --quick" if args.quick else ""
    head = [
        f"# dpatch benchmark report{' (quick: a smoke run, not measurements)' if args.quick else ''}",
        "",
        f"`python benchmarks/run_all.py{mode}` at commit {commit}, {stamp}; "
        f"{total / 60:.1f} minutes in all.",
        "",
        "| script | seconds | exit |",
        "|---|---|---|",
        *(f"| {n} | {s:.0f} | {rc} |" for n, s, rc in times),
        "",
    ]
    report = "\n".join(head) + "\n" + "\n\n".join(sections) + "\n"
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(report)
    tmp.replace(args.out)
    print(f"run_all: wrote {args.out} ({total / 60:.1f} min)", file=sys.stderr)
    if any(rc != 0 for _, _, rc in times):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
