"""``verify``: proof that the stochastic depth a model declares is the one that runs.

The bugs users report are silent: a configured rate that never reaches the model, a slot
built but never called, one rate per stage inside what should be a ramp, a DropPath class
that forgets to rescale, a drop applied to something that is not a residual branch.
:func:`verify` runs the model (a deep copy; the model itself is left untouched) and checks:

- per site, the *realised* drop share against the slot's rate, with a Wilson score
  interval (Bonferroni-corrected over the sites; compute-skipping drops an exact number
  of rows, B - k, so its share is compared exactly), and the factor kept branches carry
  against the slot's scaling (``1/(1-p)`` inverted, 1 expected/none, ``B/k`` skipping);
- that eval output equals the model with every stochastic-depth module removed, bit for
  bit (within float tolerance where a site uses ``expected`` scaling, which is not the
  identity in eval), and that each slot is the identity in eval;
- that no slot with a rate above 0 is built but never called, and that none runs on
  something that is not a residual branch (timm's and torchvision's own blocks that do so
  by design are warnings, not errors);
- that the rates follow what was declared (a :class:`~dpatch.PatchReport`, a manifest, a
  mapping of rates, or ``schedule=``/``max_rate=``) or, without a declaration, that a
  rising schedule has no stage with one constant rate inside the ramp;
- that a model's own LayerDrop (``config.layerdrop``, ...) skips layers at the rate it
  claims (:mod:`dpatch.verification._layerdrop`: at least 256 layer runs).

How rows are observed and replayed is in :mod:`dpatch.verification._observe`.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from dpatch.analysis import (
    Analysis,
    Site,
    analyze,
    is_slot_module,
    qualify,
    site_list,
    slot_settings,
)
from dpatch.droppath import DropPath
from dpatch.errors import InvalidValueError, ModelRunError, first_line
from dpatch.marks import block_meta, schedule_mark
from dpatch.models import find_layerdrop, paused_layerdrop
from dpatch.patching import PatchReport, block_rates, module_or_none, strip
from dpatch.schedule import schedule_rates
from dpatch.settings import FINDING_CODES
from dpatch.verification._layerdrop import (
    LAYERDROP_DRAWS,
    LayerDropCheck,
    LayerDropWatch,
    compare_layerdrop,
    judge,
)
from dpatch.verification._observe import Observer, Tally
from dpatch.verification._verdict import (
    Finding,
    SiteCheck,
    VerifyReport,
    compare_declared,
    measure,
    plateaus,
    schedule_shape,
)

__all__ = ["verify"]

_LIBRARIES = ("timm.", "torchvision.", "transformers.")
_RULE_LIBRARIES = ("timm.", "torchvision.")


def _check_arguments(
    steps: int, batch: int, draws: int, rows: int, confidence: float, ignore: Sequence[str]
) -> None:
    for name, value, least in (("steps", steps, 1), ("batch", batch, 2), ("rows", rows, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidValueError(f"{name} must be an integer >= {least}, but got {value!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
        raise InvalidValueError(f"draws must be an integer >= 0, but got {draws!r}")
    if not 0.0 < confidence < 1.0:
        raise InvalidValueError(f"confidence must be in (0, 1), but got {confidence!r}")
    unknown = sorted(set(ignore) - set(FINDING_CODES))
    if unknown:
        raise InvalidValueError(
            f"unknown finding code(s) {', '.join(unknown)}; choose from: {', '.join(FINDING_CODES)}"
        )


@contextmanager
def _python_rng(seed: int) -> Iterator[None]:
    """Python's and NumPy's generators seeded for the duration, then as they were: layer
    drop by hand (``random.random()``) and some transformers models (``np.random``) draw
    from them."""
    state = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    random.seed(seed)
    if np is not None:
        np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
        if np is not None:
            np.random.set_state(np_state)


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if not p.is_meta:
            return p.device, p.dtype if p.is_floating_point() else torch.float32
    return torch.device("cpu"), torch.float32


#: Positional and keyword inputs of one forward pass.
_Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def _real_inputs(
    model: nn.Module, example_inputs: Sequence[Any] | None, an: Analysis, batch: int
) -> _Inputs:
    """Real inputs: the caller's (meta tensors become random ones), else random values
    shaped like the input the analysis ran the model on (keyword inputs included), at
    ``batch`` rows."""
    device, dtype = _device_and_dtype(model)

    def real(v: Any, given: bool) -> Any:
        if isinstance(v, Tensor) and v.is_meta:
            if v.is_floating_point():  # a given dtype is kept; an inferred one follows the model
                return torch.randn(v.shape, device=device, dtype=v.dtype if given else dtype)
            return torch.zeros(v.shape, device=device, dtype=v.dtype)
        if isinstance(v, list | tuple):
            return type(v)(real(x, given) for x in v)
        return v

    if example_inputs:
        return tuple(real(v, True) for v in example_inputs), {}
    example = an.example.with_batch(batch)
    return (
        tuple(real(v, False) for v in example.values),
        {k: real(v, False) for k, v in example.kwargs.items()},
    )


def _first_row(inputs: _Inputs) -> _Inputs:
    args, kwargs = inputs

    def row(v: Any) -> Any:
        return v[:1] if isinstance(v, Tensor) and v.dim() else v

    return tuple(row(v) for v in args), {k: row(v) for k, v in kwargs.items()}


def _describe(inputs: _Inputs, source: str) -> str:
    """``2x3x224x224 float32 (timm pretrained_cfg)``."""
    args, kwargs = inputs
    shapes = ", ".join(
        f"{k}{'x'.join(map(str, v.shape))} {str(v.dtype).removeprefix('torch.')}"
        for k, v in [*(("", a) for a in args), *((f"{k}=", a) for k, a in kwargs.items())]
        if isinstance(v, Tensor)
    )
    return f"{shapes or 'no tensor'} ({source})"


def _run(model: nn.Module, inputs: _Inputs, what: str) -> Any:
    args, kwargs = inputs
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(v.shape)) for v in args if isinstance(v, Tensor))
        line = first_line(exc, 200, typed=True)
        raise ModelRunError(
            f"the model failed a {what} forward pass on inputs of shape {shapes or '?'} "
            f"({line}); pass example_inputs (--input-shape) that it accepts"
        ) from exc


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return [t for v in getattr(value, "__dict__", {}).values() for t in _tensors(v)]


def _same(a: Tensor, b: Tensor, *, exact: bool) -> bool:
    """Bit for bit (``exact``) or to float tolerance; NaN where the other has NaN is equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if exact:
        if torch.equal(a, b):
            return True
        return a.is_floating_point() and bool(
            torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)


def _slots(model: nn.Module) -> dict[str, nn.Module]:
    """Every stochastic-depth module, by qualified name (shared modules under their first)."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if name and is_slot_module(mod, name.rsplit(".", 1)[-1])
    }


def _remove_stochastic_depth(model: nn.Module) -> None:
    """Undo dpatch and make every stochastic-depth module an ``nn.Identity``, in place.
    Blocks with pruned branches stay pruned (the branches are gone for good); their other
    slots become plain additions (rate 0)."""
    kept: set[str] = set()
    for path, mod in model.named_modules():
        meta = block_meta(mod)
        if meta is not None and meta.pruned:
            for site in meta.sites:
                slot = mod._modules.get(site.attr)
                if isinstance(slot, DropPath):
                    slot.drop_prob, slot.scaling = 0.0, "inverted"
                kept.add(qualify(path, site.attr))
    strip(model, pruned="keep")
    for name in list(_slots(model)):
        if name in kept:
            continue
        parent_path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, nn.Identity())


def _library(model: nn.Module, path: str) -> str | None:
    """The library (``timm.``, ``torchvision.``, ``transformers.``) whose class the module at
    ``path`` is (its class before dpatch rewrote it), or None for any other class."""
    mod = module_or_none(model, path)
    if mod is None:
        return None
    meta = block_meta(mod)
    name = (meta.orig_cls if meta is not None else type(mod)).__module__
    return next((lib for lib in _LIBRARIES if name.startswith(lib)), None)


def _is_library(model: nn.Module, slot_path: str) -> bool:
    """Whether the slot's block (its parent module) is a library class, whose forward
    decides by design what the slot runs on."""
    return _library(model, slot_path.rpartition(".")[0]) is not None


def _declared_settings(
    model: nn.Module,
    sites: Sequence[Site],
    declared: PatchReport | Mapping[str, float] | None,
    schedule: str | None,
    max_rate: float | None,
    min_rate: float,
    per: str,
) -> tuple[dict[str, dict[str, Any]], bool] | None:
    """The declaration as {site name: {setting: value}}, and whether it lists every site."""
    if declared is not None and (schedule is not None or max_rate is not None):
        raise InvalidValueError("give declared= or schedule=/max_rate=, not both")
    if isinstance(declared, PatchReport):
        return {
            s.name: {"pruned": True}
            if s.pruned
            else {"rate": s.rate, "mode": s.mode, "scaling": s.scaling, "skip": s.skip}
            for s in declared.sites
        }, True
    if declared is not None:
        by_name = {s.name: s for s in sites}
        alias = {k: s.name for s in sites for k in (s.slot, s.origin) if k}
        out: dict[str, dict[str, Any]] = {}
        for key, rate in declared.items():
            out[by_name[key].name if key in by_name else alias.get(key, key)] = {
                "rate": float(rate)
            }
        return out, False
    if max_rate is None:
        return None
    kind = schedule or "linear"
    if kind == "native":
        from dpatch.models import native_rates

        by_slot = native_rates(model, max_rate)
        return {s.name: {"rate": by_slot.get(s.origin or s.slot, 0.0)} for s in sites}, True
    step_of = {s.name: (s.block if per == "block" else i) for i, s in enumerate(sites)}
    depth = len(set(step_of.values()))
    steps = schedule_rates(kind, depth, max_rate, min_rate)
    order = {b: i for i, b in enumerate(sorted(set(step_of.values())))}
    return {s.name: {"rate": steps[order[step_of[s.name]]]} for s in sites}, True


def _label(model: nn.Module, declared: object, shape: str) -> str:
    """What the rates are called: the declared schedule (a file's manifest), else the one
    the model was patched with, else the shape they have."""
    if isinstance(declared, PatchReport) and declared.schedule != "current":
        return declared.schedule
    mark = schedule_mark(model)
    return mark.schedule if mark is not None else shape


def verify(
    model: nn.Module,
    *,
    steps: int = 1,
    batch: int = 2,
    draws: int = 2048,
    rows: int = 256,
    example_inputs: Sequence[Any] | None = None,
    declared: PatchReport | Mapping[str, float] | None = None,
    schedule: str | None = None,
    max_rate: float | None = None,
    min_rate: float = 0.0,
    per: str = "block",
    seed: int = 0,
    confidence: float = 0.999,
    ignore: Sequence[str] = (),
    analysis: Analysis | None = None,
) -> VerifyReport:
    """Run ``model`` and check that its stochastic depth does what it declares.

    Never raises for a mismatch: the report says ``ok`` and lists what differs.

    Args:
        model: any ``nn.Module`` (patched by dpatch or not); it is not changed (the forward
            passes run on a deep copy, with torch's random state saved and restored).
        steps: training-mode forward passes of the whole model.
        batch: rows of the default random input (ignored with ``example_inputs``).
        draws: per slot, about this many rows (batch mode: ``draws // 8`` calls) are
            replayed on the slot alone after the forward passes (0: forward passes only:
            also for LayerDrop, which is otherwise measured on at least 256 layer runs,
            its owning module run alone again as often as that takes).
        rows: rows of each replayed call (compute-skipping's share is measured at it).
        example_inputs: real inputs for the forward passes (meta tensors are replaced by
            random ones of their shape); default: the model's input size at ``batch``.
        declared: what was promised: a :class:`~dpatch.PatchReport` (every site's rate,
            mode, scaling, skip; e.g. a file's manifest) or a mapping from site name or
            slot path to rate.
        schedule, max_rate, min_rate, per: declare rates by schedule instead (``native``:
            the model library's own rule, :func:`dpatch.models.native_rates`).
        seed: seeds torch's, Python's and NumPy's generators for the whole check
            (reproducible reports); their states are put back after.
        confidence: family-wise confidence of the drop-share intervals.
        ignore: finding codes (``dpatch.settings.FINDING_CODES``) reported as warnings instead of errors.
        analysis: :func:`dpatch.analysis.analyze` of this model from earlier (not probed again).

    Raises:
        ModelRunError: the model cannot be run on the inputs.
        InvalidValueError: a bad argument.
    """
    _check_arguments(steps, batch, draws, rows, confidence, ignore)
    started = time.perf_counter()
    if analysis is None:
        with paused_layerdrop(model):  # layers skipped in the probe would go unanalysed
            analysis = analyze(model, example_inputs)
    an = analysis
    # A pruned branch never runs: there is nothing of it to verify.
    every = site_list(an)
    sites = [s for s in every if not s.pruned]
    pruned_slots = {s.slot for s in every if s.pruned}
    wanted = _declared_settings(model, sites, declared, schedule, max_rate, min_rate, per)
    inputs = _real_inputs(model, example_inputs, an, batch)
    device = _device_and_dtype(model)[0]
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        _python_rng(seed),
    ):
        torch.manual_seed(seed)
        try:
            work = copy.deepcopy(model)
        except Exception as exc:
            raise ModelRunError(f"cannot copy the model to run it ({exc})") from exc
        slots = _slots(work)
        observer = Observer({id(m): m for m in slots.values()})
        layerdrop = LayerDropWatch(work, find_layerdrop(work))
        try:
            work.train()
            for _ in range(steps):
                _run(work, inputs, "training")
            if draws:
                observer.replay(draws, rows)
                with observer.quiet():
                    layerdrop.replay(LAYERDROP_DRAWS)
            observer.training = False
            work.eval()
            # Eval is deterministic: one row of the default input shows any difference.
            once = inputs if example_inputs else _first_row(inputs)
            out = _tensors(_run(work, once, "eval"))
        finally:
            observer.remove()
            layerdrop.remove()
        # The same copy without stochastic depth (same weights and batch-norm statistics).
        _remove_stochastic_depth(work)
        ref = _tensors(_run(work, once, "eval (without stochastic depth)"))

    expected = any(s.scaling == "expected" and s.rate > 0 for s in sites)
    eval_equal = len(out) == len(ref) and all(
        _same(a, b, exact=not expected) for a, b in zip(out, ref, strict=False)
    )
    found: list[Finding] = []

    def report(code: str, where: str, message: str, *, warn: bool = False) -> None:
        severity = "warning" if warn or code in ignore else "error"
        found.append(Finding(code, severity, where, message))

    if not eval_equal:
        report("eval", "", "eval output differs from the model without stochastic depth")

    tally_of = {name: observer.tallies[id(m)] for name, m in slots.items()}
    not_residual = {s.slot for s in sites if not s.residual}
    for name, mod in slots.items():
        if name in pruned_slots:
            continue
        tally, rate = tally_of[name], slot_settings(mod).rate
        library = _is_library(work, name)
        if tally.eval_bad:
            report("eval", name, tally.eval_note)
        if rate > 0 and tally.calls == 0:
            report(
                "never-called",
                name,
                f"rate {rate:.4f} but never called in training"
                + ("; its library block does not use it (no residual there)" if library else ""),
                warn=library,
            )
        elif rate > 0 and name in not_residual:
            report(
                "not-residual",
                name,
                f"rate {rate:.4f} on an output that is not a residual branch"
                + (" (the library's own block does this)" if library else ""),
                warn=library,
            )
        for note in tally.notes:
            report("unmeasured", name, note, warn=True)

    measured_sites = [s for s in sites if tally_of.get(s.slot, Tally()).calls]
    # Bonferroni over every interval: the sites' and the LayerDrops'.
    intervals = len(measured_sites) + sum(t.draws > 0 for t in layerdrop.tallies)
    z = statistics.NormalDist().inv_cdf(1 - (1 - confidence) / (2 * max(intervals, 1)))
    checks: list[SiteCheck] = []
    judged: dict[str, Any] = {}
    for s in sites:
        module = module_or_none(work, s.slot)
        tally = tally_of.get(s.slot, Tally())
        if s.slot not in judged:
            judged[s.slot] = measure(tally, s.rate, s.mode, z)
            for code, message in judged[s.slot].problems:
                report(code, s.name, message)
        want = (wanted[0].get(s.name, {}) if wanted else {}).get("rate", s.rate)
        checks.append(
            SiteCheck(s, float(want), module is not None, tally.calls, judged[s.slot], True)
        )

    configured = {
        c.site.name: {
            "rate": c.site.rate,
            "mode": c.site.mode,
            "scaling": c.site.scaling,
            "skip": c.site.skip,
            "slot_present": c.slot_present,
        }
        for c in checks
    }
    # A pruned branch is declared pruned and nothing else (it never runs).
    configured |= {s.name: {"pruned": True} for s in every if s.pruned}
    if wanted is not None:
        for where, message in compare_declared(configured, wanted[0], complete=wanted[1]):
            report("declared", where, message)
    steps_now = block_rates(sites)
    shape = schedule_shape(steps_now)
    if wanted is None:
        for first, last, rate in plateaus(steps_now):
            owners = {s.path for s in sites if first <= s.block <= last}
            # timm's and torchvision's rules are the reference ones (``schedule="native"``):
            # their composite blocks (MaxViT, MobileViT) give sub-blocks one rate on purpose.
            rule = all(_library(model, p) in _RULE_LIBRARIES for p in owners)
            report(
                "schedule",
                f"blocks {first}-{last}",
                f"share one rate {rate:.4f} inside a rising schedule"
                + (
                    " (the library's own rule: sub-blocks of one block)"
                    if rule
                    else " (one rate per stage where a per-block ramp was meant: the "
                    "transformers#33974 pattern)"
                ),
                warn=rule,
            )

    layerdrop_checks = _check_layerdrop(layerdrop, declared, z, report)

    bad = {f.where for f in found if f.severity == "error"}
    layerdrop_checks = [
        dataclasses.replace(c, ok=c.layerdrop.layers not in bad) for c in layerdrop_checks
    ]
    checks = [
        dataclasses.replace(c, ok=c.site.name not in bad and c.site.slot not in bad) for c in checks
    ]
    return VerifyReport(
        ok=not any(f.severity == "error" for f in found),
        sites=tuple(checks),
        findings=tuple(found),
        eval_check="close" if expected else "bitwise",
        eval_equal=eval_equal,
        schedule=_label(model, declared, shape),
        steps=steps,
        batch=batch,
        draws=draws,
        rows=rows,
        seed=seed,
        confidence=confidence,
        seconds=time.perf_counter() - started,
        inputs=_describe(inputs, "given" if example_inputs else an.example.source),
        unreached=an.unreached,
        layerdrop=tuple(layerdrop_checks),
    )


def _check_layerdrop(
    watch: LayerDropWatch,
    declared: object,
    z: float,
    report: Callable[..., None],
) -> list[LayerDropCheck]:
    """Judge every LayerDrop the watch measured; report findings through ``report``."""
    checks = []
    for record, tally in zip(watch.records, watch.tallies, strict=True):
        measured, problems = judge(record, tally, z)
        for message in problems:
            report("layerdrop", record.layers, message)
        for note in tally.notes:
            report("unmeasured", record.layers, note, warn=True)
        if not tally.calls and record.rate > 0:
            report(
                "unmeasured",
                record.layers,
                f"LayerDrop {record.attr} {record.rate:g} not measured: "
                f"{record.path or '(root)'} never ran in training on this input",
                warn=True,
            )
        checks.append(LayerDropCheck(record, tally.calls, tuple(tally.per_layer), measured, True))
    if isinstance(declared, PatchReport) and declared.layerdrop:
        for where, message in compare_layerdrop(watch.records, declared.layerdrop):
            report("declared", where, message)
    return checks
