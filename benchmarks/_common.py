"""The harness every benchmark script uses: shared options, interleaved timing, statistics
with their spread, Markdown tables and a JSON file with every raw sample.

Timing (``interleave``): the configurations being compared are timed round-robin, one
sample of each per round (the first configuration rotating from round to round), after
``warmup`` untimed calls of each, so load drifts on a shared machine hit them alike. Every
figure is the median of the rounds with its spread (``Spread``: min-max, interquartile
range, n); a ratio is taken pair by pair within a round (``Timing.ratio``), then
summarised the same way, so a slow round does not turn into a fast ratio.

Output (``Run``): a Markdown header (what ran, on what: CPU model, torch threads, load
average, versions), Markdown tables each followed by the command that produced them, and
with ``--json FILE`` one document holding the tables and every raw sample.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Milliseconds of one sample of a callable (the timer decides how, and how many calls).
Timer = Callable[[Callable[[], Any]], float]


# --------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Spread:
    """The median of some samples with their spread: min-max, interquartile range, count."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        """Statistics of the finite ``samples`` (NaN marks a sample not taken)."""
        values = sorted(v for v in samples if math.isfinite(v))
        if not values:
            nan = math.nan
            return cls(nan, nan, nan, nan, nan, 0)
        if len(values) == 1:
            q1 = q3 = values[0]
        else:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), values[0], values[-1], q1, q3, len(values))

    def cell(self, unit: str = "ms") -> str:
        """``1.43 ms [1.38-1.51] n=15``: median [min-max] and the number of samples."""
        if self.n == 0:
            return "-"
        u = f" {unit}" if unit else ""
        return f"{number(self.median)}{u} [{number(self.low)}-{number(self.high)}] n={self.n}"

    def ratio_cell(self) -> str:
        """``1.10x [1.05-1.16]``: median ratio [min-max]."""
        if self.n == 0:
            return "-"
        return f"{number(self.median)}x [{number(self.low)}-{number(self.high)}]"

    def as_dict(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in vars(self).items()}


def number(value: float) -> str:
    """Three significant digits, never in exponent form (``1330``, ``13.3``, ``0.0870``)."""
    if not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Case:
    """One configuration to time.

    ``run`` is called with no argument, or, when ``setup`` is given, with what ``setup``
    returned (``setup`` runs untimed before every sample: a fresh model to inject into).
    ``context``, when given, makes a context manager entered untimed around every sample
    (an environment setting, a peak-memory probe). A sample is the timer's milliseconds
    times ``scale`` (``1e-3 / n``: seconds per item of a sample that handles ``n``).
    """

    name: str
    run: Callable[..., Any]
    setup: Callable[[], Any] | None = None
    context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    scale: float = 1.0

    def sample(self, timer: Timer) -> float:
        with self.context() if self.context is not None else contextlib.nullcontext():
            if self.setup is None:
                return timer(self.run) * self.scale
            arg = self.setup()
            return timer(lambda: self.run(arg)) * self.scale


@dataclass(frozen=True)
class Timing:
    """Samples of interleaved configurations: ``samples[name][r]`` is round ``r`` (NaN
    when that configuration had failed by then; ``errors`` says why)."""

    names: tuple[str, ...]
    samples: dict[str, tuple[float, ...]]
    order: tuple[tuple[str, ...], ...]  # the order of the timed samples, round by round
    warmup: int
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return len(self.order)

    def spread(self, name: str) -> Spread:
        return Spread.of(self.samples[name])

    def ratios(self, name: str, baseline: str) -> list[float]:
        """``name / baseline`` round by round (rounds where either is missing left out)."""
        return [
            a / b
            for a, b in zip(self.samples[name], self.samples[baseline], strict=True)
            if math.isfinite(a) and math.isfinite(b) and b > 0
        ]

    def ratio(self, name: str, baseline: str) -> Spread:
        return Spread.of(self.ratios(name, baseline))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Timing:
        """The inverse of ``as_dict`` (a timing measured in another process)."""
        return cls(
            tuple(doc["samples"]),
            {
                k: tuple(math.nan if v is None else float(v) for v in vs)
                for k, vs in doc["samples"].items()
            },
            tuple(tuple(r) for r in doc["order"]),
            int(doc["warmup"]),
            dict(doc.get("errors", {})),
        )

    def as_dict(self, unit: str = "ms") -> dict[str, Any]:
        """Every raw sample, the order they were taken in, and the statistics."""
        return {
            "unit": unit,
            "rounds": self.rounds,
            "warmup": self.warmup,
            "order": [list(r) for r in self.order],
            "samples": {k: [_finite(v) for v in s] for k, s in self.samples.items()},
            "stats": {k: self.spread(k).as_dict() for k in self.names},
            "errors": dict(self.errors),
        }


def interleave(
    cases: Sequence[Case] | Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int = 1,
    timer: Timer | None = None,
    keep_going: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Timing:
    """Time ``cases`` round-robin: ``warmup`` untimed calls of each (interleaved too), then
    ``rounds`` rounds of one sample each, round ``r`` starting at case ``r mod len(cases)``.

    ``timer`` (default: wall time of one call, ``wall_timer()``) turns a callable into the
    milliseconds of one sample. With ``keep_going`` a case that raises is recorded in
    ``errors`` and left out of the following rounds; otherwise the error propagates.
    """
    if rounds < 1:
        raise ValueError(f"rounds has to be at least 1, but got {rounds}")
    if isinstance(cases, Mapping):
        cases = [Case(name, fn) for name, fn in cases.items()]
    names = tuple(c.name for c in cases)
    if len(set(names)) != len(names):
        raise ValueError(f"case names have to be distinct, but got {names}")
    timer = timer or wall_timer()
    samples: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}

    def attempt(case: Case, with_timer: Timer) -> float:
        """One sample of ``case`` (NaN once it has failed)."""
        if case.name in errors:
            return math.nan
        try:
            return case.sample(with_timer)
        except Exception as exc:
            if not keep_going:
                raise
            errors[case.name] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            if progress is not None:
                progress(f"{case.name}: {errors[case.name]}")
            return math.nan

    def untimed(fn: Callable[[], Any]) -> float:
        fn()
        return 0.0

    for _ in range(warmup):
        for case in cases:
            attempt(case, untimed)
    order = []
    for r in range(rounds):
        start = r % len(cases)
        turn = [*cases[start:], *cases[:start]]
        for case in turn:
            samples[case.name].append(attempt(case, timer))
        order.append(tuple(c.name for c in turn))
        if progress is not None:
            progress(
                f"round {r + 1}/{rounds}: "
                + ", ".join(f"{c.name} {number(samples[c.name][-1])}" for c in cases)
            )
    return Timing(names, {n: tuple(v) for n, v in samples.items()}, tuple(order), warmup, errors)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_timer(device: torch.device | None = None, calls: int = 1) -> Timer:
    """Wall milliseconds per call, averaged over ``calls`` back-to-back calls (the device
    synchronised before and after)."""
    dev = device or torch.device("cpu")

    def timer(fn: Callable[[], Any]) -> float:
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(dev)
        return (time.perf_counter() - t0) * 1e3 / calls

    return timer


def event_timer(device: torch.device) -> Timer:
    """Milliseconds of one call: CUDA events on a GPU, wall time elsewhere."""
    if device.type != "cuda":
        return wall_timer(device)

    def timer(fn: Callable[[], Any]) -> float:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    return timer


def _sleep_cycles_per_ms() -> float:
    """How many ``torch.cuda._sleep`` cycles one millisecond holds on this GPU."""
    cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # wake the clocks up first
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-3)


def host_us(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Microseconds the host spends per call queueing ``calls`` back-to-back calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    sync(device)
    return elapsed * 1e6 / calls


def queued_timer(device: torch.device, calls: int, hold_ms: float) -> Timer:
    """Device milliseconds per call of ``calls`` back-to-back calls, the stream held by a
    sleep kernel of ``hold_ms`` until the host has queued them all, so the figure is the
    GPU's execution time, not the host's launch overhead. Elsewhere: wall time per call."""
    if device.type != "cuda":
        return wall_timer(device, calls)
    cycles = int(_sleep_cycles_per_ms() * hold_ms)

    def timer(fn: Callable[[], Any]) -> float:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / calls

    return timer


# --------------------------------------------------------------------------- a run
def parser(
    doc: str,
    *,
    rounds: tuple[int, int] | None = None,
    warmup: tuple[int, int] | None = None,
    device: str = "cpu",
) -> argparse.ArgumentParser:
    """The options every script shares. ``rounds`` and ``warmup`` are the script's
    defaults, (full, ``--quick``); None: the script times nothing that way."""
    p = argparse.ArgumentParser(
        description=doc.strip().splitlines()[0] if doc.strip() else None,
        epilog=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default=device, help=f"cpu or cuda (default: {device})")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: fewer rounds, small sizes, one thread"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="write tables and raw samples here")
    if rounds is not None:
        p.add_argument(
            "--rounds", type=int, default=None, help=f"timed rounds (default {rounds[0]})"
        )
    if warmup is not None:
        p.add_argument(
            "--warmup", type=int, default=None, help=f"untimed calls of each (default {warmup[0]})"
        )
    p.set_defaults(default_rounds=rounds or (1, 1), default_warmup=warmup or (0, 0))
    return p


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


#: glibc settings under which freed memory stays in the process's heap: blocks over the
#: mmap threshold (128 KiB, moving with what was freed) otherwise go back to the OS when
#: freed and are faulted in again, page by page, when next allocated. 32 MiB is the largest
#: threshold glibc takes on 64-bit.
HELD_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def heap_held() -> bool:
    """Whether this process runs with ``HELD_HEAP``."""
    return all(os.environ.get(k) == v for k, v in HELD_HEAP.items())


def hold_freed_memory() -> None:
    """Run this script again, same arguments, with glibc keeping freed memory in the heap
    (``HELD_HEAP``); nothing on a system other than Linux or when it already does.

    For timing an elementwise op: an expression with two large temporaries (timm's
    ``x + DropPath(b)``) otherwise pays for page faults at every call in some processes
    and not in others, depending on what glibc's moving threshold saw first."""
    if not sys.platform.startswith("linux") or heap_held():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **HELD_HEAP})


def hold_freed_memory_here() -> bool:
    """``HELD_HEAP``'s settings in this running process, through glibc's ``mallopt``: for a
    worker process that times (its parent may measure memory, where the defaults belong).
    False, changing nothing, where the C library has no ``mallopt`` (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mmap = int(HELD_HEAP["MALLOC_MMAP_THRESHOLD_"])
    # mallopt takes an int: the trim threshold is capped at 2 GiB - 1 (the env var's 4 GiB
    # does not fit), as far beyond the largest heap these scripts use
    trim = min(int(HELD_HEAP["MALLOC_TRIM_THRESHOLD_"]), 2**31 - 1)
    return bool(mallopt(m_mmap_threshold, mmap)) and bool(mallopt(m_trim_threshold, trim))


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    import timm

    import dpatch

    env: dict[str, Any] = {
        "device": device_name(device),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "dpatch": dpatch.__version__,
        "malloc": "freed memory held in the heap" if heap_held() else "default",
    }
    if device.type == "cuda":
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = "absent"
        env["cuda"] = torch.version.cuda or "none"
    return env


#: Options that name where output goes: left out of the command a table shows.
OUTPUT_OPTIONS = ("--json", "--png")


def command_line(argv: Sequence[str] | None = None) -> str:
    """``python benchmarks/NAME.py ARGS`` as run, less the options naming output files."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    shown = f"benchmarks/{script.name}" if script.parent.name == "benchmarks" else str(script)
    args, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
        elif a in OUTPUT_OPTIONS:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in OUTPUT_OPTIONS)):
            args.append(a)
    return shlex.join(["python", shown, *args])


class Run:
    """One script's run: options applied, the header printed, tables and raw samples
    collected for ``--json``."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        # a smoke run takes one thread unless told: two OpenMP threads on a 2-core machine
        # with anything else running stall for scheduler slices (tiny steps took seconds)
        threads = args.threads or (1 if args.quick else None)
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is available")
        self.name = name
        self.args = args
        self.quick: bool = args.quick
        pick = 1 if args.quick else 0
        rounds, warmup = getattr(args, "rounds", None), getattr(args, "warmup", None)
        self.rounds: int = rounds if rounds is not None else args.default_rounds[pick]
        self.warmup: int = warmup if warmup is not None else args.default_warmup[pick]
        self.command = command_line()
        self.env = environment(self.device)
        self.started = time.perf_counter()
        self.tables: list[dict[str, Any]] = []
        self.timings: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        e = self.env
        where = e["device"] if self.device.type == "cuda" else f"{e['cpu']}, {e['cpus']} CPUs"
        load = f", load average {e['load'][0]}" if e["load"] else ""
        print(f"## {name}\n")
        print(f"`{self.command}`\n")
        print(
            f"{where}; {e['threads']} torch threads{load}; torch {e['torch']}, timm {e['timm']}, "
            f"dpatch {e['dpatch']}, Python {e['python']}\n",
            flush=True,
        )

    def note(self, text: str) -> None:
        """A progress line (stderr: not part of the report)."""
        print(f"  {text}", file=sys.stderr, flush=True)

    def interleave(
        self, key: str, cases: Sequence[Case], unit: str = "ms", **kwargs: Any
    ) -> Timing:
        """``interleave`` with this run's rounds and warm-up; the samples go to the JSON
        under ``key``."""
        kwargs.setdefault("rounds", self.rounds)
        kwargs.setdefault("warmup", self.warmup)
        kwargs.setdefault("progress", lambda s: self.note(f"{key} {s}"))
        timing = interleave(cases, **kwargs)
        self.record(key, timing, unit)
        return timing

    def record(self, key: str, timing: Timing, unit: str = "ms") -> None:
        self.timings[key] = timing.as_dict(unit)

    def table(
        self, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], note: str = ""
    ) -> None:
        """A Markdown table, then the command that produced it (and ``note``)."""
        cells = [[_cell(c) for c in r] for r in rows]
        print(f"**{title}**\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for r in cells:
            print("| " + " | ".join(r) + " |")
        tail = f"`{self.command}`" + (f"; {note}" if note else "")
        print(f"\n<sub>{tail}</sub>\n", flush=True)
        self.tables.append({"title": title, "header": list(header), "rows": cells, "note": note})

    def finish(self) -> None:
        """The elapsed time; the JSON document when ``--json`` was given."""
        elapsed = time.perf_counter() - self.started
        print(f"{self.name}: {elapsed:.0f} s\n", flush=True)
        path: Path | None = self.args.json
        if path is None:
            return
        doc = {
            "benchmark": self.name,
            "command": self.command,
            "environment": self.env,
            "options": {
                k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()
            },
            "elapsed_s": elapsed,
            "tables": self.tables,
            "timings": self.timings,
            **self.extra,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        tmp.replace(path)
        print(f"wrote {path}", file=sys.stderr)


def _cell(value: Any) -> str:
    if isinstance(value, Spread):
        return value.cell()
    if isinstance(value, float):
        return number(value)
    return str(value).replace("|", "\\|")


@contextlib.contextmanager
def environ(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the duration."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
