"""How fast the command line answers: ``dpatch --version``, ``--help``, ``inject --help``,
shell completion and a usage error, against ``python -c pass`` (the floor) and
``python -c "import torch"`` (what every call paid before dpatch's imports were made lazy).

Every command runs as a fresh process, interleaved round by round with the others
(``_common.interleave``), so a busy machine slows them alike. Prints the median with its
[min-max] per command and its ratio to ``python -c pass``, paired within a round.

    python benchmarks/cli_startup.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Case, Run, parser, wall_timer

_COMPLETE = {"_DPATCH_COMPLETE": "complete_bash", "COMP_CWORD": "3"}
COMMANDS: dict[str, tuple[list[str], dict[str, str]]] = {
    "python -c pass": ([sys.executable, "-c", "pass"], {}),
    'python -c "import torch"': ([sys.executable, "-c", "import torch"], {}),
    "dpatch --version": (["{dpatch}", "--version"], {}),
    "dpatch --help": (["{dpatch}", "--help"], {}),
    "dpatch inject --help": (["{dpatch}", "inject", "--help"], {}),
    "dpatch inject --schedule <TAB>": (
        ["{dpatch}"],
        {**_COMPLETE, "COMP_WORDS": "dpatch inject --schedule "},
    ),
    "dpatch inject x --bogus (usage error)": (["{dpatch}", "inject", "x", "--bogus"], {}),
}


def main() -> None:
    args = parser(__doc__ or "", rounds=(10, 3), warmup=(1, 1)).parse_args()
    run = Run("cli_startup", args)
    script = shutil.which("dpatch") or str(Path(sys.executable).parent / "dpatch")

    def process(argv: list[str], env: dict[str, str]) -> Callable[[], None]:
        cmd = [a.replace("{dpatch}", script) for a in argv]
        full_env = {**os.environ, **env}
        return lambda: subprocess.run(cmd, env=full_env, capture_output=True, check=False)

    cases = [Case(name, process(*how), scale=1e-3) for name, how in COMMANDS.items()]
    timing = run.interleave("startup", cases, timer=wall_timer())
    floor = "python -c pass"
    rows = [
        [f"`{name}`", timing.spread(name).cell("s"), timing.ratio(name, floor).ratio_cell()]
        for name in COMMANDS
    ]
    run.table(
        "CLI start-up (a fresh process each)",
        ["command", "seconds", f"x `{floor}`"],
        rows,
        note=f"median [min-max] of {run.rounds} interleaved rounds; ratios paired within a round",
    )
    run.finish()


if __name__ == "__main__":
    main()
