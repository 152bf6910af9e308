"""What a bug report needs: versions, the GPU, the state of dpatch's kernels and their
self-check, and the ``DPATCH_*`` variables (``dpatch env``).

Importing this module imports nothing heavy; :func:`collect` imports torch, and Triton
when the kernels are on.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from dpatch._version import __version__
from dpatch.settings import KERNEL_SETTINGS

if TYPE_CHECKING:
    from dpatch.kernels import SelfCheck

__all__ = ["PACKAGES", "Environment", "GpuDevice", "collect"]

#: The libraries whose versions a report lists (distribution names), in this order.
PACKAGES: tuple[str, ...] = (
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "lightning",
    "triton",
)

_CHECKED_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class GpuDevice:
    """One CUDA device as torch sees it."""

    index: int
    name: str
    capability: str  # "9.0"
    memory_gib: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "capability": self.capability,
            "memory_gib": self.memory_gib,
        }


@dataclass(frozen=True)
class Environment:
    """The facts :func:`collect` gathered.

    Attributes:
        dpatch, python, platform: versions and the operating system.
        packages: (distribution, version or None when not installed), as in
            :data:`PACKAGES`.
        cuda: the CUDA runtime torch was built with (None: a CPU build).
        devices: the CUDA devices torch can use.
        kernels: ``"on"``, ``"interpreted"``, ``"off"`` or ``"invalid"`` (a bad
            ``DPATCH_KERNELS``).
        kernels_reason: why, in a few words.
        self_checks: the kernels' self-check per case (run by :func:`collect` where they
            would be used), empty when they are off.
        variables: the ``DPATCH_*`` environment variables (and ``TRITON_INTERPRET``).
    """

    dpatch: str
    python: str
    platform: str
    packages: tuple[tuple[str, str | None], ...]
    cuda: str | None
    devices: tuple[GpuDevice, ...]
    kernels: str
    kernels_reason: str
    self_checks: tuple[SelfCheck, ...]
    variables: tuple[tuple[str, str], ...]

    def to_dict(self) -> dict[str, Any]:
        """One JSON-ready document."""
        return {
            "dpatch": self.dpatch,
            "python": self.python,
            "platform": self.platform,
            "packages": dict(self.packages),
            "cuda": {"runtime": self.cuda, "devices": [d.to_dict() for d in self.devices]},
            "kernels": {
                "state": self.kernels,
                "reason": self.kernels_reason,
                "self_checks": [c.to_dict() for c in self.self_checks],
            },
            "variables": dict(self.variables),
        }

    def lines(self) -> list[str]:
        """The report as aligned ``name  value`` lines, to paste into an issue."""
        rows: list[tuple[str, str]] = [
            ("dpatch", self.dpatch),
            ("python", self.python),
            ("platform", self.platform),
        ]
        for name, version in self.packages:
            if name == "torch" and version is not None:
                version += f" (CUDA {self.cuda})" if self.cuda else " (CPU build)"
            rows.append((name, version or "not installed"))
        if self.devices:
            for d in self.devices:
                rows.append(
                    (
                        f"cuda:{d.index}",
                        f"{d.name}, capability {d.capability}, {d.memory_gib:g} GiB",
                    )
                )
        else:
            rows.append(("cuda", "no device"))
        rows.append(("kernels", f"{self.kernels}: {self.kernels_reason}"))
        if self.self_checks:
            for c in self.self_checks:
                rows.append(
                    ("self-check", f"{c.case}: " + ("ok" if c.ok else f"FAILED, {c.detail}"))
                )
        else:
            rows.append(("self-check", "not run (kernels not in use)"))
        if self.variables:
            rows += [(name, value) for name, value in self.variables]
        else:
            rows.append(("DPATCH_*", "none set"))
        width = max(len(name) for name, _ in rows) + 2
        return [f"{name:<{width}}{value}" for name, value in rows]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        if dist == "lightning":  # the older distribution of the same package
            return _version("pytorch-lightning")
        return None


def _kernels_state(cuda: bool, triton: bool) -> tuple[str, str]:
    setting = os.environ.get("DPATCH_KERNELS", "")
    if setting not in KERNEL_SETTINGS:
        return "invalid", f"DPATCH_KERNELS={setting!r} is not one of {KERNEL_SETTINGS}"
    if setting == "0":
        return "off", "DPATCH_KERNELS=0 (drop_add uses torch.addcmul)"
    if not triton:
        return "off", "Triton is not installed (drop_add uses torch.addcmul)"
    if setting == "interpret":
        where = "CUDA tensors compiled, " if cuda else ""
        return (
            "interpreted",
            f"DPATCH_KERNELS=interpret: {where}CPU tensors in Triton's interpreter",
        )
    if cuda:
        return "on", "training-mode drop_add on CUDA tensors"
    return "off", "no CUDA device (drop_add uses torch.addcmul)"


def collect(*, self_check: bool = True) -> Environment:
    """Gather the environment; with ``self_check``, run the kernels' self-check on the
    device they would use (the current CUDA device, or the CPU interpreter) for float32,
    bfloat16 and float16 (a few milliseconds on a GPU, a second or two in the
    interpreter)."""
    import torch

    cuda = torch.cuda.is_available()
    devices: list[GpuDevice] = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(
                GpuDevice(
                    i,
                    props.name,
                    f"{props.major}.{props.minor}",
                    round(props.total_memory / 2**30, 1),
                )
            )
    # torch's own string keeps the build's local part (2.14.1+cu130), which metadata drops.
    packages = tuple(
        (name, torch.__version__ if name == "torch" else _version(name)) for name in PACKAGES
    )
    has_triton = dict(packages)["triton"] is not None
    state, reason = _kernels_state(cuda, has_triton)
    checks: tuple[SelfCheck, ...] = ()
    if self_check and state in ("on", "interpreted"):
        from dpatch import kernels

        device = "cuda" if state == "on" else "cpu"
        checks = tuple(
            kernels.check_case(device, getattr(torch, name), getattr(torch, name), (0, 1, 2))
            for name in _CHECKED_DTYPES
        )
    variables = tuple(
        sorted(
            (k, v)
            for k, v in os.environ.items()
            if k.startswith("DPATCH_") or k == "TRITON_INTERPRET"
        )
    )
    return Environment(
        dpatch=__version__,
        python=sys.version.split()[0],
        platform=platform.platform(),
        packages=packages,
        cuda=torch.version.cuda,
        devices=tuple(devices),
        kernels=state,
        kernels_reason=reason,
        self_checks=checks,
        variables=variables,
    )
