"""Analysis: which residual branches a model has. Read-only.

model -> probe (one meta-device forward pass, :mod:`._probe`, on inputs from :mod:`._inputs`)
-> one trace per block configuration (:mod:`._trace`, or :mod:`._metatrace` for forwards that
branch on shapes) -> residual rules (:mod:`._residual`) -> native slots (:mod:`._slots`) ->
:class:`Analysis` (:mod:`._analyze`) -> public :class:`Site` records (:mod:`._sites`).

Other packages import from here only; the modules inside are this package's own.
"""

from __future__ import annotations

from dpatch.analysis._analyze import Analysis, BlockSites, LooseSlot, Unreached, analyze, qualify
from dpatch.analysis._inputs import ExampleInputs, parse_shape
from dpatch.analysis._meta import materialise, meta_execution, real_execution, to_meta
from dpatch.analysis._probe import Call, Probe, probe
from dpatch.analysis._residual import INPLACE_ADDS, BlockSite
from dpatch.analysis._sites import Site, find_sites, site_list
from dpatch.analysis._slots import SLOT_ATTRS, SlotSettings, is_slot_module, slot_settings
from dpatch.analysis._trace import (
    HelperSpan,
    Span,
    bind_inputs,
    run_graph_meta,
    trace_module,
)
from dpatch.analysis._views import is_dropout, is_reshape, may_alias
from dpatch.analysis._wrappers import wrapper_names

__all__ = [
    "INPLACE_ADDS",
    "SLOT_ATTRS",
    "Analysis",
    "BlockSite",
    "BlockSites",
    "Call",
    "ExampleInputs",
    "HelperSpan",
    "LooseSlot",
    "Probe",
    "Site",
    "SlotSettings",
    "Span",
    "Unreached",
    "analyze",
    "bind_inputs",
    "find_sites",
    "is_dropout",
    "is_reshape",
    "is_slot_module",
    "materialise",
    "may_alias",
    "meta_execution",
    "parse_shape",
    "probe",
    "qualify",
    "real_execution",
    "run_graph_meta",
    "site_list",
    "slot_settings",
    "to_meta",
    "trace_module",
    "wrapper_names",
]
