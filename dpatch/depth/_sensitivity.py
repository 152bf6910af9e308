"""Measuring what each residual branch (``metric="loss"``) or layer (``"angular"``,
``"bi"``) is worth.

``loss``: the model evaluated with one branch removed at a time (its block returns the
shortcut), compared with the full model; per site, over the whole data:

- with targets: the top-1 accuracy drop and the cross-entropy increase; the primary score
  is the cross-entropy increase (continuous, so small evaluation sets still rank branches);
- without targets, 2-D outputs (classifiers): the KL divergence KL(p_full || p_removed) of
  the softmax outputs, averaged over samples;
- otherwise: the relative L2 change ``||y_removed - y_full|| / ||y_full||``.

``angular`` and ``bi`` score whole layers (:mod:`._layers`): how much each layer changes
its hidden state, in one forward pass over the data.

A suggestion turns the scores into a per-branch ``custom`` schedule for ``inject``: rates
monotone in measured robustness, the least sensitive branch at ``max_rate``, the most
sensitive at 0 (linear in rank; equal scores share a rate).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpatch.analysis import Site, analyze, site_list
from dpatch.depth._blocks import rebuild_blocks, removable, removed_branch, take_apart
from dpatch.depth._layers import Layer, layer_similarity, layers_of
from dpatch.errors import DataError, InvalidValueError
from dpatch.schedule import check_rate
from dpatch.settings import LAYER_METRICS, METRICS, check_choice

__all__ = [
    "LOSS_METRICS",
    "RATES_FORMAT",
    "LayerSensitivity",
    "SensitivityReport",
    "SiteSensitivity",
    "read_rates",
    "read_scores",
    "sensitivity",
    "suggest_rates",
    "suggestion",
]

#: The primary metric of ``metric="loss"``, by what the data allows.
LOSS_METRICS: tuple[str, ...] = ("ce_increase", "kl", "rel_l2")
#: The ``format`` of a suggested-rates JSON file.
RATES_FORMAT = "dpatch-rates/1"


@dataclass(frozen=True)
class SiteSensitivity:
    """One site's measurement (None where the metric does not apply or it was not measured).

    Attributes:
        name: ``Site.name``.
        block: its block (depth order).
        rate: its drop rate when measured.
        score: the primary metric (higher: the model needs this branch more).
        accuracy_drop: top-1 accuracy of the full model minus that without the branch.
        ce_increase: cross-entropy without the branch minus that of the full model.
        kl: mean KL divergence of the softmax outputs (2-D outputs).
        rel_l2: relative L2 change of the output.
        reason: why it was not measured ("" when it was).
    """

    name: str
    block: int
    rate: float
    score: float | None
    accuracy_drop: float | None = None
    ce_increase: float | None = None
    kl: float | None = None
    rel_l2: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's measurement (``metric="angular"`` or ``"bi"``).

    Attributes:
        layer: the layer (its path, index and branches).
        score: the metric, averaged over tokens (lower: the layer changes its input less);
            None where it could not be measured.
        reason: why it was not measured ("" when it was).
    """

    layer: Layer
    score: float | None
    reason: str = ""

    @property
    def name(self) -> str:
        """The layer's path (what ``scores`` and ``prune`` name it by)."""
        return self.layer.path

    def to_dict(self) -> dict[str, Any]:
        return {**self.layer.to_dict(), "score": self.score, "reason": self.reason}


@dataclass(frozen=True)
class SensitivityReport:
    """What removing each branch does to the model's output (``per="branch"``), or how much
    each layer changes its hidden state (``per="layer"``).

    Attributes:
        metric: the primary metric: one of :data:`LOSS_METRICS` for ``loss``, else
            ``angular`` or ``bi``.
        sites: one entry per site, in depth order (``per="branch"``; empty for layers).
        samples: how many inputs were evaluated.
        accuracy: top-1 accuracy of the full model (with targets).
        cross_entropy: cross-entropy of the full model (with targets).
        per: ``"branch"`` (loss) or ``"layer"`` (angular, bi).
        layers: one entry per layer, in forward order (``per="layer"``).
    """

    metric: str
    sites: tuple[SiteSensitivity, ...]
    samples: int
    accuracy: float | None = None
    cross_entropy: float | None = None
    per: str = "branch"
    layers: tuple[LayerSensitivity, ...] = ()

    @property
    def scores(self) -> dict[str, float]:
        """Name -> primary metric, for what was measured: ``Site.name`` per branch, the
        layer's path per layer."""
        entries = self.layers if self.per == "layer" else self.sites
        return {e.name: e.score for e in entries if e.score is not None}

    @property
    def notes(self) -> tuple[str, ...]:
        """What a reader must know to trust the scores (e.g. every score is 0)."""
        measured = list(self.scores.values())
        if self.per == "layer":
            # a cosine of equal vectors is 1 to float64 rounding, not always exactly
            if measured and all(abs(score) < 1e-12 for score in measured):
                return (
                    "every score is 0: no layer changes its hidden state (branch ends "
                    "initialised to zero in an untrained model?); measure a trained model",
                )
            return ()
        if measured and all(score == 0 for score in measured):
            return (
                "every score is 0: removing any one branch leaves the model's outputs "
                "unchanged, so its branches add nothing yet (branch ends initialised to zero, "
                "as timm's ResNet last BatchNorm or a layer scale of 0 are, in an untrained "
                "model); measure a trained model",
            )
        return ()

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``dpatch sensitivity --json``; ``prune --by FILE`` reads it)."""
        return {
            "metric": self.metric,
            "per": self.per,
            "samples": self.samples,
            "accuracy": self.accuracy,
            "cross_entropy": self.cross_entropy,
            "scores": self.scores,
            "notes": list(self.notes),
            "layers": [e.to_dict() for e in self.layers],
            "sites": [
                {
                    "name": s.name,
                    "block": s.block,
                    "rate": s.rate,
                    "score": s.score,
                    "accuracy_drop": s.accuracy_drop,
                    "ce_increase": s.ce_increase,
                    "kl": s.kl,
                    "rel_l2": s.rel_l2,
                    "reason": s.reason,
                }
                for s in self.sites
            ],
        }


# --------------------------------------------------------------------------- measuring
def _tensor_output(out: Any) -> Tensor:
    """The tensor a model's output stands for: itself, ``.logits``, or the first entry."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, Sequence) and out and isinstance(out[0], Tensor):
        return out[0]
    raise InvalidValueError(
        f"the model returns {type(out).__name__}, not a tensor; wrap it so it returns logits"
    )


def _outputs(model: nn.Module, inputs: Tensor, batch_size: int, device: torch.device) -> Tensor:
    chunks = []
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch_size):
            out = _tensor_output(model(inputs[i : i + batch_size].to(device)))
            chunks.append(out.detach().float().cpu())
    return torch.cat(chunks)


def _check_data(inputs: Any, targets: Any, batch_size: int) -> None:
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] == 0:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise DataError(f"inputs must be a non-empty batch-first tensor, but got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidValueError(f"batch_size must be a whole number >= 1, but got {batch_size!r}")
    if targets is None:
        return
    if (
        not isinstance(targets, Tensor)
        or targets.dim() != 1
        or targets.dtype.is_floating_point
        or targets.shape[0] != inputs.shape[0]
    ):
        got = (
            f"{tuple(targets.shape)} {targets.dtype}"
            if isinstance(targets, Tensor)
            else type(targets).__name__
        )
        raise DataError(
            f"targets must be {inputs.shape[0]} integer class labels (one per input), but got {got}"
        )


def _compare(full: Tensor, cut: Tensor, targets: Tensor | None) -> dict[str, float | None]:
    diff = torch.linalg.vector_norm(cut - full) / torch.linalg.vector_norm(full).clamp_min(1e-12)
    out: dict[str, float | None] = {
        "accuracy_drop": None,
        "ce_increase": None,
        "kl": None,
        "rel_l2": float(diff),
    }
    if full.dim() == 2:
        logp, logq = F.log_softmax(full, dim=1), F.log_softmax(cut, dim=1)
        out["kl"] = float((logp.exp() * (logp - logq)).sum(dim=1).mean().clamp_min(0.0))
    if targets is not None:
        acc = (full.argmax(1) == targets).float().mean() - (cut.argmax(1) == targets).float().mean()
        out["accuracy_drop"] = float(acc)
        out["ce_increase"] = float(F.cross_entropy(cut, targets) - F.cross_entropy(full, targets))
    return out


def _prepared(model: nn.Module, example: tuple[Any, ...]) -> tuple[nn.Module, list[Site]]:
    """A copy of the model whose sites can each be removed: every block with sites is
    rewritten (rates and settings kept, eval unchanged)."""
    work = copy.deepcopy(model)
    an = analyze(work, example)
    todo = [b for b in an.blocks if b.traced is not None]
    if todo:
        taken = take_apart(todo)
        rebuild_blocks(work, an, {b.path: frozenset() for b in todo}, taken)
        an = analyze(work, example)
    return work, site_list(an)


def sensitivity(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None = None,
    *,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    metric: str = "loss",
) -> SensitivityReport:
    """What each residual branch (``metric="loss"``) or layer (``"angular"``, ``"bi"``) of
    ``model`` is worth on ``inputs``.

    - ``loss``: the model evaluated with each branch removed in turn (on a copy), compared
      with the full model; one score per branch.
    - ``angular`` (Gromov et al. 2024) and ``bi`` (ShortGPT's Block Influence): how much
      each layer changes its hidden state, per token, averaged; one forward pass over the
      data with hooks (no copy); one score per layer; ``targets`` are not used.

    The model itself is not changed; it runs in eval mode on the device of its parameters.

    Args:
        model: any model dpatch finds sites in.
        inputs: a batch-first tensor of inputs.
        targets: integer class labels, one per input (enables accuracy and cross-entropy).
        batch_size: inputs per forward pass.
        progress: called as ``progress(done, total)`` after each site (``loss``) or batch.
        metric: ``loss``, ``angular`` or ``bi`` (:data:`dpatch.settings.METRICS`).

    Raises:
        DataError: empty or malformed inputs or targets.
        InvalidValueError: an unknown metric, the model's output is not a tensor, or
            targets do not fit it.
    """
    check_choice(metric, "metric", METRICS)
    if metric in LAYER_METRICS:
        return _layer_sensitivity(model, inputs, metric, batch_size, progress)
    _check_data(inputs, targets, batch_size)
    work, sites = _prepared(model, (inputs[: min(2, inputs.shape[0])],))
    work.eval()
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    full = _outputs(work, inputs, batch_size, device)
    labels = None if targets is None else targets.long().cpu()
    if labels is not None:
        if full.dim() != 2:
            raise InvalidValueError(
                f"targets need class scores of shape (N, classes), but the model outputs "
                f"{tuple(full.shape)}; leave the targets out"
            )
        bad = labels[(labels < 0) | (labels >= full.shape[1])]
        if bad.numel():
            raise DataError(
                f"target {int(bad[0])} is not a class of this model (it has {full.shape[1]})"
            )
    metric = "ce_increase" if labels is not None else "kl" if full.dim() == 2 else "rel_l2"
    entries: list[SiteSensitivity] = []
    for i, site in enumerate(sites):
        why = removable(site, sites)
        if why:
            entries.append(SiteSensitivity(site.name, site.block, site.rate, None, reason=why))
        else:
            with removed_branch(work, site):
                cut = _outputs(work, inputs, batch_size, device)
            m = _compare(full, cut, labels)
            entries.append(
                SiteSensitivity(
                    site.name,
                    site.block,
                    site.rate,
                    m[metric],
                    accuracy_drop=m["accuracy_drop"],
                    ce_increase=m["ce_increase"],
                    kl=m["kl"],
                    rel_l2=m["rel_l2"],
                )
            )
        if progress is not None:
            progress(i + 1, len(sites))
    acc = ce = None
    if labels is not None:
        acc = float((full.argmax(1) == labels).float().mean())
        ce = float(F.cross_entropy(full, labels))
    return SensitivityReport(metric, tuple(entries), int(inputs.shape[0]), acc, ce)


def _layer_sensitivity(
    model: nn.Module,
    inputs: Tensor,
    metric: str,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> SensitivityReport:
    _check_data(inputs, None, batch_size)
    an = analyze(model, (inputs[: min(2, inputs.shape[0])],))
    layers = layers_of(model, site_list(an))
    measured = layer_similarity(
        model, layers, inputs, metric, batch_size=batch_size, progress=progress
    )
    entries = tuple(
        LayerSensitivity(layer, score, why)
        for layer, (score, why) in zip(layers, measured, strict=True)
    )
    return SensitivityReport(metric, (), int(inputs.shape[0]), per="layer", layers=entries)


# --------------------------------------------------------------------------- suggesting
def suggest_rates(report: SensitivityReport, max_rate: float) -> list[float]:
    """A rate per site (report order): linear in sensitivity rank, ``max_rate`` for the least
    sensitive branch down to 0 for the most sensitive; equal scores share a rate. Sites that
    were not measured get 0.

    Raises:
        InvalidValueError: ``max_rate`` outside [0, 1), or a report of layer scores.
    """
    if report.per == "layer":
        raise InvalidValueError(
            f"suggested rates come from per-branch scores (metric 'loss'); this report has "
            f"one {report.metric!r} score per layer"
        )
    top = check_rate(max_rate, "max_rate")
    measured = sorted((s.score, i) for i, s in enumerate(report.sites) if s.score is not None)
    rates = [0.0] * len(report.sites)
    n = len(measured)
    j = 0
    while j < n:  # groups of equal scores share their mean rank
        k = j
        while k + 1 < n and measured[k + 1][0] == measured[j][0]:
            k += 1
        rank = (j + k) / 2
        rate = top if n == 1 else top * (1.0 - rank / (n - 1))
        for _, i in measured[j : k + 1]:
            rates[i] = rate
        j = k + 1
    return rates


def suggestion(
    report: SensitivityReport, max_rate: float, *, model: str | None = None
) -> dict[str, Any]:
    """The suggested rates as the JSON document ``inject --rates-from`` reads (with
    ``--schedule custom --per branch``), naming the model they were measured on."""
    rates = suggest_rates(report, max_rate)
    return {
        "format": RATES_FORMAT,
        "model": model,
        "schedule": "custom",
        "per": "branch",
        "max_rate": float(max_rate),
        "metric": report.metric,
        "samples": report.samples,
        "rates": rates,
        "scores": report.scores,
        "sites": [
            {"name": s.name, "block": s.block, "score": s.score, "rate": r}
            for s, r in zip(report.sites, rates, strict=True)
        ],
    }


def _read_json(path: str | os.PathLike[str], what: str) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise InvalidValueError(f"{what} file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidValueError(f"{what} file {str(p)!r} is not readable JSON ({exc})") from exc


def read_rates(path: str | os.PathLike[str]) -> list[float]:
    """Rates from a JSON file: a plain list, or a document with a ``rates`` list (what
    ``dpatch sensitivity --suggest`` writes).

    Raises:
        InvalidValueError: unreadable, of another shape, or a rate outside [0, 1).
    """
    doc = _read_json(path, "rates")
    rates = doc.get("rates") if isinstance(doc, dict) else doc
    if not isinstance(rates, list) or not rates:
        raise InvalidValueError(
            f"rates file {str(path)!r} holds no rates; give a JSON list of numbers or a "
            "document with a 'rates' list"
        )
    return [check_rate(r, f"rate {i} in {str(path)!r}") for i, r in enumerate(rates)]


def read_scores(path: str | os.PathLike[str]) -> dict[str, float]:
    """Site scores from a JSON file ``dpatch sensitivity --json`` (or ``--suggest``) wrote.

    Raises:
        InvalidValueError: unreadable, or no ``scores`` mapping of names to numbers.
    """
    doc = _read_json(path, "sensitivity")
    scores = doc.get("scores") if isinstance(doc, dict) else None
    ok = isinstance(scores, dict) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in scores.values()
    )
    if not ok or not scores:
        raise InvalidValueError(
            f"{str(path)!r} holds no 'scores' (site name -> number); write one with "
            "dpatch sensitivity MODEL --data PATH --json"
        )
    assert isinstance(scores, dict)
    return {str(k): float(v) for k, v in scores.items()}
