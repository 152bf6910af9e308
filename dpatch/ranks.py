"""Batch-mode stochastic depth that stays in step across distributed ranks (DDP, FSDP2).

Batch mode drops a branch for the whole batch (LayerDrop's semantics). Under DDP and FSDP
every rank must then agree on each decision, and a dropped branch must not leave its
parameters out of the step: DDP with ``find_unused_parameters=False`` (or ``static_graph``)
waits for a gradient of every parameter, and FSDP reduce-scatters the same gradients on
every rank. Three pieces make that hold:

- :func:`attach_zero_grads`: the output of a dropped branch (the shortcut, copied) with the
  branch's parameters attached; backward gives each of them a zero gradient. It costs one
  zero fill per parameter in backward (the memory a kept branch's gradient would take
  anyway) and no forward compute, so DDP's buckets stay static and FSDP's reductions match
  while the branch's compute is skipped.
- :class:`Replay`: a branch's decisions, so that activation checkpointing, which runs a
  forward again inside backward, recomputes the branch the same way (the host generator
  that draws them is not part of the RNG state checkpointing saves and restores; a tag
  drawn from torch's CPU generator, which is, finds the decision again).
- :class:`RankCheck`: shared by the slots of one patched model; the first training call of
  a batch-mode slot compares every rank's sites, seeds and draw counts with one small
  collective (only when a process group is initialised) and raises
  :class:`~dpatch.errors.RankMismatchError` naming the difference, instead of letting ranks
  drop different branches. Later calls cost one attribute test.

Nothing here knows models beyond "a slot has a mode, skip flag, seed and draw count".
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from dpatch.errors import RankMismatchError, first_line

__all__ = [
    "RANK_CHECK_TIMEOUT",
    "RankCheck",
    "Replay",
    "SlotState",
    "attach_zero_grads",
    "describe_mismatch",
    "in_backward",
]

#: How long the first-step check waits for the other ranks; None: the process group's own
#: timeout (``init_process_group(timeout=...)``; by default 10 min for NCCL, 30 min for
#: gloo). A rank that never arrives runs other code; a shorter wait could fail a job
#: whose ranks merely reach their first step minutes apart (a slow first batch).
RANK_CHECK_TIMEOUT: datetime.timedelta | None = None

# Enough for every forward a training step runs before its backward (multi-crop
# self-supervision runs a handful); older entries belong to forwards no backward needs.
_REPLAY_DEPTH = 64
_TAGS = 2**62


# --------------------------------------------------------------------------- zero gradients
class _ZeroGrads(torch.autograd.Function):
    """``residual.clone()`` whose backward also gives every parameter a zero gradient."""

    @staticmethod
    def forward(ctx: Any, residual: Tensor, *params: Tensor) -> Tensor:
        # The parameters themselves, not save_for_backward: only their metadata is read, and
        # FSDP2 frees an unsharded parameter's storage between forward and backward.
        ctx.params = params
        return residual.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        zeros = [
            torch.zeros_like(p, memory_format=torch.preserve_format) if need else None
            for p, need in zip(ctx.params, ctx.needs_input_grad[1:], strict=True)
        ]
        return (grad if ctx.needs_input_grad[0] else None, *zeros)


def attach_zero_grads(residual: Tensor, params: Sequence[Tensor]) -> Tensor:
    """A copy of ``residual`` (a dropped branch's output) through which every parameter in
    ``params`` that requires grad receives a zero gradient in backward.

    Exactly the values of ``residual`` (no arithmetic on them) and exactly zero gradients
    (not ``0 * grad``, which an inf in ``grad`` would turn into NaN). Meant for a branch
    that is not computed: DDP and FSDP see the same parameters take part in every step.
    """
    live = [p for p in params if p.requires_grad]
    if not live or not torch.is_grad_enabled():
        return residual.clone()
    out: Tensor = _ZeroGrads.apply(residual, *live)
    return out


# --------------------------------------------------------------------------- replay
def in_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread: a forward called
    now is activation checkpointing recomputing one (reentrant or not)."""
    return bool(torch._C._current_graph_task_id() >= 0)


class Replay:
    """The batch decisions of one slot, for checkpointing's recomputation to reuse.

    Activation checkpointing runs a region's forward again in backward, after restoring
    torch's CPU (and device) RNG state to what it was when the region first ran; the host
    generator batch mode draws from is not part of that state. So each decision is filed
    under a tag drawn from torch's default CPU generator: the recomputation draws the same
    tag (the RNG state is restored) and finds the decision the forward took, whichever
    order backward visits regions in and whether or not it recomputes a region at all.
    The tag is drawn in every call, forward or recompute, so both consume the CPU stream
    alike and the region's other random ops see the numbers they saw the first time.
    Checkpointing with ``preserve_rng_state=False`` restores no state: the tag is then not
    found, and the slot raises :class:`~dpatch.errors.ReplayError` rather than recompute
    another branch than the forward ran.
    """

    def __init__(self) -> None:
        self._kept: OrderedDict[int, bool] = OrderedDict()

    @staticmethod
    def tag() -> int:
        """A fresh tag from torch's default CPU generator (one draw)."""
        return int(torch.randint(_TAGS, ()).item())

    def record(self, tag: int, keep: bool) -> None:
        self._kept[tag] = keep
        if len(self._kept) > _REPLAY_DEPTH:  # forwards no backward ever needed
            self._kept.popitem(last=False)

    def take(self, tag: int) -> bool | None:
        """The decision filed under ``tag`` (and forget it), or None when there is none."""
        return self._kept.pop(tag, None)

    def __len__(self) -> int:
        return len(self._kept)


# --------------------------------------------------------------------------- rank check
class _BatchSlot(Protocol):
    """What the check reads from a slot (:class:`dpatch.DropPath`)."""

    mode: str
    skip: bool
    seed: int | None

    @property
    def draws(self) -> int: ...


@dataclass(frozen=True)
class SlotState:
    """One site as the rank check compares it.

    Attributes:
        site: the site's name in the model.
        mode: ``"row"`` or ``"batch"``.
        skip: compute-skipping on.
        seed: the batch-mode seed (None in row mode, where ranks need not agree).
        draws: batch decisions drawn so far (ranks that ran different numbers of training
            forwards have diverged even with equal seeds).
    """

    site: str
    mode: str
    skip: bool
    seed: int | None
    draws: int


class RankCheck:
    """Compare the batch-mode sites of every rank once, at the first training call.

    Shared by the slots of one patched model (``inject``/``retune`` attach it). Set the
    environment variable ``DPATCH_RANK_CHECK=0`` to turn it off where ranks hold different
    models on purpose (pipeline stages).
    """

    def __init__(self, slots: Sequence[tuple[str, _BatchSlot]]) -> None:
        self._slots = tuple(slots)
        self.done = False

    def __getstate__(self) -> dict[str, Any]:
        # A copy or an unpickled model may train in another job: compare its ranks anew.
        return {**self.__dict__, "done": False}

    def states(self) -> tuple[SlotState, ...]:
        """Every site's state now, in the model's site order."""
        return tuple(
            SlotState(
                name,
                s.mode,
                bool(s.skip),
                s.seed if s.mode == "batch" else None,
                s.draws if s.mode == "batch" else 0,
            )
            for name, s in self._slots
        )

    def run(self) -> None:
        """The check itself; a no-op after the first call that found a process group.

        Raises:
            RankMismatchError: the ranks' sites, settings, seeds or draw counts differ, or a
                rank did not join within :data:`RANK_CHECK_TIMEOUT` (default: the process
                group's timeout).
        """
        if self.done:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return  # checked at the first call after init_process_group
        self.done = True  # before the collective: a failure is raised once, not every step
        world = dist.get_world_size()
        if world < 2 or os.environ.get("DPATCH_RANK_CHECK", "1") == "0":
            return
        states = self.states()
        digest = hashlib.blake2b(repr(states).encode(), digest_size=8).digest()
        device = _collective_device(dist.get_backend())
        mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], device=device)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        work = dist.all_gather(everyone, mine, async_op=True)
        try:
            assert work is not None
            if RANK_CHECK_TIMEOUT is None:
                work.wait()
            else:
                work.wait(timeout=RANK_CHECK_TIMEOUT)
        except RuntimeError as exc:
            waited = (
                "the process group's timeout"
                if RANK_CHECK_TIMEOUT is None
                else _duration(RANK_CHECK_TIMEOUT)
            )
            raise RankMismatchError(
                f"rank {dist.get_rank()} waited {waited} for the other "
                "ranks to compare their batch-mode stochastic depth, and some never did "
                f"({first_line(exc, 80)}): is the model patched the same way on every rank? "
                "(set DPATCH_RANK_CHECK=0 if ranks hold different models on purpose)"
            ) from exc
        if all(int(t.item()) == int(mine.item()) for t in everyone):
            return
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, states)
        raise RankMismatchError(describe_mismatch(gathered))


def _collective_device(backend: str) -> torch.device:
    # NCCL moves CUDA tensors only; every other backend (gloo, mpi, ucc) takes CPU ones.
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _duration(td: datetime.timedelta) -> str:
    seconds = td.total_seconds()
    return f"{seconds:g} s" if seconds < 60 else f"{seconds / 60:g} min"


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return (shown + f" and {len(names) - 3} more") if len(names) > 3 else (shown or "none")


def describe_mismatch(per_rank: Sequence[Sequence[SlotState]]) -> str:
    """One line naming the first difference between rank 0 and another rank."""
    fix = "patch the model the same way on every rank, with the same inject(seed=...)"
    ref = {s.site: s for s in per_rank[0]}
    for rank, states in enumerate(per_rank[1:], start=1):
        other = {s.site: s for s in states}
        if other == ref:
            continue
        if other.keys() != ref.keys():
            only0 = [n for n in ref if n not in other]
            only_r = [n for n in other if n not in ref]
            return (
                f"rank {rank} patched other sites than rank 0 ({len(other)} vs {len(ref)}; "
                f"only on rank 0: {_few(only0)}; only on rank {rank}: {_few(only_r)}): {fix}"
            )
        for name, a in ref.items():
            b = other[name]
            if (a.mode, a.skip) != (b.mode, b.skip):
                return (
                    f"site {name!r} is mode={a.mode!r}, skip={a.skip} on rank 0 but "
                    f"mode={b.mode!r}, skip={b.skip} on rank {rank}: {fix}"
                )
            if a.seed != b.seed:
                return (
                    f"the batch-mode seed of site {name!r} is {a.seed} on rank 0 but {b.seed} "
                    f"on rank {rank}, so the ranks would drop different branches: pass the "
                    "same inject(seed=...) on every rank"
                )
            if a.draws != b.draws:
                return (
                    f"site {name!r} has drawn {a.draws} batch decisions on rank 0 but "
                    f"{b.draws} on rank {rank} (a rank ran other training forwards), so the "
                    "ranks would drop different branches: run the same training forwards on "
                    "every rank, or patch again before wrapping the model"
                )
    return "the ranks' batch-mode sites differ"  # pragma: no cover - digests differ only so
