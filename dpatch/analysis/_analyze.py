"""Analysing a model: probe, trace each block, classify its additions, assign slots.

Read-only: nothing here changes the model (hooks are added and removed, traces work on
shallow copies). :func:`analyze` returns an :class:`Analysis`, which :mod:`dpatch.analysis`
turns into public :class:`~dpatch.analysis.Site` records and :mod:`dpatch.patching` applies.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dpatch.analysis._inputs import ExampleInputs
from dpatch.analysis._metatrace import meta_trace
from dpatch.analysis._probe import Call, Probe, probe
from dpatch.analysis._residual import BlockSite, find_residual_adds, native_slots_win
from dpatch.analysis._shadow import Reads, Recorder
from dpatch.analysis._slots import (
    assign_slots,
    forward_source,
    is_slot_module,
    owner_of,
    referenced_none_slots,
)
from dpatch.analysis._trace import TracedBlock, config_key, trace_and_run, trace_module
from dpatch.errors import InvalidValueError, TraceError, first_line
from dpatch.marks import block_meta
from dpatch.settings import COVERAGES

__all__ = [
    "Analysis",
    "BlockSites",
    "LooseSlot",
    "Unreached",
    "analyze",
    "qualify",
    "unreached_modules",
]


def qualify(path: str, name: str) -> str:
    """``path.name``, or ``name`` for the root module (path "")."""
    return f"{path}.{name}" if path else name


@dataclass
class BlockSites:
    """The residual sites of one module's own forward.

    Attributes:
        path: the module's qualified name.
        module: the module.
        order: when it first ran in the probe (its depth order).
        sites: its sites in graph order.
        traced: its trace (None for a block dpatch rewrote already: its sites come from
            its patch metadata).
        coverage: the coverage its sites were chosen under.
        unslotted: slot names residual additions without a slot would get; they are not
            sites because the model's native slots define its sites (coverage "slots").
    """

    path: str
    module: nn.Module
    order: int
    sites: list[BlockSite]
    traced: TracedBlock | None = None
    coverage: str = "slots"
    unslotted: list[str] = field(default_factory=list)

    def slot_name(self, attr: str) -> str:
        """The qualified name of this block's slot attribute ``attr`` (its site's name)."""
        return qualify(self.path, attr)


@dataclass(frozen=True)
class LooseSlot:
    """A native slot that runs but not on a traced residual addition (the model's forward
    calls it; dpatch changes its settings but not the forward around it).

    ``residual`` is False for a slot a traced forward applies to something other than a
    residual branch (it then drops that whole value)."""

    slot_path: str
    owner_path: str
    order: int
    residual: bool = True


@dataclass
class Analysis:
    """Everything :func:`analyze` learned about a model.

    Attributes:
        model: the analysed model.
        blocks: blocks with sites, in the order they were found.
        loose: native slots outside traced blocks.
        skipped: (path, reason) of what could not be analysed or is not a site.
        unslotted: (block path, slot name it would get) of residual additions left alone
            because the model's native slots define its sites (``coverage="slots"``).
        example: the input the probe ran the model on, and where it came from.
        inputs: each module's recorded call, by ``id(module)``.
        unanalysed: (path, reason) of blocks that ran, may add a residual and could not be
            traced: their sites are unknown (empty when native slots define the sites).
        unreached: modules holding parameters that no operation read in the probe: the
            input did not reach them (the other tower of a two-tower model).
    """

    model: nn.Module
    blocks: list[BlockSites]
    loose: list[LooseSlot]
    skipped: list[tuple[str, str]]
    unslotted: list[tuple[str, str]]
    example: ExampleInputs
    inputs: dict[int, Call]
    unanalysed: list[tuple[str, str]] = field(default_factory=list)
    unreached: tuple[Unreached, ...] = ()


@dataclass(frozen=True)
class Unreached:
    """A module whose parameters the probe's input never reached.

    Attributes:
        path: its qualified name (the outermost such module).
        parameters: how many parameter values it holds.
    """

    path: str
    parameters: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "parameters": self.parameters}


def _pruned_parameters(model: nn.Module) -> frozenset[str]:
    """Parameters of branches dpatch pruned (never run, by design)."""
    parts = [
        qualify(path, d)
        for path, mod in model.named_modules()
        if (meta := block_meta(mod)) is not None
        for s in meta.sites
        if s.pruned
        for d in s.dropped
    ]
    if not parts:
        return frozenset()
    return frozenset(
        n
        for n, _ in model.named_parameters(remove_duplicate=False)
        if any(n == q or n.startswith(q + ".") for q in parts)
    )


def unreached_modules(model: nn.Module, unused: frozenset[str]) -> tuple[Unreached, ...]:
    """The outermost modules all of whose parameters are in ``unused`` (names), in
    registration order, with their parameter counts."""
    if not unused:
        return ()
    out: list[Unreached] = []
    covered: list[str] = []
    for path, mod in model.named_modules():
        if any(path == c or path.startswith(c + ".") for c in covered):
            continue
        names = [qualify(path, n) for n, _ in mod.named_parameters(remove_duplicate=False)]
        if names and all(n in unused for n in names):
            count = sum(p.numel() for p in mod.parameters())
            out.append(Unreached(path, count))
            covered.append(path)
    return tuple(out)


def _candidates(model: nn.Module, pr: Probe) -> Iterator[tuple[str, nn.Module]]:
    """Modules whose own forward may add a residual: they ran and have children."""
    for path, mod in model.named_modules():
        if id(mod) not in pr.order:
            continue
        if not any(True for _ in mod.children()):
            continue
        if isinstance(mod, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            continue
        if type(mod).__module__.startswith(("torch.nn.", "torch.ao.nn.")):
            continue  # PyTorch's own layers (MultiheadAttention, Transformer*) are leaves
        yield path, mod


def _check_materialised(model: nn.Module) -> None:
    lazy = next(
        (n for n, p in model.named_parameters() if isinstance(p, nn.UninitializedParameter)),
        None,
    )
    if lazy is not None:
        raise InvalidValueError(
            f"parameter {lazy!r} is uninitialized (a lazy module); run one forward pass to "
            "materialize the model before patching it"
        )


def _has_own_add_source(mod: nn.Module, memo: dict[type, str | None]) -> bool:
    """Whether an untraceable module's forward source could hold an addition (for reports)."""
    src = forward_source(mod, memo)
    return src is None or "+" in src or "add" in src


def _rewritten_block(path: str, mod: nn.Module, order: int) -> BlockSites:
    meta = block_meta(mod)
    assert meta is not None
    sites = [BlockSite(s.attr, s.kind, s.origin) for s in meta.sites]
    return BlockSites(path, mod, order, sites, None, meta.coverage, list(meta.unslotted))


class TraceCache:
    """Traces shared by blocks that are the same for their forward: equal trace keys
    (class, plain attributes, the structure under the block, recorded arguments) and equal
    values wherever the forward read under the block (:class:`Reads`). Failures are
    remembered the same way."""

    def __init__(self, known: dict[int, Any]) -> None:
        self._known = known
        self._traces: dict[Hashable, list[tuple[Reads, TracedBlock | TraceError]]] = {}

    def get(self, mod: nn.Module, call: Call) -> TracedBlock:
        """The trace of ``mod`` run on ``call``.

        Raises:
            TraceError: the block cannot be traced or its trace does not run.
        """
        key = config_key(mod, call)
        entries = self._traces.setdefault(key, []) if key is not None else []
        hit = next((h for reads, h in entries if reads.match(mod)), None)
        if hit is None:
            recorder = Recorder()
            hit = self._trace(mod, call, recorder)
            if key is not None:
                entries.append((recorder.reads(), hit))
        if isinstance(hit, TraceError):
            raise hit
        return hit

    def _trace(self, mod: nn.Module, call: Call, recorder: Recorder) -> TracedBlock | TraceError:
        """A plain trace; failing that, one with value-carrying proxies (a forward that
        branches on shapes or arguments, or unpacks a child's tuple: its source is
        rewritten, exact for every call); failing that, a plain trace specialised to the
        recorded None/constant arguments (a graph for those values only: generation's
        ``use_cache=True`` would fail its guards); failing that, the first error."""
        try:
            return trace_and_run(mod, call, self._known, recorder)
        except TraceError as exc:
            first = exc
        try:
            return meta_trace(mod, call, self._known, recorder)
        except TraceError:
            pass
        try:
            return trace_and_run(mod, call, self._known, recorder, specialise=True)
        except TraceError:
            return first


def _called_when_filled(
    mod: nn.Module, call: Call, attrs: list[str], known: dict[int, Any]
) -> list[str]:
    """Which empty (``None``) slots ``mod``'s forward calls once they hold a module: a trace
    of a shallow copy whose slots hold ``nn.Identity``."""
    shadow = copy.copy(mod)
    shadow.__dict__ = dict(mod.__dict__)
    shadow._modules = dict(mod._modules)
    for attr in attrs:
        del shadow.__dict__[attr]
        shadow._modules[attr] = nn.Identity()
    try:
        graph = trace_module(shadow).graph
    except Exception:  # the filled copy does not trace: the slots stay empty, as reported
        return []
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    return [a for a in attrs if a in called]


def analyze(
    model: nn.Module,
    example_inputs: Sequence[Any] | ExampleInputs | None = None,
    coverage: str = "slots",
) -> Analysis:
    """Probe, trace and classify ``model`` (:func:`find_sites` is the public form).

    ``coverage="slots"``: when the model has native slots, they alone are its sites (the
    author chose where stochastic depth goes); ``"all"``: native slots plus every residual
    addition without one.

    Raises:
        InvalidValueError: the model has lazy modules that were never run.
        ProbeError: the model runs on no input (given, or inferred).
    """
    if coverage not in COVERAGES:
        raise InvalidValueError(
            f"unknown coverage {coverage!r}; choose one of: {', '.join(COVERAGES)}"
        )
    _check_materialised(model)
    pr = probe(model, example_inputs)
    assert pr.example is not None
    skipped: list[tuple[str, str]] = []
    unanalysed: list[tuple[str, str]] = []
    slot_paths_called = {
        n
        for n, m in model.named_modules()
        if id(m) in pr.order and is_slot_module(m, n.rsplit(".", 1)[-1])
    }

    blocks: list[BlockSites] = []
    traced_slots: set[str] = set()  # slots a traced forward calls (residual or not)
    none_loose: list[LooseSlot] = []  # ``None`` slots of blocks that cannot be traced
    idle_none_slots: set[str] = set()  # ``None`` slots of traced blocks, on no residual
    traces = TraceCache(pr.ran_once())
    # graph -> its residual adds (shared traces); keyed by the graph itself, which keeps
    # it alive: an uncached trace's id could be reused by the next block's graph
    adds_of: dict[Any, list[Any]] = {}
    sources: dict[type, str | None] = {}
    for path, mod in _candidates(model, pr):
        order = pr.order[id(mod)]
        if block_meta(mod) is not None:
            blocks.append(_rewritten_block(path, mod, order))
            continue
        try:
            traced = traces.get(mod, pr.inputs[id(mod)])
        except TraceError as exc:
            if _has_own_add_source(mod, sources):
                unanalysed.append((path, first_line(exc, typed=True)))
            # timm's ``drop_path = None`` slots still work unfused: the forward calls them
            # once they hold a module.
            none_loose += [
                LooseSlot(qualify(path, a), path, order)
                for a in referenced_none_slots(mod, sources)
            ]
            continue
        slot_nodes = [
            n
            for n in traced.graph.nodes
            if n.op == "call_module"
            and is_slot_module(mod.get_submodule(str(n.target)), str(n.target).rsplit(".", 1)[-1])
        ]
        traced_slots.update(qualify(path, str(n.target)) for n in slot_nodes)
        key = traced.graph
        if key not in adds_of:
            adds_of[key] = find_residual_adds(mod, traced.graph, traced.env, slot_nodes)
        sites = assign_slots(mod, adds_of[key])
        attrs = {s.attr for s in sites}
        idle = [a for a in referenced_none_slots(mod, sources) if a not in attrs]
        if idle and not sites:
            # timm's VoVNet keeps ``drop_path = None`` at rate 0 and calls it, on the block
            # output, once it holds a module: such a slot is a site that drops that output.
            filled = _called_when_filled(mod, pr.inputs[id(mod)], idle, pr.ran_once())
            none_loose += [LooseSlot(qualify(path, a), path, order, residual=False) for a in filled]
            idle = [a for a in idle if a not in filled]
        idle_none_slots.update(qualify(path, a) for a in idle)
        if sites:
            blocks.append(BlockSites(path, mod, order, sites, traced, coverage))

    covered_slots = {
        qualify(b.path, str(s.add.slot_node.target) if s.add and s.add.slot_node else s.attr)
        for b in blocks
        for s in b.sites
        if b.traced is None or (s.add is not None and s.add.slot_node is not None)
    }
    # A slot a traced forward calls on no residual addition (timm's MobileViT and VoVNet
    # drop a block's whole output, RDNet concatenated features) is a site that drops what
    # it is given (residual=False: unfused, never skipped), so native rates reach it as
    # the library's own would. A slot never seen in a trace (inside a leaf nn.Sequential,
    # or in a block that cannot be traced) is taken at its word.
    loose = [
        LooseSlot(
            s,
            owner_of(s, model),
            pr.order[id(model.get_submodule(s))],
            residual=s not in traced_slots,
        )
        for s in slot_paths_called - covered_slots
    ]
    loose = sorted(loose + none_loose, key=lambda s: s.order)
    ignored: list[tuple[str, str]] = []
    native = (
        native_slots_win([b.sites for b in blocks], bool(loose)) if coverage == "slots" else None
    )
    if native is not None:
        # Trace failures cannot hide sites here: native slots are found by the probe.
        unanalysed = []
        for b, kept in zip(blocks, native, strict=True):
            b.unslotted += [s.attr for s in b.sites if s not in kept]
            b.sites = kept
        ignored = [(b.path, attr) for b in blocks for attr in b.unslotted]
        blocks = [b for b in blocks if b.sites]
    skipped = [*unanalysed, *skipped]
    skipped += [
        (s, "empty slot that this block's forward does not use; left alone")
        for s in sorted(idle_none_slots)
    ]
    return Analysis(
        model=model,
        blocks=blocks,
        loose=loose,
        skipped=skipped,
        unslotted=ignored,
        example=pr.example,
        inputs=pr.inputs,
        unanalysed=unanalysed,
        unreached=unreached_modules(model, pr.unused - _pruned_parameters(model)),
    )
