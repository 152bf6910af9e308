"""Finding residual sites: native DropPath slots and residual additions found by tracing.

Read-only: nothing here changes the model (hooks are added and removed, traces work on
shallow copies). The public result is a list of frozen :class:`Site`; :func:`analyze`
returns the richer :class:`Analysis` that :mod:`dpatch.patch` and :mod:`dpatch.rewrite` use.

How a site is found (each step in its own module):

1. *Probe* (:mod:`dpatch._probe`): one forward pass on the meta device records which
   modules run, in which order, and with which inputs.
2. *Trace* (:mod:`dpatch._trace`): each module that ran and has children is traced on its
   own with torch.fx, children as leaves, and the graph runs on the recorded meta inputs to
   learn every value's shape.
3. *Classify* (:mod:`dpatch.residual`): which additions are residual, and the rule that a
   model's native slots alone define its sites when it has any.
4. *Slots* (:mod:`dpatch._slots`): each residual addition gets the attribute that holds (or
   will hold) its DropPath; native slots that run outside traced blocks are taken at their
   word.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dpatch._inputs import ExampleInputs
from dpatch._marks import block_meta
from dpatch._probe import Call, Probe, probe
from dpatch._slots import (
    SLOT_ATTRS,
    assign_slots,
    forward_source,
    is_slot_module,
    owner_of,
    referenced_none_slots,
    slot_settings,
)
from dpatch._trace import TraceCache, TracedBlock, one_line
from dpatch.droppath import DropPath
from dpatch.errors import InvalidValueError, TraceError
from dpatch.residual import BlockSite, find_residual_adds, native_slots_win

#: Which residual additions are sites: a model's native slots only when it has any
#: (``"slots"``), or those plus every addition without a slot (``"all"``).
COVERAGES: tuple[str, ...] = ("slots", "all")

__all__ = [
    "COVERAGES",
    "SLOT_ATTRS",
    "Analysis",
    "BlockSites",
    "LooseSlot",
    "Site",
    "analyze",
    "find_sites",
    "is_slot_module",
    "probe",
    "qualify",
    "slot_settings",
]


@dataclass(frozen=True)
class Site:
    """One residual branch and the stochastic depth on it.

    Attributes:
        path: qualified name of the module whose forward adds the branch ("" for the root).
        branch: name of the branch inside that module: its slot attribute (``drop_path1``)
            or, for a slot nested deeper, the slot's path relative to ``path``.
        block: 0-based depth index of the owning block in forward execution order.
        kind: ``"native"`` (a timm/torchvision/dpatch slot the model author placed) or
            ``"graph"`` (a residual addition found by tracing).
        rate: current drop probability.
        mode: ``"row"`` or ``"batch"``.
        scaling: ``"inverted"``, ``"expected"`` or ``"none"``.
        slot: qualified name of the module that applies the drop (may not exist yet on an
            unpatched model: a ``None`` slot or a graph site).
        fused: the residual addition runs through dpatch's fused ``drop_add``.
        skip: compute-skipping is on for this site.
        origin: for native sites, the model's own slot this site came from (a slot one
            module shared by two branches is the origin of both); "" for graph sites.
        residual: False for a native slot its model applies to something other than a
            residual branch (it drops that whole value; never fused or skipped).
    """

    path: str
    branch: str
    block: int
    kind: str
    rate: float
    mode: str = "row"
    scaling: str = "inverted"
    slot: str = ""
    fused: bool = False
    skip: bool = False
    origin: str = ""
    residual: bool = True

    @property
    def name(self) -> str:
        """``path.branch``, the site's unique name in the model."""
        return qualify(self.path, self.branch)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (used by manifests and ``--json`` output)."""
        return {
            "path": self.path,
            "branch": self.branch,
            "block": self.block,
            "kind": self.kind,
            "rate": self.rate,
            "mode": self.mode,
            "scaling": self.scaling,
            "slot": self.slot,
            "fused": self.fused,
            "skip": self.skip,
            "origin": self.origin,
            "residual": self.residual,
        }


def qualify(path: str, name: str) -> str:
    """``path.name``, or ``name`` for the root module (path "")."""
    return f"{path}.{name}" if path else name


# --------------------------------------------------------------------------- analysis
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
    """

    model: nn.Module
    blocks: list[BlockSites]
    loose: list[LooseSlot]
    skipped: list[tuple[str, str]]
    unslotted: list[tuple[str, str]]
    example: ExampleInputs
    inputs: dict[int, Call]

    def sites(self) -> list[Site]:
        """The public sites, numbered by block in forward order, with current settings."""
        return _build_sites(self)


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
    adds_of: dict[int, list[Any]] = {}  # id(graph) -> its residual adds (shared traces)
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
                skipped.append((path, one_line(exc)))
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
        key = id(traced.graph)
        if key not in adds_of:
            adds_of[key] = find_residual_adds(mod, traced.graph, traced.env, slot_nodes)
        sites = assign_slots(mod, adds_of[key])
        attrs = {s.attr for s in sites}
        idle_none_slots.update(
            qualify(path, a) for a in referenced_none_slots(mod, sources) if a not in attrs
        )
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
        skipped = []
        for b, kept in zip(blocks, native, strict=True):
            b.unslotted += [s.attr for s in b.sites if s not in kept]
            b.sites = kept
        ignored = [(b.path, attr) for b in blocks for attr in b.unslotted]
        blocks = [b for b in blocks if b.sites]
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
    )


# --------------------------------------------------------------------------- public sites
@dataclass(frozen=True)
class _Found:
    """A site before blocks are numbered."""

    owner: str  # the module whose forward adds the branch
    branch: str
    slot: str
    kind: str
    order: int  # the owner's first-call order
    in_block: bool  # on a traced residual addition (can be fused)
    origin: str
    residual: bool = True


def _get_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _is_rewritten(model: nn.Module, path: str) -> bool:
    mod = _get_or_none(model, path)
    return mod is not None and block_meta(mod) is not None


def _build_sites(an: Analysis) -> list[Site]:
    found = [
        _Found(
            b.path,
            s.attr,
            b.slot_name(s.attr),
            s.kind,
            b.order,
            True,
            qualify(b.path, s.origin) if s.origin else "",
        )
        for b in an.blocks
        for s in b.sites
    ]
    found += [
        _Found(
            s.owner_path,
            s.slot_path[len(s.owner_path) + 1 :] if s.owner_path else s.slot_path,
            s.slot_path,
            "native",
            s.order,
            False,
            s.slot_path,
            s.residual,
        )
        for s in an.loose
    ]
    # Owners nested in another owner (an HF output module inside its layer) share its block.
    owners = sorted({(f.order, f.owner) for f in found})
    owner_paths = [p for _, p in owners]
    group: dict[str, str] = {}
    for p in owner_paths:
        outer = [q for q in owner_paths if q and p.startswith(q + ".")]
        group[p] = min(outer, key=len) if outer else p
    order_of = {p: o for o, p in owners}
    heads = sorted({group[p] for p in owner_paths}, key=lambda p: order_of[p])
    block_index = {h: i for i, h in enumerate(heads)}

    model = an.model
    sites: list[Site] = []
    for f in found:
        slot = f.slot
        module = _get_or_none(model, slot)
        rewritten = _is_rewritten(model, f.owner)
        if module is None and f.origin and not rewritten:
            # A shared slot in a block that could not be rewritten: both branches use
            # the model's one module.
            slot, module = f.origin, _get_or_none(model, f.origin)
        settings = slot_settings(module)
        fused = f.in_block and rewritten
        sites.append(
            Site(
                path=f.owner,
                branch=f.branch,
                block=block_index[group[f.owner]],
                kind=f.kind,
                rate=settings.rate,
                mode=settings.mode,
                scaling=settings.scaling,
                slot=slot,
                fused=fused,
                skip=isinstance(module, DropPath) and module.skip and f.in_block,
                origin=f.origin,
                residual=f.residual,
            )
        )
    # Stable: by block, then by the order the entries were found (graph order in a block).
    return sorted(sites, key=lambda s: s.block)


def find_sites(
    model: nn.Module, example_inputs: Sequence[Any] | None = None, coverage: str = "slots"
) -> list[Site]:
    """Every residual site of ``model`` with its current rate, in forward order. Read-only.

    Args:
        model: any ``nn.Module``.
        example_inputs: positional inputs for one forward pass (shapes and dtypes only
            matter: they run on the meta device). Default: inferred from the model (its
            library's metadata, else its first layer; see the README).
        coverage: ``"slots"`` (a model's native slots alone when it has any) or ``"all"``
            (those plus every residual addition without a slot).

    Raises:
        ProbeError: the model runs on no input; pass ``example_inputs``.
    """
    return analyze(model, example_inputs, coverage).sites()
