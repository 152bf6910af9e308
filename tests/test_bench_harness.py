"""The benchmark harness's logic (``benchmarks/_common.py``): interleaving order, paired
ratios, statistics, failures, the JSON document. Fake timers only: nothing here is timed."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
_spec = importlib.util.spec_from_file_location("bench_common", _PATH)
assert _spec is not None and _spec.loader is not None
common = importlib.util.module_from_spec(_spec)
sys.modules["bench_common"] = common  # dataclasses look their module up by name
_spec.loader.exec_module(common)


def fake_timer(values: dict[str, list[float]], log: list[str]) -> Callable[..., float]:
    """A timer that calls the case (which logs its name) and returns the next value listed
    for that name, so every sample is known in advance."""
    taken = {k: iter(v) for k, v in values.items()}

    def timer(fn: Callable[[], Any]) -> float:
        fn()
        return next(taken[log[-1]])

    return timer


def logging_cases(names: list[str], log: list[str]) -> list[Any]:
    return [common.Case(n, lambda n=n: log.append(n)) for n in names]


def test_rounds_rotate_the_first_case_and_warmup_comes_first() -> None:
    log: list[str] = []
    names = ["a", "b", "c"]
    values = {n: [1.0] * 4 for n in names}
    timing = common.interleave(
        logging_cases(names, log), rounds=4, warmup=2, timer=fake_timer(values, log)
    )
    warm = ["a", "b", "c"] * 2
    timed = ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert log == warm + timed
    assert [list(r) for r in timing.order] == [timed[i : i + 3] for i in range(0, 12, 3)]
    assert timing.rounds == 4 and timing.warmup == 2
    assert all(len(s) == 4 for s in timing.samples.values())


def test_samples_stay_in_their_round_and_ratios_are_paired_within_a_round() -> None:
    log: list[str] = []
    # a slow second round for both: paired ratios are all 2, the ratio of medians is not
    values = {"base": [1.0, 10.0, 1.0], "new": [2.0, 20.0, 2.0]}
    timing = common.interleave(
        logging_cases(["base", "new"], log), rounds=3, warmup=0, timer=fake_timer(values, log)
    )
    assert timing.samples == {"base": (1.0, 10.0, 1.0), "new": (2.0, 20.0, 2.0)}
    assert timing.ratios("new", "base") == [2.0, 2.0, 2.0]
    r = timing.ratio("new", "base")
    assert (r.median, r.low, r.high, r.n) == (2.0, 2.0, 2.0, 3)
    # unpaired, a drift between rounds shows up as spread that paired ratios do not have
    values = {"base": [1.0, 2.0, 3.0], "new": [1.1, 2.2, 3.3]}
    log.clear()
    drift = common.interleave(
        logging_cases(["base", "new"], log), rounds=3, warmup=0, timer=fake_timer(values, log)
    )
    assert drift.ratio("new", "base").low == pytest.approx(1.1)
    assert drift.ratio("new", "base").high == pytest.approx(1.1)


def test_spread_statistics() -> None:
    s = common.Spread.of([4.0, 1.0, 100.0, 3.0, 2.0, math.nan])
    assert (s.median, s.low, s.high, s.q1, s.q3, s.n) == (3.0, 1.0, 100.0, 2.0, 4.0, 5)
    one = common.Spread.of([7.0])
    assert (one.median, one.q1, one.q3, one.n) == (7.0, 7.0, 7.0, 1)
    empty = common.Spread.of([math.nan])
    assert empty.n == 0 and empty.cell() == "-" and empty.ratio_cell() == "-"
    assert common.Spread.of([1.38, 1.43, 1.51]).cell() == "1.43 ms [1.38-1.51] n=3"
    assert common.Spread.of([1.05, 1.10, 1.16]).ratio_cell() == "1.10x [1.05-1.16]"
    assert common.Spread.of([0.7]).cell("GiB") == "0.700 GiB [0.700-0.700] n=1"
    assert [common.number(v) for v in (1330.4, 13.34, 0.087, 0.0, math.inf)] == [
        "1330",
        "13.3",
        "0.0870",
        "0",
        "-",
    ]


def test_setup_context_and_scale() -> None:
    events: list[str] = []

    @contextlib.contextmanager
    def around() -> Iterator[None]:
        events.append("enter")
        yield
        events.append("exit")

    def setup() -> str:
        events.append("setup")
        return "fresh"

    case = common.Case(
        "c", lambda arg: events.append(f"run {arg}"), setup=setup, context=around, scale=0.5
    )
    timing = common.interleave([case], rounds=2, warmup=1, timer=lambda fn: (fn(), 8.0)[1])
    assert events == ["enter", "setup", "run fresh", "exit"] * 3
    assert timing.samples == {"c": (4.0, 4.0)}


def test_a_failing_case_is_recorded_and_left_out_with_keep_going() -> None:
    calls = {"n": 0}

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory\nmore lines")

    cases = [common.Case("ok", lambda: None), common.Case("flaky", flaky)]
    ms = iter(float(v) for v in range(1, 100))
    timing = common.interleave(
        cases, rounds=3, warmup=0, timer=lambda fn: (fn(), next(ms))[1], keep_going=True
    )
    assert timing.errors == {"flaky": "RuntimeError: out of memory"}
    assert calls["n"] == 2  # not called again after failing
    assert math.isnan(timing.samples["flaky"][1]) and math.isnan(timing.samples["flaky"][2])
    assert len(timing.ratios("flaky", "ok")) == 1
    with pytest.raises(RuntimeError, match="out of memory"):
        calls["n"] = 0
        common.interleave(cases, rounds=3, warmup=0, timer=lambda fn: (fn(), 1.0)[1])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1, but got 0"):
        common.interleave({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="distinct"):
        common.interleave([common.Case("a", print), common.Case("a", print)], rounds=1)


def test_json_holds_every_raw_sample_and_round_trips() -> None:
    log: list[str] = []
    values = {"a": [1.0, 2.0], "b": [3.0, 4.0]}
    timing = common.interleave(
        logging_cases(["a", "b"], log), rounds=2, warmup=0, timer=fake_timer(values, log)
    )
    doc = json.loads(json.dumps(timing.as_dict()))  # plain JSON, no NaN
    assert doc["samples"] == {"a": [1.0, 2.0], "b": [3.0, 4.0]}
    assert doc["order"] == [["a", "b"], ["b", "a"]]
    assert doc["stats"]["b"] == {
        "median": 3.5,
        "low": 3.0,
        "high": 4.0,
        "q1": 3.25,
        "q3": 3.75,
        "n": 2,
    }
    assert set(doc) == {"unit", "rounds", "warmup", "order", "samples", "stats", "errors"}
    assert common.Timing.from_dict(doc) == timing


def test_command_line_leaves_out_output_files() -> None:
    argv = ["/x/benchmarks/residual_op.py", "--json", "out.json", "--quick", "--png=a.png"]
    assert common.command_line(argv) == "python benchmarks/residual_op.py --quick"


def test_run_prints_markdown_and_writes_the_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["benchmarks/demo.py", "--quick"])
    p = common.parser("Demo.", rounds=(10, 2), warmup=(3, 1))
    args = p.parse_args(["--quick", "--json", str(tmp_path / "demo.json")])
    run = common.Run("demo", args)
    assert (run.rounds, run.warmup) == (2, 1)
    timing = run.interleave("k", [common.Case("a", lambda: None)], timer=lambda fn: 1.5)
    run.table("Title", ["x", "ms"], [["row|1", timing.spread("a")]], note="a note")
    run.finish()
    out = capsys.readouterr().out
    assert "## demo" in out and "torch threads" in out
    assert "| x | ms |\n|---|---|\n| row\\|1 | 1.50 ms [1.50-1.50] n=2 |" in out
    assert "<sub>`python benchmarks/demo.py --quick`; a note</sub>" in out
    doc = json.loads((tmp_path / "demo.json").read_text())
    assert doc["command"] == "python benchmarks/demo.py --quick"
    assert doc["timings"]["k"]["samples"] == {"a": [1.5, 1.5]}
    assert doc["tables"][0]["rows"] == [["row\\|1", "1.50 ms [1.50-1.50] n=2"]]
    assert {"cpu", "threads", "torch", "timm", "dpatch"} <= set(doc["environment"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings: Linux only")
def test_hold_freed_memory_runs_the_script_again_with_the_heap_held(tmp_path: Path) -> None:
    """The script starts over once, same arguments, with ``HELD_HEAP`` in its environment;
    the second start finds it there and goes on."""
    import os
    import subprocess

    script = tmp_path / "demo.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(_PATH.parent)!r})\n"
        "import _common\n"
        "print('start', sys.argv[1:], _common.heap_held(), flush=True)\n"
        "_common.hold_freed_memory()\n"
        "print('go on', os.environ['MALLOC_TRIM_THRESHOLD_'], flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, str(script), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "start ['--quick'] False",
        "start ['--quick'] True",
        f"go on {common.HELD_HEAP['MALLOC_TRIM_THRESHOLD_']}",
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, /proc")
def test_hold_freed_memory_here_keeps_a_freed_block_resident(tmp_path: Path) -> None:
    """A 24 MiB block freed under glibc's defaults goes back to the OS (resident memory
    drops); after ``hold_freed_memory_here()`` it stays in the heap. Each case runs in its
    own process: mallopt changes the process for good."""
    import subprocess

    script = tmp_path / "demo.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(_PATH.parent)!r})\n"
        "import _common, torch\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'):\n"
        "            return int(line.split()[1]) / 1024\n"
        "held = _common.hold_freed_memory_here() if sys.argv[1] == 'held' else False\n"
        "x = torch.ones(6 << 20)\n"  # 24 MiB, touched
        "before = rss()\n"
        "del x\n"
        "print(held, round(before - rss()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    drops = {}
    for case in ("default", "held"):
        done = subprocess.run(
            [sys.executable, str(script), case], capture_output=True, text=True, env=env,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        held, drop = done.stdout.split()
        assert held == str(case == "held")
        drops[case] = int(drop)
    assert drops["default"] >= 20, drops  # MiB given back at the free
    assert drops["held"] <= 2, drops
