"""What ``dpatch inject`` and ``dpatch retune`` share: one runner for one model or many
inputs, around one :class:`~dpatch.settings.Settings`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpatch.cli._app import about, emit, err, load, out, step
from dpatch.cli._batch import check_single_only, prepare, run_batch
from dpatch.cli._options import parse_inputs
from dpatch.settings import Settings

if TYPE_CHECKING:
    from dpatch.files import FileResult
    from dpatch.patching import PatchReport

__all__ = ["Invocation", "run_patch"]


@dataclass(frozen=True)
class Invocation:
    """Everything ``inject``/``retune`` were given besides the settings."""

    models: list[str]
    recipe: str | None
    size: str | None
    coverage: str
    weights: Path | None
    pretrained: bool
    output: Path | None
    force: bool
    dry_run: bool
    as_json: bool
    allow_empty: bool
    arch: str | None
    input_shape: list[str] | None
    input_dtype: list[str] | None
    template: str | None
    keep_going: bool
    options: dict[str, Any] = field(default_factory=dict)
    """The command's own library arguments (inject's ``keep_layerdrop``, retune's
    ``layerdrop``)."""


def run_patch(action: str, settings: Settings, how: Invocation) -> None:
    """``inject`` or ``retune`` one model (a table, or JSON) or many inputs (a line each)."""
    from dpatch.files import check_output, is_many

    example_inputs = parse_inputs(how.input_shape, how.input_dtype)
    request: dict[str, Any] = {
        "recipe": how.recipe,
        "size": how.size,
        "coverage": how.coverage,
        "example_inputs": example_inputs,
        **how.options,
    }
    if is_many(how.models) or how.template is not None:
        check_single_only(weights=how.weights, pretrained=how.pretrained)
        _many(action, settings, how, request)
        return
    if how.output is not None:
        check_output(how.output, how.force)  # fail before the slow part (dry runs too)
    from dpatch.files import save
    from dpatch.patching import inject, retune

    target = how.models[0]
    loaded = load(
        target, weights=how.weights, pretrained=how.pretrained, arch=how.arch, quiet=how.as_json
    )
    name = loaded.spec.text if loaded.spec else target
    call = inject if action == "inject" else retune
    with step("Tracing residual branches", how.as_json), about(name):
        report = call(loaded.model, settings=settings, allow_empty=how.allow_empty, **request)
    written = None
    if how.output is not None and not how.dry_run:
        with step(f"Saving {how.output}", how.as_json):
            save(loaded.model, how.output, report, spec=loaded.spec, force=how.force)
        written = str(how.output)
    extra = {"model": name, "output": written, "dry_run": how.dry_run}
    emit(report, how.as_json, extra, show_all=False)
    if how.as_json:
        return
    if action == "retune":
        out().print(_changes_line(report), markup=False, highlight=False)
    if written:
        err().print(f"wrote {written}", markup=False)
    elif how.dry_run and how.output is not None:
        err().print(f"dry run: would write {how.output}", markup=False)
    else:
        what = "patched" if action == "inject" else "retuned"
        note = f"note: nothing written (pass -o OUT.safetensors to save the {what} model)"
        err().print(note, markup=False)


def _many(action: str, settings: Settings, how: Invocation, request: dict[str, Any]) -> None:
    """Many inputs: ``-o`` is a folder; one line (or JSON object) per input."""
    from dpatch.files import patch_many

    batch = prepare(how.models, how.output, how.template, how.force, writes=how.output is not None)
    results = patch_many(
        action,
        batch,
        model=how.arch,
        dry_run=how.dry_run,
        keep_going=how.keep_going,
        allow_empty=how.allow_empty,
        settings=settings,
        **request,
    )
    run_batch(
        results,
        len(batch.inputs),
        as_json=how.as_json,
        describe=lambda result: _summary(result, how.dry_run),
    )


def _summary(result: FileResult, dry_run: bool = False) -> str:
    """One line for one patched checkpoint."""
    from dpatch.patching import PatchReport

    report = result.report
    assert isinstance(report, PatchReport)
    where = f" -> {result.output}" if result.output else ""
    if where and dry_run:
        where = f" (dry run: would write {result.output})"
    line = (
        f"{result.input}{where}: {len(report.sites)} sites, mean rate {report.mean_rate:.4f}, "
        f"max {max((s.rate for s in report.sites), default=0.0):.4f}, expected depth "
        f"{report.expected_depth:.2f} of {report.depth}"
    )
    changed = report.changed_settings()
    if report.schedule != "current" and changed:
        line += "; changed " + ", ".join(f"{k} on {n}" for k, n in changed.items())
    now = f"{report.schedule} (per {report.per})"
    if report.previous and report.previous != now:
        line += f"; schedule {report.previous} -> {now}"
    return f"{line} ({result.seconds:.2f} s)"


def _changes_line(report: PatchReport) -> str:
    """What a retune changed and kept, for people."""
    changed = report.changed_settings()
    did = [f"{k} on {n} of {len(report.sites)} sites" for k, n in changed.items()]
    did += [
        f"layerdrop on {c.layers} {c.before:g} -> {c.after:g}" for c in report.layerdrop_changes
    ]
    kept = [k for k in ("mode", "scaling", "skip") if k not in changed]
    now = f"{report.schedule} (per {report.per})"
    if report.previous == now:
        kept.insert(0, f"schedule {now}")
    elif report.previous:
        did.insert(0, f"schedule {report.previous} -> {now}")
    return f"changed: {', '.join(did) or 'nothing'}" + (
        f"; kept: {', '.join(kept)}" if kept else ""
    )
