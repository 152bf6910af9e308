"""The command line answers at once: help, version, completion and argument errors import
no torch (nor timm, torchvision, transformers); commands list in the order a user meets
them; usage errors point to the failing command's help."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import cli, one_line_error

HEAVY = ("torch", "timm", "torchvision", "transformers")

_RUN = """
import json, sys
sys.argv = ["dpatch", *json.loads(sys.argv[1])]
from dpatch.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = [m for m in {heavy!r} if m in sys.modules]
sys.stderr.write("\\nHEAVY=" + json.dumps(heavy) + " CODE=" + str(code) + "\\n")
"""


def _run(args: list[str], env: dict[str, str] | None = None) -> tuple[list[str], int, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _RUN.format(heavy=HEAVY), json.dumps(args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    tail = proc.stderr.rsplit("HEAVY=", 1)[1]
    heavy_text, code_text = tail.split(" CODE=")
    return json.loads(heavy_text), int(code_text.strip() or 0), proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["--help"],
        [],
        ["inject", "--help"],
        ["verify", "--help"],
        ["prune", "--help"],
        ["inject", "x", "--bogus"],  # usage error
        ["schedule", "--depth", "0"],  # a bad value
        ["sensitivity", "tv:resnet18", "--synthetic", "2", "--metric", "cka"],
        ["inject", "tv:resnet18", "--max-rate", "1.5"],  # a bad setting
        ["inject", "tv:resnet18", "--schedule", "nope"],
        ["list", "--source", "nope"],
    ],
)
def test_answers_without_importing_torch(args: list[str]) -> None:
    heavy, _, output = _run(args)
    assert heavy == [], (args, heavy, output[-500:])


def test_completion_offers_choices_without_torch() -> None:
    env = {"_DPATCH_COMPLETE": "complete_bash", "COMP_WORDS": "dpatch inject --schedule c",
           "COMP_CWORD": "3"}  # fmt: skip
    heavy, code, output = _run([], env)
    assert heavy == [] and code == 0
    assert output.split("HEAVY=")[0].split() == ["cosine", "custom"]
    env = {"_DPATCH_COMPLETE": "complete_bash", "COMP_WORDS": "dpatch inject --mode ",
           "COMP_CWORD": "3"}  # fmt: skip
    heavy, _, output = _run([], env)
    assert output.split("HEAVY=")[0].split() == ["row", "batch"]


def test_no_arguments_shows_the_help_and_succeeds() -> None:
    code, out, err = cli()
    assert code == 0 and "Usage: dpatch" in out and "error" not in err


def test_commands_listed_in_the_order_a_user_meets_them() -> None:
    code, out, _ = cli("--help")
    assert code == 0
    listed = out.split("Commands:")[1].split()
    order = ["inject", "inspect", "retune", "verify", "schedule", "recipes", "list",
             "sensitivity", "prune", "fold"]  # fmt: skip
    positions = [listed.index(c) for c in order]
    assert positions == sorted(positions), listed


def test_flags_do_not_show_a_value() -> None:
    code, out, _ = cli("inject", "--help")
    assert code == 0 and "<bool>" not in out
    assert "--force " in out or "--force\n" in out


def test_usage_errors_point_to_the_command_help() -> None:
    code, _, err = cli("inject", "tv:resnet18", "--bogus")
    assert code == 2
    one_line_error(err, "--bogus", "dpatch inject --help")
    code, _, err = cli("bogus")
    assert code == 2
    one_line_error(err, "dpatch --help")


def test_schedule_depth_must_be_positive() -> None:
    code, out, err = cli("schedule", "--depth", "0")
    assert code == 1 and out == ""
    one_line_error(err, "--depth", "0")


def test_dry_run_refuses_an_existing_output_like_the_real_run(tmp_path: object) -> None:
    from pathlib import Path

    out = Path(str(tmp_path)) / "x.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = cli("inject", "tv:resnet18", "-o", str(out), "--dry-run")
    assert code == 1
    one_line_error(err, "exists", "--force")
    assert out.read_bytes() == b"keep me"


def test_json_rates_are_rounded_for_people_files_keep_every_bit(tmp_path: object) -> None:
    from pathlib import Path

    import dpatch

    code, out, err = cli("schedule", "--depth", "6", "--max-rate", "0.1", "--json")
    assert code == 0, err
    rates = json.loads(out)["rates"]
    assert rates == [0.0, 0.02, 0.04, 0.06, 0.08, 0.1]
    exact = dpatch.schedule_rates("linear", 6, 0.1)
    assert exact[3] == 0.06000000000000001  # the arithmetic's own value; files keep it
    path = Path(str(tmp_path)) / "m.safetensors"
    code, _, err = cli("inject", "tv:resnet18", "--max-rate", "0.1", "-o", str(path))
    assert code == 0, err
    manifest = dpatch.files.read_manifest(path)
    assert manifest is not None
    site_rates = [s["rate"] for s in manifest["sites"]]
    assert site_rates == dpatch.schedule_rates("linear", 8, 0.1)
    assert any(r != round(r, 10) for r in site_rates)  # float noise kept, bit for bit


def test_subpackages_are_attributes_of_a_plain_import() -> None:
    """``import dpatch`` then ``dpatch.depth.find_layers``: subpackages load on first use,
    and ``import dpatch`` alone stays light."""
    code = (
        "import sys, dpatch\n"
        "light = 'torch' not in sys.modules\n"
        "assert callable(dpatch.depth.find_layers) and isinstance(dpatch.tie.Tie, type)\n"
        "print(light, dpatch.settings.DEFAULTS)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "True"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import dpatch

        dpatch.nope  # noqa: B018
