"""One forward pass that records which modules run, in which order, and with which inputs.

The pass runs on the meta device (:func:`dpatch.analysis._meta.meta_execution`): it costs no compute
and changes nothing. The input is the caller's, or the first candidate of
:func:`dpatch.analysis._inputs.input_candidates` the model runs on. A model whose forward needs real
values (data-dependent control flow, ``.item()``) is run on random inputs on its own device,
without gradients and with copies of its buffers; one that needs evaluation mode (a
detector that wants targets in training) is probed in evaluation mode. When nothing runs,
:class:`~dpatch.errors.ProbeError` says what was tried: dpatch never reports "no residual
branch" for a model it could not run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from dpatch.analysis._inputs import (
    ExampleInputs,
    as_example_inputs,
    input_candidates,
    takes_token_ids,
)
from dpatch.analysis._meta import materialise, meta_execution, real_execution
from dpatch.errors import ProbeError, first_line

__all__ = ["PROBE_BATCH", "Call", "Probe", "probe"]

PROBE_BATCH = 2

#: A recorded call: positional and keyword arguments.
Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class Probe:
    """What one forward pass saw, by ``id(module)``."""

    order: dict[int, int] = field(default_factory=dict)  # first-call index
    calls: dict[int, int] = field(default_factory=dict)  # number of calls
    inputs: dict[int, Call] = field(default_factory=dict)  # the first call's arguments
    outputs: dict[int, Any] = field(default_factory=dict)  # the first call's output
    example: ExampleInputs | None = None  # the input the model ran on
    unused: frozenset[str] = frozenset()  # parameters no operation read (by name)

    def ran_once(self) -> dict[int, Any]:
        """Outputs of the modules that ran exactly once (safe to reuse for their inputs)."""
        return {k: v for k, v in self.outputs.items() if self.calls.get(k) == 1}


def probe(model: nn.Module, example_inputs: Sequence[Any] | ExampleInputs | None = None) -> Probe:
    """Run ``model`` once, recording call order and each module's inputs and outputs.

    Raises:
        ProbeError: the model ran on none of the inputs tried (the message lists them, with
            the first failure, and how to give an input).
    """
    if isinstance(example_inputs, ExampleInputs):
        candidates = [example_inputs]
    elif example_inputs:
        candidates = [as_example_inputs(example_inputs)]
    else:
        candidates = input_candidates(model, PROBE_BATCH)
    device = next((t.device for t in model.parameters() if not t.is_meta), None)
    failures: dict[int, str] = {}  # candidate index -> its first failure
    # Cheapest first: on meta, then for real on the model's device; a model in training
    # mode (a detector that wants targets, a transformers encoder whose LayerDrop draws on
    # the host) is tried in evaluation mode before it is run for real, where LayerDrop
    # would leave random layers out of the probe.
    modes = [model.training, False] if model.training else [False]
    for real in [None] if device is None else [None, device]:
        for training in modes:
            with _mode(model, training):
                for i, cand in enumerate(candidates):
                    run = cand if real is None else _materialised(cand, real)
                    result = _probe_once(model, run, meta=real is None)
                    if isinstance(result, Probe):
                        result.example = cand
                        return result
                    failures.setdefault(i, result)
    tried = [(c, failures[i]) for i, c in enumerate(candidates)]
    raise ProbeError(
        _explain(model, tried, given=candidates[0].source == "given"),
        tried[0][1] if tried else "",
    )


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put every module in ``training`` mode for the duration, then back as each was."""
    modes = [(m, m.training) for m in model.modules()]
    if training != model.training:
        model.train(training)
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def _explain(model: nn.Module, failures: list[tuple[ExampleInputs, str]], *, given: bool) -> str:
    name = type(model).__name__
    first = failures[0][1] if failures else "no input to try"
    ids = takes_token_ids(model)
    values = failures[0][0].values if failures else ()
    if given and ids and any(isinstance(v, Tensor) and v.is_floating_point() for v in values):
        return (
            f"{name} takes token ids ({ids}), but the given input is "
            f"{failures[0][0].describe()}: add --input-dtype long (in Python: integer tensors "
            "in example_inputs)"
        )
    if given:
        return (
            f"{name} does not run on the given input ({failures[0][0].describe()}): {first}; "
            "check the shapes and dtypes (example_inputs=, or --input-shape/--input-dtype)"
        )
    tried = "; ".join(f"{c.describe()} [{c.source}]" for c, _ in failures[:4])
    return (
        f"could not run {name} on any input dpatch could infer (tried {tried}); first "
        f"failure: {first}; give one: example_inputs=(tensor, ...) in Python, or "
        "--input-shape B,C,H,W (repeat it for several inputs; --input-dtype long for ids)"
    )


class _Reads(torch.overrides.TorchFunctionMode):
    """Records which tensors any operation took as an argument (parameters that took part
    in the computation)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        for value in pytree.tree_leaves((args, kwargs)):
            if isinstance(value, Tensor):
                self.seen.add(id(value))
        return func(*args, **kwargs)


def _materialised(cand: ExampleInputs, device: Any) -> ExampleInputs:
    return ExampleInputs(
        materialise(cand.values, device), cand.source, materialise(cand.kwargs, device)
    )


def _probe_once(model: nn.Module, inputs: ExampleInputs, *, meta: bool) -> Probe | str:
    """A Probe of one run, or why the run failed (one line)."""
    result = Probe()

    def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key = id(mod)
        result.calls[key] = result.calls.get(key, 0) + 1
        if key not in result.order:
            result.order[key] = len(result.order)
            result.inputs[key] = (args, dict(kwargs))

    def post_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        result.outputs.setdefault(id(mod), output)

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(post_hook) for m in model.modules()]
    try:
        with meta_execution(model) if meta else real_execution(model):
            names = {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}
            with _Reads() as reads:
                inputs.call(model)
        result.unused = frozenset(n for n, i in names.items() if i not in reads.seen)
    except Exception as exc:  # any model code can fail here; the caller reports it
        return first_line(exc, 300, typed=True)
    finally:
        for h in handles:
            h.remove()
    return result
