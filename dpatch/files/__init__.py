"""Files: safetensors with the dpatch manifest (:mod:`._manifest`), saving, loading and
weights (:mod:`._files`, atomic writes), pruned transformers models as ``save_pretrained``
directories (:mod:`._pretrained`), and many checkpoints per command (:mod:`._batch`,
:mod:`._batch_inputs`).

Other packages import from here only; the modules inside are this package's own.
"""

from __future__ import annotations

from dpatch.files._batch import (
    FileResult,
    inspect_many,
    patch_many,
    verify_many,
)
from dpatch.files._batch_inputs import Batch, is_many, prepare_batch
from dpatch.files._files import (
    Target,
    atomic_write,
    check_output,
    load,
    load_state_dict_file,
    load_target,
    load_weights,
    read_manifest,
    save,
)
from dpatch.files._manifest import report_from_manifest
from dpatch.files._pretrained import (
    PretrainedExport,
    check_output_dir,
    is_transformers_model,
    save_pretrained,
)

__all__ = [
    "Batch",
    "FileResult",
    "PretrainedExport",
    "Target",
    "atomic_write",
    "check_output",
    "check_output_dir",
    "inspect_many",
    "is_many",
    "is_transformers_model",
    "load",
    "load_state_dict_file",
    "load_target",
    "load_weights",
    "patch_many",
    "prepare_batch",
    "read_manifest",
    "report_from_manifest",
    "save",
    "save_pretrained",
    "verify_many",
]
