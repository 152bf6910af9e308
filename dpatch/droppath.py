"""The stochastic depth op: ``drop_path``, the fused ``drop_add`` and the ``DropPath`` module.

Conventions (Huang et al. 2016; timm ``timm.layers.drop_path``; torchvision
``torchvision.ops.stochastic_depth``):

- ``mode="row"`` drops the branch per sample (one Bernoulli(1 - p) draw per entry of the
  first dimension); ``mode="batch"`` drops it for the whole batch (the paper).
- ``scaling="inverted"`` divides kept branches by ``1 - p`` in training and is the identity
  in eval (timm, torchvision); ``"expected"`` does not scale in training and multiplies the
  branch by ``1 - p`` in eval (the paper); ``"none"`` does neither.
- ``p = 1`` is allowed, as in timm and torchvision: training always drops the branch (no
  division by zero: nothing is kept, so nothing is scaled); eval follows the scaling's rule
  (identity, or the branch times ``1 - p = 0`` for ``"expected"``).

No function here reads a random value back to the host: masks stay tensors and scales are
Python floats, so nothing forces a device synchronisation. This module knows nothing of
models.

On CUDA, training-mode ``drop_add`` runs dpatch's Triton kernel (:mod:`dpatch.kernels`)
when Triton is importable and both operands share a layout the kernel reads in place;
everything else, and all code being compiled by ``torch.compile``/``torch.export`` (the
compiler fuses the mask into its own kernel, together with the branch's last op), takes
``torch.addcmul``. The environment variable ``DPATCH_KERNELS`` selects:

- unset, ``""`` or ``"1"``: the kernel for CUDA tensors;
- ``"0"``: never the kernel;
- ``"interpret"``: also CPU tensors go through the kernel, run by Triton's interpreter
  (slow and exact: how the kernel is tested without a GPU).

The first time a case (device, dtypes, memory layout) would go to the kernel, the kernel
is checked against ``addcmul`` on small tensors (:func:`dpatch.kernels.self_check`); a case
that fails uses ``addcmul`` from then on, with one warning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar, Optional, Protocol

import torch
from torch import Tensor, nn

from dpatch.errors import ReplayError
from dpatch.ranks import RankCheck, Replay, attach_zero_grads, in_backward
from dpatch.rows import scatter_add_rows
from dpatch.settings import KERNEL_SETTINGS, MODES, SCALINGS


class SharedDecision(Protocol):
    """What a slot asks of the decision it shares with the other slots of its block
    (:class:`dpatch.tie.Tie`, which hooks the block and sets ``_tie`` on its slots)."""

    @property
    def active(self) -> bool: ...

    def keep(self) -> bool: ...

    def apply(self, x: Tensor, residual: Tensor | None, alpha: float) -> Tensor: ...


__all__ = ["DropPath", "drop_add", "drop_path", "keep_count"]


def _check_prob(p: Any) -> float:
    # Same message shape as torchvision: repeat the bad value. Kept free of the schedule
    # module so the op stays importable on its own (and scriptable-adjacent code stays small).
    if isinstance(p, bool) or not isinstance(p, int | float):
        raise ValueError(f"drop probability must be a number in [0, 1], but got {p!r}")
    if not 0.0 <= p <= 1.0:  # NaN fails this too
        raise ValueError(f"drop probability has to be in [0, 1], but got {p!r}")
    return float(p)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode has to be one of {MODES}, but got {mode!r}")
    return mode


def _resolve_scaling(scale_by_keep: bool, scaling: str | None) -> str:
    if scaling is None:
        return "inverted" if scale_by_keep else "none"
    if scaling not in SCALINGS:
        raise ValueError(f"scaling has to be one of {SCALINGS}, but got {scaling!r}")
    return scaling


def _keep_mask(x: Tensor, keep_prob: float, mode: str) -> Tensor:
    """A {0, 1} mask in ``x``'s dtype: shape (B, 1, ..., 1) for rows, (1, ..., 1) for batch."""
    if x.dim() < 1:
        raise ValueError(
            f"stochastic depth needs a tensor of rank >= 1, but got shape {tuple(x.shape)}"
        )
    lead = x.shape[0] if mode == "row" else 1
    shape = (lead,) + (1,) * (x.dim() - 1)
    return x.new_empty(shape).bernoulli_(keep_prob)


def drop_path(
    x: Tensor,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    mode: str = "row",
    scaling: str | None = None,
) -> Tensor:
    """Drop ``x`` (a residual branch) per sample or per batch; a drop-in for timm's ``drop_path``.

    Args:
        x: the branch output, rank >= 1, batch first.
        drop_prob: probability p of dropping, 0 <= p <= 1.
        training: apply the random drop (eval applies only ``"expected"`` scaling).
        scale_by_keep: timm's switch; maps to ``scaling="inverted"`` / ``"none"`` when
            ``scaling`` is not given.
        mode: ``"row"`` or ``"batch"``.
        scaling: ``"inverted"``, ``"expected"`` or ``"none"``; overrides ``scale_by_keep``.

    Returns:
        ``x`` itself when nothing is dropped or scaled (eval with inverted/none scaling, or
        p == 0), else a new tensor.
    """
    p = _check_prob(drop_prob)
    _check_mode(mode)
    how = _resolve_scaling(scale_by_keep, scaling)
    if p == 0.0:
        return x
    keep = 1.0 - p
    if not training:
        return x * keep if how == "expected" else x
    mask = _keep_mask(x, keep, mode)
    if how == "inverted" and keep > 0.0:  # at p = 1 the mask is all zeros: nothing to scale
        mask.mul_(1.0 / keep)
    return x * mask


def drop_add(
    x: Tensor,
    branch: Tensor,
    drop_prob: float,
    training: bool,
    mode: str = "row",
    scaling: str = "inverted",
    alpha: float = 1.0,
) -> Tensor:
    """``x + drop_path(branch)`` in one pass over memory.

    Training uses ``torch.addcmul(x, branch, mask, value=scale)``: a single kernel with the
    (B, 1, ..., 1) mask broadcast and the scale as a host float (computed in the op's
    accumulation type, so bf16 branches are not rounded twice). On CUDA it uses dpatch's
    Triton kernel instead (see the module docstring): one float32 scale per sample, built
    on the device from the same Bernoulli draw. Eval is ``x + branch`` (or
    ``x + (1 - p) * branch`` for ``"expected"`` scaling), bit for bit the plain residual.
    At p = 1 training returns ``x`` (a new tensor; the branch stays in the graph with a zero
    gradient, as in timm).

    Args:
        x: the shortcut (never dropped).
        branch: the residual branch, same shape as ``x``.
        drop_prob: probability p of dropping the branch, 0 <= p <= 1.
        training: apply the random drop.
        mode: ``"row"`` or ``"batch"``.
        scaling: ``"inverted"``, ``"expected"`` or ``"none"``.
        alpha: a constant factor on the branch, for blocks written ``torch.add(x, b, alpha=)``.

    Raises:
        ValueError: a bad rate, mode or scaling, or a bad ``DPATCH_KERNELS`` value.
    """
    p = _check_prob(drop_prob)
    _check_mode(mode)
    how = _resolve_scaling(True, scaling)
    if p == 0.0 or not training:
        if p > 0.0 and how == "expected":
            return torch.add(x, branch, alpha=alpha * (1.0 - p))
        return x + branch if alpha == 1.0 else torch.add(x, branch, alpha=alpha)
    keep = 1.0 - p
    value = alpha / keep if how == "inverted" and keep > 0.0 else alpha
    if _use_kernels(x, branch):
        return _kernel_drop_add(x, branch, keep, mode, value)
    mask = _keep_mask(branch, keep, mode)
    return torch.addcmul(x, branch, mask, value=value)


def _use_kernels(x: Tensor, branch: Tensor) -> bool:
    """Whether training-mode ``drop_add`` runs the Triton kernel (see ``DPATCH_KERNELS``)."""
    setting = os.environ.get("DPATCH_KERNELS", "")
    if setting not in KERNEL_SETTINGS:
        raise ValueError(f"DPATCH_KERNELS has to be one of {KERNEL_SETTINGS}, but got {setting!r}")
    if setting == "0" or torch.compiler.is_compiling():
        return False
    device = x.device.type
    if device != "cuda" and not (device == "cpu" and setting == "interpret"):
        return False
    from dpatch import kernels  # imports Triton: only when a kernel could run

    if not (kernels.available() and kernels.supports(x, branch)):
        return False
    if device == "cuda" and torch.cuda.is_current_stream_capturing():
        # The self-check reads results on the host: not while a CUDA graph is captured.
        known = kernels.known_check(x, branch)
        return known is not None and known.ok
    # First use of a case: run it against addcmul once; a failed case takes addcmul.
    return kernels.self_check(x, branch).ok


def _kernel_drop_add(x: Tensor, branch: Tensor, keep: float, mode: str, value: float) -> Tensor:
    from dpatch import kernels

    rows = branch.shape[0]
    # One draw per sample (or one for the batch), as in _keep_mask: the same random
    # numbers, so a seed gives the same mask on either path.
    lead = rows if mode == "row" else 1
    scale = torch.empty(lead, dtype=torch.float32, device=branch.device).bernoulli_(keep)
    if value != 1.0:
        scale.mul_(value)
    return kernels.fused_drop_add(x, branch, scale.expand(rows))


def _scripted_drop(
    x: Tensor,
    residual: Optional[Tensor],  # noqa: UP045 - TorchScript reads typing.Optional only
    alpha: float,
    p: float,
    training: bool,
    mode: str,
    scaling: str,
    branch_first: bool,
) -> Tensor:
    """The op as TorchScript can compile it (no argument checks; same arithmetic)."""
    if residual is None:
        if p == 0.0 or not training:
            return x * (1.0 - p) if (p > 0.0 and scaling == "expected") else x
        lead = x.shape[0] if mode == "row" else 1
        shape = [lead] + [1] * (x.dim() - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
        if scaling == "inverted" and p < 1.0:
            mask = mask / (1.0 - p)
        return x * mask
    if p == 0.0 or not training:
        if p > 0.0 and scaling == "expected":
            return torch.add(residual, x, alpha=alpha * (1.0 - p))
        if alpha == 1.0:
            return x + residual if branch_first else residual + x
        return torch.add(residual, x, alpha=alpha)
    lead = x.shape[0] if mode == "row" else 1
    shape = [lead] + [1] * (x.dim() - 1)
    mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
    value = alpha / (1.0 - p) if (scaling == "inverted" and p < 1.0) else alpha
    return torch.addcmul(residual, x, mask, value=value)


def _drop_rate_tensor(
    x: Tensor, residual: Tensor | None, alpha: float, rate: Tensor, mode: str, scaling: str
) -> Tensor:
    """Training-mode drop with the rate as a 0-dim tensor (what compiled graphs run).

    No Python branch on the rate: a graph captured once serves every rate (a rate of 0
    gives an all-ones mask and scale 1, the plain residual; a rate of 1 an all-zeros mask).
    ``mode="batch"`` draws from the device generator here, not the host one.
    """
    lead = x.shape[0] if mode == "row" else 1
    keep = 1.0 - rate
    mask = torch.rand((lead,) + (1,) * (x.dim() - 1), device=x.device) < keep
    scale = alpha / keep if scaling == "inverted" else torch.full_like(keep, alpha)
    # where, not mask * scale: at rate 1 the scale is inf and 0 * inf is NaN.
    factor = torch.where(mask, scale, 0.0).to(x.dtype)
    if residual is None:
        return x * factor
    return torch.addcmul(residual, x, factor)


def keep_count(batch: int, drop_prob: float) -> int:
    """Samples that compute the branch in skip mode: ``max(round(B * (1 - p)), 1)`` for
    p < 1, and 0 at p = 1 (the branch is always dropped).

    A fixed count (DINOv2's subset scheme) keeps shapes static for ``torch.compile`` and,
    for p < 1, uses every parameter each step, which DDP needs; the kept rows are scaled by
    ``B / k`` so the residual stays unbiased: E[out] = x + branch. Callers must handle 0:
    there is no subset to compute the branch on.
    """
    if drop_prob >= 1.0:
        return 0
    return max(round(batch * (1.0 - drop_prob)), 1)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch; a drop-in for ``timm.layers.DropPath``.

    Called as ``drop_path(branch)`` it returns the dropped branch (timm's contract). Called
    as ``drop_path(branch, residual=x)`` it returns ``x + drop_path(branch)`` fused in one
    pass: the form dpatch's rewritten blocks use.

    Attributes:
        drop_prob: float rate, mutable (as in timm); checked when set.
        mode: ``"row"`` or ``"batch"``.
        scaling: ``"inverted"``, ``"expected"`` or ``"none"``.
        skip: in rewritten blocks, compute the branch only where it is kept (training).
        seed: batch mode only: when set, drop decisions come from a host generator seeded
            with it, so every DDP rank makes the same choice with no collective and no
            device synchronisation; ``None`` draws from torch's default generator instead
            (a skipping site seeds its generator with 0 then).
    """

    # Runtime state, not configuration: TorchScript need not see it.
    __jit_ignored_attributes__: ClassVar[list[str]] = [
        "_generator",
        "_rate",
        "_replay",
        "_draws",
        "_ranks",
        "_tie",
    ]
    __jit_unused_properties__: ClassVar[list[str]] = ["drop_prob", "scale_by_keep", "draws"]

    def __init__(
        self,
        drop_prob: float = 0.0,
        scale_by_keep: bool = True,
        mode: str = "row",
        scaling: str | None = None,
        *,
        skip: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        # The rate lives twice: a float for eager code and a 0-dim tensor that compiled
        # graphs read, so changing it never recompiles. The tensor is a plain attribute,
        # not a buffer: it is not state, and torch.export must not see it in eval graphs.
        self._rate = torch.zeros(())
        self._p = 0.0
        self.drop_prob = drop_prob
        self.mode = _check_mode(mode)
        self.scaling = _resolve_scaling(scale_by_keep, scaling)
        self.skip = bool(skip)
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._draws = 0  # batch decisions drawn since the generator was seeded
        self._replay = Replay()
        # Set by inject/retune: shared by the slots of one model (dpatch.ranks).
        self._ranks: RankCheck | None = None
        # Set for a tied block: the one decision its slots share (dpatch.tie).
        self._tie: SharedDecision | None = None

    def _apply(self, fn: Any, recurse: bool = True) -> DropPath:
        # .to()/.cuda() move parameters and buffers; the rate tensor follows (in float32).
        super()._apply(fn, recurse)
        self._rate = fn(self._rate).float()
        return self

    @property
    def drop_prob(self) -> float:
        """The drop probability (mutable, as in timm)."""
        return self._p

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self._p = _check_prob(value)
        with torch.no_grad():
            self._rate.fill_(self._p)

    @property
    def scale_by_keep(self) -> bool:
        """timm's name for inverted scaling."""
        return self.scaling == "inverted"

    def forward(
        self,
        x: Tensor,
        residual: Optional[Tensor] = None,  # noqa: UP045 - TorchScript reads typing.Optional
        alpha: float = 1.0,
        branch_first: bool = False,
    ) -> Tensor:
        """``x`` with stochastic depth; with ``residual``, ``residual + alpha * x`` in one pass.

        ``branch_first`` says the model wrote ``x + residual``: where nothing is dropped or
        scaled (eval, rate 0) the sum keeps that order, and with it the memory layout the
        model's own addition gives its output.
        """
        if torch.jit.is_scripting():
            return _scripted_drop(
                x, residual, alpha, self._p, self.training, self.mode, self.scaling, branch_first
            )
        else:
            return self._forward(x, residual, alpha, branch_first)

    @torch.jit.unused
    def _forward(
        self, x: Tensor, residual: Tensor | None, alpha: float, branch_first: bool = False
    ) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            # Any torch.fx tracer (not only dpatch's) keeps this module a leaf, so a traced
            # graph reads ``self.training`` and ``self.drop_prob`` at run time instead of
            # baking in the values they had while tracing.
            tracer = x.tracer
            args = (x,) if residual is None else (x, residual)
            kwargs: dict[str, Any] = {} if alpha == 1.0 else {"alpha": alpha}
            if branch_first:
                kwargs["branch_first"] = True
            return tracer.create_proxy("call_module", tracer.path_of_module(self), args, kwargs)
        tie = self._tie
        if tie is not None and self.training and tie.active:
            return tie.apply(x, residual, alpha)  # the block's decision, shared by its slots
        if self.training and torch.compiler.is_compiling():
            # reads the rate tensor: a compiled graph never guards on the float rate
            return _drop_rate_tensor(x, residual, alpha, self._rate, self.mode, self.scaling)
        if branch_first and residual is not None and alpha == 1.0 and self._plain_sum():
            return x + residual
        if self.training and self.mode == "batch" and self.seed is not None:
            return self._batch_host(x, residual, alpha)
        if residual is None:
            out = drop_path(x, self._p, self.training, mode=self.mode, scaling=self.scaling)
            return out if alpha == 1.0 else out * alpha
        return drop_add(residual, x, self._p, self.training, self.mode, self.scaling, alpha)

    def _plain_sum(self) -> bool:
        """Nothing is dropped or scaled: rate 0, or eval without ``expected`` scaling."""
        return self._p == 0.0 or (not self.training and self.scaling != "expected")

    # -- batch mode with a shared host generator --------------------------------------
    @property
    def draws(self) -> int:
        """Batch decisions drawn from the host generator since it was (re)seeded."""
        return self._draws

    def keep_batch(self) -> bool:
        """This step's batch-mode decision: True keeps the branch. In a tied block, the
        block's decision (:mod:`dpatch.tie`); else :meth:`draw_batch`."""
        tie = self._tie
        if tie is not None and tie.active:
            return tie.keep()
        return self.draw_batch()

    def draw_batch(self) -> bool:
        """A batch-mode decision drawn on the host: True keeps the branch.

        A call inside backward is activation checkpointing running the forward again: it
        gets the decision the forward took (:class:`dpatch.ranks.Replay`, which draws one
        number from torch's default CPU generator per call to find it), since the host
        generator is not part of the RNG state checkpointing restores. The first call of a
        patched model under ``torch.distributed`` compares the ranks' sites and seeds
        (:class:`dpatch.ranks.RankCheck`).

        Raises:
            RankMismatchError: at the first call, when ranks would decide differently.
            ReplayError: a recomputation whose decision is not known (checkpointing
                without ``preserve_rng_state``, or over 64 forwards before one backward).
        """
        tag = self._replay.tag()
        if in_backward():
            again = self._replay.take(tag)
            if again is None:
                raise ReplayError(
                    "activation checkpointing recomputed a batch-mode site whose decision "
                    "cannot be found again, so its gradient would be another network's: "
                    "checkpoint with preserve_rng_state=True (the default), and run at most "
                    "64 training forwards before each backward"
                )
            return again
        if self._ranks is not None and not self._ranks.done:
            self._ranks.run()
        keep = True
        if self._p > 0.0:
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(int(self.seed or 0))
                self._draws = 0
            keep = bool(torch.rand((), generator=self._generator).item() >= self._p)
            self._draws += 1
        self._replay.record(tag, keep)
        return keep

    def dropped(self, residual: Tensor, params: Sequence[Tensor]) -> Tensor:
        """The output of a branch dropped for the whole batch and not computed: a copy of
        ``residual``, with the branch's ``params`` kept in the step with zero gradients
        (DDP without ``find_unused_parameters``, FSDP; see :mod:`dpatch.ranks`)."""
        return attach_zero_grads(residual, params)

    def batch_scale(self) -> float:
        """The factor a kept batch-mode branch is multiplied by in training (0 at p = 1,
        where no branch is ever kept: a caller that adds it anyway adds nothing)."""
        if self._p >= 1.0:
            return 0.0
        return 1.0 / (1.0 - self._p) if self.scaling == "inverted" else 1.0

    def _batch_host(self, x: Tensor, residual: Tensor | None, alpha: float = 1.0) -> Tensor:
        scale = alpha * self.batch_scale() if self.keep_batch() else 0.0
        if residual is None:
            return x * scale
        # alpha=0 still connects the branch to the loss: every parameter gets a (zero)
        # gradient, so DDP with find_unused_parameters=False keeps working.
        return torch.add(residual, x, alpha=scale)

    # -- row mode, compute-skipping ----------------------------------------------------
    def keep_indices(self, x: Tensor) -> Tensor:
        """Indices of the rows that compute the branch: a random subset of fixed size
        (empty at p = 1)."""
        k = keep_count(x.shape[0], self._p)
        if k == 0:
            return torch.empty(0, dtype=torch.long, device=x.device)
        return torch.randperm(x.shape[0], device=x.device)[:k]

    def scatter_add(
        self, residual: Tensor, branch: Tensor, index: Tensor, alpha: float = 1.0
    ) -> Tensor:
        """``residual`` with ``branch`` (computed on rows ``index``) added back, scaled B/k.

        With an empty ``index`` (p = 1) the result equals ``residual``; the 0-row branch
        stays in the graph, so its parameters still get (zero) gradients.
        """
        if self.scaling == "inverted" and branch.shape[0] > 0:
            alpha = alpha * residual.shape[0] / branch.shape[0]
        out = scatter_add_rows(residual, branch.to(residual.dtype), index, alpha)
        return out

    def skips(self) -> bool:
        """True when this call should compute the branch on a subset (or not at all)."""
        if self.mode == "row" and self._tie is not None and self._tie.active:
            return False  # a tied block skips (or masks) as one: see dpatch.tie
        return self.skip and self.training and self._p > 0.0

    def extra_repr(self) -> str:
        extra = f"drop_prob={round(self._p, 3):0.3f}, mode={self.mode}, scaling={self.scaling}"
        if self.skip:
            extra += ", skip=True"
        if self.seed is not None and self.mode == "batch":
            extra += f", seed={self.seed}"
        return extra

    def __getstate__(self) -> dict[str, Any]:
        # A torch.Generator is not picklable everywhere; it is re-created from the seed.
        state = self.__dict__.copy()
        state["_generator"] = None
        state["_draws"] = 0
        state["_replay"] = Replay()  # tags of this process's RNG stream mean nothing elsewhere
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Slots pickled by earlier dpatch versions lack the batch-mode runtime state.
        state.setdefault("_draws", 0)
        state.setdefault("_replay", Replay())
        state.setdefault("_ranks", None)
        state.setdefault("_tie", None)
        super().__setstate__(state)
