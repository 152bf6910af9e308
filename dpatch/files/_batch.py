"""Many checkpoints per command: expanding inputs, naming outputs, and running
``inject``/``retune``/``inspect``/``verify`` over them with each architecture built and
analysed once.

Inputs are files, folders (their ``.safetensors``/``.pt``/``.pth``/``.bin`` files) or
globs, and model specs. Files are grouped by architecture (the manifest's model spec, or
``model=``); each group builds its model once, probes and traces it once, then per file
only loads the weights and sets each site's settings (a dpatch file's own, from its
manifest). Results come one per input, in group order; a failing input is a result with
its error, and the run stops there unless ``keep_going``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dpatch.analysis import Analysis, analyze, qualify, site_list
from dpatch.errors import DPatchError, InvalidValueError, WeightsError
from dpatch.files._batch_inputs import Batch, BatchInput
from dpatch.files._files import load_state_dict_file, load_weights, read_manifest, save
from dpatch.files._manifest import DEPTH_KEY, report_from_manifest, schedule_from_manifest
from dpatch.marks import ScheduleMark
from dpatch.models import ModelSpec, create_model, find_layerdrop, parse_spec, paused_layerdrop
from dpatch.patching import (
    PatchReport,
    apply_layerdrop_entries,
    apply_sites,
    configure_sites,
    inject,
    inspect,
    retune,
)
from dpatch.settings import SETTING_NAMES, Settings
from dpatch.verification import VerifyReport, verify

__all__ = ["FileResult", "inspect_many", "patch_many", "verify_many"]


@dataclass(frozen=True)
class FileResult:
    """What one input gave.

    Attributes:
        input: the file or spec.
        model: the model spec it was built as (None when not known).
        output: the file written (or that a dry run would write).
        report: a :class:`~dpatch.PatchReport` (inject, retune, inspect) or
            :class:`~dpatch.VerifyReport` (verify); None on error or for a plain file that
            ``inspect`` could only summarise (see ``info``).
        info: for a checkpoint without manifest inspected without a model: its size.
        error: the one-line error, when the input failed.
        exit_code: 0 ok, 1 failed (or verify found a mismatch), 3 no residual branch.
        seconds: time spent on this input (its share of a group's build not included).
    """

    input: str
    model: str | None = None
    output: str | None = None
    report: PatchReport | VerifyReport | None = None
    info: Mapping[str, Any] | None = None
    error: str | None = None
    exit_code: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        """One JSON Lines object."""
        doc: dict[str, Any] = dict(self.report.to_dict()) if self.report is not None else {}
        doc.update(self.info or {})
        doc |= {
            "input": self.input,
            "model": self.model,
            "output": self.output,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "error": self.error,
            "seconds": round(self.seconds, 3),
        }
        return doc


# --------------------------------------------------------------------------- running
@dataclass(frozen=True)
class _Item:
    """An input with what is known of it before its model is built."""

    index: int
    input: BatchInput
    manifest: Mapping[str, Any] | None = None
    spec: ModelSpec | None = None
    problem: DPatchError | None = None

    @property
    def skip(self) -> bool:
        """The file was written with compute-skipping (its blocks have the skipping form)."""
        return bool(((self.manifest or {}).get("schedule") or {}).get("skip"))

    @property
    def schedule(self) -> ScheduleMark | None:
        """The schedule the file records (None for a plain checkpoint)."""
        return schedule_from_manifest(self.manifest) if self.manifest is not None else None

    @property
    def pruned(self) -> tuple[str, ...]:
        """The sites the file's model has pruned (their branches' tensors are left out)."""
        sites = (self.manifest or {}).get("sites") or []
        return tuple(sorted(qualify(d["path"], d["branch"]) for d in sites if d.get("pruned")))

    @property
    def pruned_keys(self) -> list[str]:
        """Tensors the file leaves out: only its pruned branches use them."""
        depth = (self.manifest or {}).get(DEPTH_KEY) or {}
        return [str(k) for k in depth.get("pruned_keys") or []]

    def key(self, by_skip: bool) -> tuple[str, str, bool, tuple[str, ...]]:
        """Inputs with one key share a built model: spec, kwargs, the pruned branches (and
        the skipping form where the command keeps each file's settings)."""
        assert self.spec is not None
        kwargs = json.dumps(self.spec.kwargs, sort_keys=True, default=str)
        return self.spec.text, kwargs, by_skip and self.skip, self.pruned


def _manifest_spec(manifest: Mapping[str, Any] | None) -> ModelSpec | None:
    entry = (manifest or {}).get("model") or {}
    if not entry.get("spec"):
        return None
    return parse_spec(str(entry["spec"]), **dict(entry.get("kwargs") or {}))[0]


def _resolve(batch: Batch, model: str | None, *, needs_model: bool) -> list[_Item]:
    """Read each file's manifest and decide its architecture (``model`` wins)."""
    arch = parse_spec(model)[0] if model else None
    items: list[_Item] = []
    for i, inp in enumerate(batch.inputs):
        if i in batch.problems:
            items.append(_Item(i, inp, problem=batch.problems[i]))
            continue
        try:
            if not inp.is_file:  # a spec names its own architecture
                items.append(_Item(i, inp, spec=parse_spec(inp.text)[0]))
                continue
            manifest = read_manifest(inp.text)
            spec = arch or _manifest_spec(manifest)
            if spec is None and needs_model:
                raise WeightsError(
                    f"{inp.text!r} is a checkpoint without a dpatch manifest; say which "
                    "architecture it holds (--model NAME)"
                )
            items.append(_Item(i, inp, manifest, spec))
        except DPatchError as exc:
            items.append(_Item(i, inp, problem=exc))
    return items


def _failed(item: _Item, exc: DPatchError, started: float | None = None) -> FileResult:
    spent = time.perf_counter() - started if started is not None else 0.0
    message = " ".join(str(exc).split()) or type(exc).__name__
    return FileResult(
        item.input.text,
        item.spec.text if item.spec else None,
        error=message,
        exit_code=exc.exit_code,
        seconds=spent,
    )


_Group = Callable[[list[_Item]], Iterator[FileResult]]


def _drive(
    items: list[_Item], group: _Group, keep_going: bool, *, by_skip: bool = False
) -> Iterator[FileResult]:
    """Yield one result per item, in input order; stop after the first failure unless
    ``keep_going``. Inputs of one architecture share a group (one built model), started at
    its first input; each of its results is drawn when its input's turn comes, so a
    stop leaves later inputs untouched."""
    running: dict[tuple[str, str, bool, tuple[str, ...]], Iterator[FileResult]] = {}
    for item in items:
        if item.problem is not None:
            result = _failed(item, item.problem)
        elif item.spec is None:
            result = next(group([item]))
        else:
            key = item.key(by_skip)
            if key not in running:
                running[key] = group(
                    [i for i in items if i.problem is None and i.spec and i.key(by_skip) == key]
                )
            result = next(running[key])
        yield result
        if result.error is not None and not keep_going:
            return


def _build(members: list[_Item]) -> nn.Module:
    """The architecture of a group, with the branches its files prune pruned."""
    head = members[0]
    assert head.spec is not None
    built = create_model(head.spec)
    if head.pruned and head.manifest is not None:
        from dpatch.depth import prune

        apply_sites(built, head.manifest["sites"], skip=head.skip, schedule=head.schedule)
        prune(built, list(head.pruned))
    return built


def _load(built: nn.Module, item: _Item, what: str) -> None:
    """Load an input's weights into its group's model (a pruned file lacks its pruned
    branches' tensors, which the group's model does not use either)."""
    if item.input.is_file:
        load_weights(built, item.input.text, what=what, missing_ok=item.pruned_keys)


def _each(members: list[_Item], work: Callable[[_Item], FileResult]) -> Iterator[FileResult]:
    for item in members:
        started = time.perf_counter()
        try:
            result = work(item)
        except DPatchError as exc:
            yield _failed(item, exc, started)
            continue
        except Exception as exc:  # one bad file must not hide the others' results
            line = " ".join(str(exc).split())[:300]
            failure = DPatchError(f"unexpected {type(exc).__name__}: {line}")
            yield _failed(item, failure, started)
            continue
        yield FileResult(**{**result.__dict__, "seconds": time.perf_counter() - started})


def _group_failed(members: list[_Item], exc: DPatchError) -> Iterator[FileResult]:
    return iter([_failed(m, exc) for m in members])


def _analyze(model: nn.Module, example_inputs: Any = None, coverage: str = "slots") -> Analysis:
    """:func:`dpatch.analysis.analyze` with the model's own LayerDrop paused (a model in
    training mode would skip layers in the probe)."""
    with paused_layerdrop(model):
        return analyze(model, example_inputs, coverage)


def _pristine(
    model: nn.Module, example_inputs: Any = None, coverage: str = "slots"
) -> tuple[Analysis, list[dict[str, Any]]]:
    """An analysis of a freshly built model and its sites' own settings."""
    an = _analyze(model, example_inputs, coverage)
    return an, [s.to_dict() for s in site_list(an)]


def _layerdrop_as_listed(
    model: nn.Module, manifest: Mapping[str, Any] | None, pristine: list[dict[str, Any]]
) -> None:
    """The model's own LayerDrop as an input's manifest records it, else as built."""
    listed = manifest.get("layerdrop") if manifest is not None else None
    apply_layerdrop_entries(model, pristine if listed is None else listed)


def patch_many(
    action: str,
    inputs: Batch,
    *,
    model: str | None = None,
    dry_run: bool = False,
    keep_going: bool = False,
    allow_empty: bool = False,
    settings: Settings | None = None,
    **request: Any,
) -> Iterator[FileResult]:
    """``inject`` or ``retune`` every input of ``inputs`` and save each to its output.

    ``inject`` gives every checkpoint of an architecture the same sites and settings, so
    the model is patched once and each file only loads its weights into it. ``retune``
    starts from each file's own settings (its manifest; the architecture's own for a plain
    checkpoint), set without probing the model again, and keeps what ``request`` does not
    name. ``settings`` (or the same settings as keyword arguments) and ``request`` take the
    arguments of :func:`dpatch.inject`/:func:`dpatch.retune`.

    Raises:
        InvalidValueError: an unknown ``action`` or a bad argument (before any work).
        ModelNotFoundError: ``model`` names no model.
    """
    if action not in ("inject", "retune"):
        raise InvalidValueError(f"unknown action {action!r}; choose inject or retune")
    given = Settings.of(request)  # checked here, before any work
    if settings is not None and given.given():
        raise InvalidValueError(f"pass settings= or {', '.join(given.given())}=, not both")
    settings = settings if settings is not None else given
    request = {k: v for k, v in request.items() if k not in SETTING_NAMES}
    items = _resolve(inputs, model, needs_model=True)

    def write(item: _Item, built: nn.Module, report: PatchReport) -> FileResult:
        spec = item.spec
        out = inputs.outputs.get(item.index)
        if out is not None and not dry_run:
            out.parent.mkdir(exist_ok=True)  # made at the first write, not before
            save(built, out, report, spec=spec, force=inputs.force)
        return FileResult(item.input.text, spec.text if spec else None, _text(out), report)

    def group(members: list[_Item]) -> Iterator[FileResult]:
        spec = members[0].spec
        assert spec is not None
        try:
            built = _build(members)
            if action == "inject":
                report = inject(built, allow_empty=allow_empty, settings=settings, **request)
            else:
                probe_with = request.get("example_inputs")
                coverage = request.get("coverage", "slots")
                an, pristine = _pristine(built, probe_with, coverage)
                as_built = [r.to_dict() for r in find_layerdrop(built)]
                first = members[0].manifest
                if first is not None:
                    base = apply_sites(
                        built, first["sites"], skip=members[0].skip, example_inputs=probe_with
                    )
                    an = _analyze(built, probe_with, coverage)
                else:
                    base = PatchReport.current(site_list(an))
        except DPatchError as exc:
            yield from _group_failed(members, exc)
            return

        def one(item: _Item) -> FileResult:
            nonlocal base
            _load(built, item, spec.text)
            if action == "inject":
                return write(item, built, report)
            listed = item.manifest["sites"] if item.manifest is not None else pristine
            configure_sites(built, base, listed, schedule=item.schedule)
            _layerdrop_as_listed(built, item.manifest, as_built)
            base = retune(built, allow_empty=allow_empty, analysis=an, settings=settings, **request)
            return write(item, built, base)

        yield from _each(members, one)

    return _drive(items, group, keep_going, by_skip=action == "retune")


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def inspect_many(
    inputs: Batch,
    *,
    model: str | None = None,
    keep_going: bool = False,
    allow_empty: bool = False,
    example_inputs: Any = None,
    coverage: str = "slots",
) -> Iterator[FileResult]:
    """Inspect every input: a dpatch file from its manifest alone (no model built, unless
    ``model`` is given), a plain checkpoint by its size (or, with ``model``, its sites),
    a spec by building it. Sites do not depend on weights: each architecture is analysed
    once and each of its checkpoints only checked to load."""
    items = _resolve(inputs, model, needs_model=False)

    def group(members: list[_Item]) -> Iterator[FileResult]:
        head = members[0]
        if head.spec is None or (model is None and head.manifest is not None):
            yield from _each(members, _from_file)
            return
        try:
            built = _build(members)
            report = inspect(built, example_inputs, allow_empty=allow_empty, coverage=coverage)
        except DPatchError as exc:
            yield from _group_failed(members, exc)
            return

        def one(item: _Item) -> FileResult:
            _load(built, item, head.spec.text if head.spec else "")
            return FileResult(item.input.text, head.spec.text if head.spec else None, None, report)

        yield from _each(members, one)

    return _drive(items, group, keep_going)


def _from_file(item: _Item) -> FileResult:
    if item.manifest is None:
        state = load_state_dict_file(item.input.text)
        info = {
            "manifest": None,
            "tensors": len(state),
            "parameters": sum(t.numel() for t in state.values()),
        }
        return FileResult(item.input.text, info=info)
    report = report_from_manifest(dict(item.manifest))
    spec = (item.manifest.get("model") or {}).get("spec")
    return FileResult(item.input.text, spec, None, report)


def verify_many(
    inputs: Batch, *, model: str | None = None, keep_going: bool = False, **options: Any
) -> Iterator[FileResult]:
    """:func:`dpatch.verify` every input; a dpatch file is checked against its manifest.
    A report that is not ok is a result with exit code 1 (not an error: the run goes on).
    ``options`` are :func:`dpatch.verify`'s keyword arguments."""
    items = _resolve(inputs, model, needs_model=True)

    def group(members: list[_Item]) -> Iterator[FileResult]:
        spec = members[0].spec
        assert spec is not None
        try:
            built = _build(members)
            probe_with = options.get("example_inputs")
            an, pristine = _pristine(built, probe_with)
            as_built = [r.to_dict() for r in find_layerdrop(built)]
            base = PatchReport.current(site_list(an))
            first = members[0].manifest
            if first is not None:
                base = apply_sites(
                    built, first["sites"], skip=members[0].skip, example_inputs=probe_with
                )
                an = _analyze(built, probe_with)
        except DPatchError as exc:
            yield from _group_failed(members, exc)
            return

        def one(item: _Item) -> FileResult:
            _load(built, item, spec.text)
            declared = options.get("declared")
            listed = pristine
            if item.manifest is not None:
                listed = item.manifest["sites"]
                declared = report_from_manifest(dict(item.manifest))
            configure_sites(built, base, listed, schedule=item.schedule)
            _layerdrop_as_listed(built, item.manifest, as_built)
            kwargs = {k: v for k, v in options.items() if k != "declared"}
            report = verify(built, analysis=an, declared=declared, **kwargs)
            return FileResult(
                item.input.text, spec.text, None, report, exit_code=0 if report.ok else 1
            )

        yield from _each(members, one)

    return _drive(items, group, keep_going, by_skip=True)
