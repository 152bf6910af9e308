"""Coverage of the zoos: for every torchvision builder (classification, quantization,
detection, segmentation, video, optical flow), one model of every timm family
(tests/timm_families.json) and one tiny-config model of every transformers vision family
(tests/hf_families.json, when transformers is installed): how many residual sites dpatch
finds, how many are fused (rewritten forward), how many can skip compute, whether
``schedule="native"`` reproduces the library's own rates, and what was left out and why.

Native parity of a model whose library sets drop-path rates (timm ``drop_path_rate``,
torchvision ``stochastic_depth_prob``, transformers ``config.drop_path_rate``): every site
gets the rate of its slot in the library's own build at rate 0.3, and every slot that build
calls with a rate above 0 is a site. Slot rates are read here, not by dpatch.

Models are built with their large tensors on the meta device, so this needs no weights.
A family the installed library lacks (transformers 4.x has no class added in 5.x, an older
timm no newer model) is left out with one line naming it. Prints the totals per zoo and
the reasons for what was left out; ``--rows`` also prints one row per model (always in
``--json``); ``--quick`` takes the first three models of each zoo. Nothing is timed, so the
models are shared out to ``--jobs`` worker processes (default: 2).

    python benchmarks/zoo_coverage.py [--json out.json] [--zoo timm|torchvision|transformers]
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import multiprocessing
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import timm
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import Run, parser

import dpatch
from dpatch.analysis import probe
from dpatch.models import build_light, tv_build_kwargs

ROOT = Path(__file__).resolve().parents[1]
RATE = 0.3


@dataclass(frozen=True)
class Entry:
    """One model: its zoo, how to build it (and its reference at a drop-path rate)."""

    zoo: str
    group: str
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    reference: Callable[[float], nn.Module] | None  # None: the library sets no rates


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


# --------------------------------------------------------------------------- torchvision
def _tv_task(name: str) -> str:
    parts = torchvision.models.get_model_builder(name).__module__.split(".")
    return parts[2] if len(parts) > 3 else "classification"


def _tv_inputs(name: str) -> tuple[Any, ...]:
    kind = _tv_task(name)
    if kind == "video":
        big = name.startswith(("mvit", "s3d", "swin3d"))
        return (_meta(1, 3, 16, 224, 224) if big else _meta(2, 3, 16, 112, 112),)
    if kind == "detection":
        return ([_meta(3, 224, 224), _meta(3, 224, 224)],)
    if kind == "optical_flow":
        return (_meta(2, 3, 128, 128), _meta(2, 3, 128, 128))
    size = 299 if name.endswith("inception_v3") else 224
    return (_meta(2, 3, size, size),)


def _tv_reference(name: str, rate: float) -> nn.Module:
    """The builder at ``stochastic_depth_prob=rate``; builders that fix the rate (Swin,
    Swin3D, MaxViT) get it through their private factory."""
    builder = torchvision.models.get_model_builder(name)
    kw = tv_build_kwargs(name, False)
    try:
        return build_light(lambda: builder(stochastic_depth_prob=rate, **kw))
    except TypeError as exc:
        if "multiple values" not in str(exc):
            raise
    module = sys.modules[builder.__module__]
    (factory,) = [
        f
        for n, f in vars(module).items()
        if n.startswith("_") and inspect.isfunction(f) and f.__module__ == module.__name__
        and "stochastic_depth_prob" in inspect.signature(f).parameters
    ]  # fmt: skip

    def forced(*args: Any, **kwargs: Any) -> nn.Module:
        return factory(*args, **{**kwargs, "stochastic_depth_prob": rate})

    with mock.patch.object(module, factory.__name__, forced):
        return build_light(lambda: builder(**kw))


def _tv_entries() -> list[Entry]:
    out = []
    for name in torchvision.models.list_models():
        builder = torchvision.models.get_model_builder(name)
        native = "stochastic_depth_prob" in inspect.getsource(sys.modules[builder.__module__])
        out.append(
            Entry(
                "torchvision",
                _tv_task(name),
                name,
                lambda n=name: torchvision.models.get_model(n, **tv_build_kwargs(n, False)),
                lambda n=name: _tv_inputs(n),
                (lambda r, n=name: _tv_reference(n, r)) if native else None,
            )
        )
    return out


# --------------------------------------------------------------------------- timm
def _timm_entries(missing: list[str]) -> list[Entry]:
    out = []
    for f in json.loads((ROOT / "tests" / "timm_families.json").read_text()):
        if not timm.is_model(f["model"]):
            missing.append(f"timm {timm.__version__} has no {f['model']}: {f['module']} skipped")
            continue
        out.append(
            Entry(
                "timm",
                f["module"],
                f["model"],
                lambda f=f: timm.create_model(f["model"], **f["kwargs"]),
                lambda f=f: (_meta(2, *f["input_size"]),),
                (
                    lambda r, f=f: build_light(
                        lambda: timm.create_model(
                            f["model"], **{**f["kwargs"], "drop_path_rate": r}
                        )
                    )
                )
                if f["drop_path_rate"]
                else None,
            )
        )
    return out


# --------------------------------------------------------------------------- transformers
def _hf_entries(missing: list[str]) -> list[Entry]:
    import transformers

    def build(fam: dict[str, Any], rate: Any = None) -> nn.Module:
        cls = getattr(transformers, fam["class"])
        config = cls.config_class(**fam["config"])
        if rate is not None:  # past the validator: LeViT/TimeSformer annotate it as an int
            current = config.drop_path_rate
            if isinstance(current, list | tuple):  # CvT: one per stage, scaled
                top = max(current)
                rate = [rate * v / top for v in current] if top > 0 else [rate] * len(current)
            object.__setattr__(config, "drop_path_rate", rate)
        return build_light(lambda: cls(config))

    out = []
    for fam in json.loads((ROOT / "tests" / "hf_families.json").read_text()):
        if not hasattr(transformers, fam["class"]):
            missing.append(
                f"transformers {transformers.__version__} has no {fam['class']}: "
                f"{fam['family']} skipped"
            )
            continue
        # on an instance: transformers 4.x sets config fields in __init__, 5.x on the class
        config_class = getattr(transformers, fam["class"]).config_class
        native = hasattr(config_class(**fam["config"]), "drop_path_rate")
        out.append(
            Entry(
                "transformers",
                fam["family"],
                fam["class"],
                lambda fam=fam: build(fam),
                lambda fam=fam: (_meta(2, *fam["input_size"]),),
                (lambda r, fam=fam: build(fam, r)) if native else None,
            )
        )
    return out


# --------------------------------------------------------------------------- measuring
def _slot_rates(model: nn.Module) -> dict[str, float]:
    """Rates of the model's own stochastic-depth modules (timm DropPath, torchvision
    StochasticDepth, transformers ``*DropPath``), read off their attributes."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torchvision.ops.StochasticDepth):
            out[name] = float(m.p)
        elif type(m).__name__.endswith("DropPath") and hasattr(m, "drop_prob"):
            out[name] = float(m.drop_prob)
    return out


def _native_parity(entry: Entry, model: nn.Module, x: tuple[Any, ...]) -> str:
    """``yes``, ``no: why`` or ``-`` (the library sets no rates)."""
    if entry.reference is None:
        return "-"
    try:
        report = dpatch.inject(model, RATE, schedule="native", example_inputs=x)
    except dpatch.DPatchError as exc:
        return f"no: {str(exc)[:60]}"
    ref = entry.reference(RATE)
    if entry.zoo != "timm":
        ref.eval()
    rates = _slot_rates(ref)
    wrong = [s.name for s in report.sites if abs(s.rate - rates.get(s.origin, 0.0)) > 1e-6]
    seen = probe(ref, x).order
    sites = {s.origin for s in report.sites}
    missing = [
        n
        for n, m in ref.named_modules()
        if n in rates and rates[n] > 0 and id(m) in seen and n not in sites
    ]
    if wrong or missing:
        return f"no: {len(wrong)} wrong rates, {len(missing)} slots not sites"
    return "yes"


def entries(zoos: set[str], missing: list[str]) -> list[Entry]:
    """The models to sweep; a family the installed library lacks goes to ``missing``, as
    one line naming it."""
    out: list[Entry] = []
    if "torchvision" in zoos:
        out += _tv_entries()
    if "timm" in zoos:
        out += _timm_entries(missing)
    if "transformers" in zoos:
        if importlib.util.find_spec("transformers") is None:
            missing.append("transformers is not installed: its zoo skipped")
        else:
            out += _hf_entries(missing)
    return out


def _measure(e: Entry) -> tuple[list[Any], list[str] | None]:
    """One table row, and the reasons of what inject left out (None when inject failed:
    the row says why)."""
    x = e.inputs()

    def fresh() -> nn.Module:
        model = build_light(e.build)
        # torchvision detection needs targets in training; eval is the probe's view of every
        # non-timm model (timm rows keep the numbers measured before)
        return model if e.zoo == "timm" else model.eval()

    try:
        report = dpatch.inject(fresh(), 0.2, skip=True, example_inputs=x)
    except dpatch.DPatchError as exc:  # a row of its own, never dropped
        return [e.zoo, e.group, e.name, "-", "-", "-", "-", "-", f"failed: {exc}"[:100]], None
    sites = report.sites
    n, fused, skip = len(sites), sum(s.fused for s in sites), sum(s.skip for s in sites)
    kinds = "/".join(sorted({s.kind for s in sites})) or "-"
    parity = _native_parity(e, fresh(), x)
    row = [e.zoo, e.group, e.name, n, kinds, fused, skip, parity, len(report.skipped)]
    return row, [s.reason for s in report.skipped]


def measure_share(
    zoos: set[str], quick: bool, share: int, jobs: int
) -> list[tuple[int, list[Any], list[str] | None]]:
    """Models ``share``, ``share + jobs``, ... of the sweep (in a worker process: entries
    hold lambdas, so each worker lists them itself)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    todo = _todo(zoos, quick, [])
    return [(i, *_measure(todo[i])) for i in range(share, len(todo), jobs)]


def _todo(zoos: set[str], quick: bool, missing: list[str]) -> list[Entry]:
    todo = entries(zoos, missing)
    if quick:
        todo = [e for z in sorted(zoos) for e in [e for e in todo if e.zoo == z][:3]]
    return todo


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--zoo", action="append", choices=["timm", "torchvision", "transformers"])
    p.add_argument("--rows", action="store_true", help="print one row per model too")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    args = p.parse_args()
    run = Run("zoo_coverage", args)
    warnings.filterwarnings("ignore")
    zoos = set(args.zoo or ["timm", "torchvision", "transformers"])
    missing: list[str] = []
    todo = _todo(zoos, args.quick, missing)
    if missing:
        print("".join(f"- {line}\n" for line in missing), flush=True)
    measured: dict[int, tuple[list[Any], list[str] | None]] = {}
    if args.jobs > 1:  # nothing here is timed: the models are shared out
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            shares = [
                pool.submit(measure_share, zoos, args.quick, k, args.jobs) for k in range(args.jobs)
            ]
            for share in shares:
                measured.update({i: (row, why) for i, row, why in share.result()})
    else:
        measured = {i: _measure(e) for i, e in enumerate(todo)}
    rows, reasons = [], Counter()
    totals: dict[str, Counter[str]] = {}
    for i, e in enumerate(todo):
        row, skipped = measured[i]
        rows.append(row)
        t = totals.setdefault(e.zoo, Counter())
        t["models"] += 1
        if skipped is None:
            t["failed"] += 1
            reasons[str(row[-1])[:70]] += 1
            continue
        for reason in skipped:
            reasons[reason.split(":")[0][:70]] += 1
        n, parity = row[3], row[7]
        t["with residual sites"] += bool(n)
        t["sites"] += n
        t["fused"] += row[5]
        t["can skip"] += row[6]
        t["families with native rates"] += parity != "-"
        t["native parity"] += parity == "yes"
    for line in missing:
        zoo = line.split()[0]
        if zoo in totals:
            totals[zoo]["not in the installed library"] += 1
    versions = {"torchvision": torchvision.__version__, "timm": timm.__version__}
    if "transformers" in sys.modules:
        versions["transformers"] = sys.modules["transformers"].__version__
    run.extra["versions"] = versions
    header = ["zoo", "family/task", "model", "sites", "kind", "fused", "can skip", "native"]
    header.append("notes")
    if args.rows:
        run.table("Coverage per model", header, rows)
    run.extra["rows"] = [dict(zip(header, r, strict=True)) for r in rows]
    cols = ["models", "with residual sites", "sites", "fused", "can skip"]
    cols += ["families with native rates", "native parity", "failed"]
    cols += ["not in the installed library"]
    run.table(
        "Coverage of the zoos",
        ["zoo", *cols],
        [[f"{z} {versions[z]}", *(t[c] for c in cols)] for z, t in sorted(totals.items())],
        note="sites: residual sites found; fused: rewritten forward; native parity: "
        '`schedule="native"` reproduces the library\'s own rates'
        + (f"; {len(missing)} families not in the installed libraries" if missing else ""),
    )
    run.table(
        "What was left out, by reason",
        ["reason", "count"],
        reasons.most_common(),
        note="sites not patched and models that failed, counted by the first words of the reason",
    )
    run.finish()


if __name__ == "__main__":
    main()
