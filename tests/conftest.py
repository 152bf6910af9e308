"""pytest configuration: offline hub, one thread, and the fixtures tests share."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import Net, eval_outputs_equal, make_net

# Keep the hub client from retrying for half a minute when a test asks for a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: on a shared 2-core CI box, two threads slow the sweeps down several-fold.
torch.set_num_threads(1)


@pytest.fixture
def net() -> Net:
    return make_net()


@pytest.fixture(autouse=True)
def _inject_keeps_eval_output(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every inject and retune in every test: the model's eval output after it equals the
    model's eval output before it, bit for bit (values, dtypes, strides), on the input the
    patch was given or inferred. The one exception is ``expected`` scaling at a rate above 0,
    whose eval output is ``x + (1 - p) f(x)`` by design."""
    from dpatch.analysis import materialise
    from dpatch.patching import _patch as patch_module

    original = patch_module._patch

    def checked(model: torch.nn.Module, req: Any, **kwargs: Any) -> Any:
        try:
            reference = copy.deepcopy(model)
        except Exception:  # a model that cannot be copied cannot be compared
            reference = None
        report = original(model, req, **kwargs)
        patched = report.model if report.model is not None else model
        expected = any(s.scaling == "expected" and s.rate > 0 for s in report.sites)
        on_meta = any(t.is_meta for t in patched.parameters())
        if reference is not None and not expected and not on_meta and report.example is not None:
            given = kwargs.get("example_inputs")
            real = given is not None and not any(
                isinstance(v, torch.Tensor) and v.is_meta for v in given
            )
            device = next((p.device for p in patched.parameters()), torch.device("cpu"))
            torch.manual_seed(0)
            inputs = tuple(given) if real else materialise(report.example.values, device)
            problem = eval_outputs_equal(reference, patched, tuple(inputs))
            assert not problem, (
                f"{type(model).__name__}: eval output changed by the patch: {problem}"
            )
        return report

    monkeypatch.setattr(patch_module, "_patch", checked)
    yield
