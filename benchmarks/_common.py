"""Shared helpers for the benchmark scripts: timing, device description, tables, JSON."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, str]:
    import timm

    import dpatch

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "dpatch": dpatch.__version__,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return device


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(title)
    for i, r in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=False))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def write_json(path: Path | None, doc: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2))
        print(f"wrote {path}")


def versions(device: torch.device) -> dict[str, str]:
    """``environment`` plus the GPU stack: Triton and the CUDA runtime torch was built for."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        **environment(device),
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
    }


def _sleep_cycles_per_ms(device: torch.device) -> float:
    """How many ``torch.cuda._sleep`` cycles one millisecond holds on this GPU."""
    cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # wake the clocks up first
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-3)


def device_time_ms(
    fn: Callable[[], Any], device: torch.device, warmup: int, repeat: int, calls: int
) -> tuple[float, float]:
    """(median device ms per call, host microseconds per call) of ``fn``.

    On CUDA, ``calls`` back-to-back calls are timed with CUDA events while the stream is
    held by a sleep kernel long enough for the host to queue them all, so the figure is
    the GPU's execution time alone, not the host's launch overhead (reported separately:
    what the host spends queueing one call). Elsewhere: wall time per call.
    """
    if device.type != "cuda":
        return time_ms(fn, device, warmup, repeat), float("nan")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_ms = (time.perf_counter() - t0) * 1e3 / calls
    torch.cuda.synchronize(device)
    cycles = int(_sleep_cycles_per_ms(device) * (2.0 * host_ms * calls + 1.0))
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times), host_ms * 1e3


def event_time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on a GPU, wall time elsewhere."""
    if device.type != "cuda":
        return time_ms(fn, device, warmup=0, repeat=1)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))
