"""What pruning saved: parameters, file bytes and eval latency before and after
:func:`dpatch.prune`, measured on one device."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dpatch.analysis import materialise
from dpatch.depth._data import random_inputs
from dpatch.depth._prune import unused_state_keys
from dpatch.errors import InvalidValueError

__all__ = ["PruneStats", "measure_pruning"]


@dataclass(frozen=True)
class PruneStats:
    """What pruning saved, measured on one device.

    Attributes:
        parameters_before: parameters of the model before pruning.
        parameters_after: parameters the pruned model still uses (and its file holds).
        bytes_before: tensor bytes of a saved file of the unpruned model.
        bytes_after: tensor bytes of a saved file of the pruned model.
        latency_before_ms: median eval forward time before, in milliseconds.
        latency_after_ms: the same after.
        device: where the latency was measured.
        batch: the batch size timed.
        iterations: timed forward passes per model (interleaved, after 2 warm-up passes).
    """

    parameters_before: int
    parameters_after: int
    bytes_before: int
    bytes_after: int
    latency_before_ms: float
    latency_after_ms: float
    device: str
    batch: int
    iterations: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _count(model: nn.Module, leave_out: Collection[str]) -> tuple[int, int]:
    """(parameters, state bytes) outside ``leave_out`` keys, shared tensors counted once."""
    skip = set(leave_out)
    params = {id(p): p.numel() for n, p in model.named_parameters() if n not in skip}
    nbytes = sum(
        t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in skip
    )
    return sum(params.values()), nbytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_pruning(
    original: nn.Module,
    pruned: nn.Module,
    *,
    device: str = "cpu",
    iterations: int = 10,
    batch: int = 1,
    example_inputs: Sequence[Any] | None = None,
) -> PruneStats:
    """Parameters, file bytes and eval latency of a model before and after :func:`prune`.

    Both models are moved to ``device`` and timed in eval mode, interleaved (so drift on a
    shared machine does not favour one), on random inputs of the model's input size (or
    ``example_inputs``; meta tensors among them stand for random inputs of their shape).

    Raises:
        InvalidValueError: a bad device or iteration count.
    """
    if iterations < 1:
        raise InvalidValueError(f"iterations must be >= 1, but got {iterations!r}")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InvalidValueError(f"unknown device {device!r} ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidValueError(f"device {device!r} asked for, but CUDA is not available")
    p0, b0 = _count(original, ())
    p1, b1 = _count(pruned, unused_state_keys(pruned))
    if example_inputs is None:
        inputs: tuple[Any, ...] = (random_inputs(original, batch),)
    else:
        inputs = tuple(example_inputs)
    # meta tensors (a shape, as the probe takes them) become random ones on the device
    inputs = tuple(
        (materialise(x, dev) if x.is_meta else x.to(dev)) if isinstance(x, Tensor) else x
        for x in inputs
    )
    times: list[list[float]] = [[], []]
    models = [original.to(dev).eval(), pruned.to(dev).eval()]
    with torch.no_grad():
        for i in range(iterations + 2):
            for j, m in enumerate(models):
                _sync(dev)
                t0 = time.perf_counter()
                m(*inputs)
                _sync(dev)
                if i >= 2:
                    times[j].append((time.perf_counter() - t0) * 1e3)
    return PruneStats(
        p0,
        p1,
        b0,
        b1,
        statistics.median(times[0]),
        statistics.median(times[1]),
        str(dev),
        int(inputs[0].shape[0]) if isinstance(inputs[0], Tensor) and inputs[0].dim() else batch,
        iterations,
    )
