"""Models: specs (``timm:``, ``tv:``, ``hf:``, ``module:factory``; :mod:`._spec`), building
and listing them (:mod:`._zoo`), transformers as a zoo (:mod:`._hf`, imported only when
used), each library's own rates (:mod:`._native`), and a model's own LayerDrop
(:mod:`._layerdrop`).

Other packages import from here only; the modules inside are this package's own.
"""

from __future__ import annotations

from dpatch.models._layerdrop import (
    LayerDrop,
    find_layerdrop,
    layerdrop_from_dict,
    paused_layerdrop,
    restore_layerdrop,
    set_layerdrop,
    unused_layerdrop,
)
from dpatch.models._native import build_light, tv_build_kwargs
from dpatch.models._spec import ModelEntry, ModelSpec, set_model_spec
from dpatch.models._zoo import (
    create_model,
    list_models,
    native_rates,
    parse_spec,
    rebuild,
    rebuild_info,
    spec_of,
    transformers_quiet,
)

__all__ = [
    "LayerDrop",
    "ModelEntry",
    "ModelSpec",
    "build_light",
    "create_model",
    "find_layerdrop",
    "layerdrop_from_dict",
    "list_models",
    "native_rates",
    "parse_spec",
    "paused_layerdrop",
    "rebuild",
    "rebuild_info",
    "restore_layerdrop",
    "set_layerdrop",
    "set_model_spec",
    "spec_of",
    "transformers_quiet",
    "tv_build_kwargs",
    "unused_layerdrop",
]
