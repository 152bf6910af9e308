"""Files: saving and loading dpatch files, loading weights, atomic writes.

A dpatch file is an ordinary safetensors file whose tensor names are exactly the unpatched
model's ``state_dict`` keys, so ``safetensors.torch.load_file`` plus
``model.load_state_dict(strict=True)`` works without dpatch. Its metadata holds the patch
manifest (:mod:`dpatch.manifest`).

Pickles are never trusted: ``.pt``/``.pth`` files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpatch.analysis import qualify
from dpatch.errors import InvalidValueError, ManifestError, OutputError, WeightsError, first_line
from dpatch.files._manifest import (
    DEPTH_KEY,
    MANIFEST_KEY,
    build_manifest,
    parse_manifest,
    schedule_from_manifest,
)
from dpatch.models import ModelSpec, create_model, parse_spec, rebuild, rebuild_info, spec_of
from dpatch.patching import PatchReport, apply_layerdrop_entries, apply_sites, disagreement
from dpatch.patching import inspect as inspect_model

__all__ = [
    "Target",
    "atomic_write",
    "check_output",
    "load",
    "load_state_dict_file",
    "load_target",
    "load_weights",
    "plain_mode",
    "read_manifest",
    "save",
]

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "ema_model")
_PREFIXES = ("module.", "_orig_mod.", "model.", "ema.")
_DROP_KEYS = ("n_averaged",)  # torch.optim.swa_utils.AveragedModel bookkeeping


# --------------------------------------------------------------------------- writing
def check_output(path: str | os.PathLike[str], force: bool) -> Path:
    """Validate an output path before any work: folder exists and is writable, no clobber.

    Raises:
        OutputError: with the path and what to do.
    """
    out = Path(path)
    check_folder(out)
    if out.is_dir():
        raise OutputError(f"output {str(out)!r} is a folder; give a file name")
    if out.exists() and not force:
        raise OutputError(f"output {str(out)!r} exists; pass --force to overwrite it")
    return out


def check_folder(out: Path) -> None:
    """The folder ``out`` goes in exists and is writable, or an :class:`OutputError`."""
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder {str(folder)!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {str(folder)!r} is not writable; choose another -o")


def plain_mode(path: str | os.PathLike[str], *, folder: bool = False) -> None:
    """Give ``path``, written through a private temporary (``mkstemp`` makes 0o600,
    ``mkdtemp`` 0o700), the mode ``open(path, "w")`` (``mkdir``) would have given it: 0o666
    (0o777) less the umask."""
    mask = os.umask(0o077)  # read it; the strict value is in force for that instant only
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[str], None], *, force: bool = False
) -> Path:
    """Call ``write(tmp)`` on a temporary file in the target folder, then rename it into
    place, with the mode a plain write would give it. An interrupted or failed write leaves
    neither a partial output nor the temp file.
    """
    out = check_output(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        plain_mode(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _plain_tensors(model: nn.Module) -> dict[str, Tensor]:
    """state_dict tensors, contiguous and with no shared storage (safetensors needs both)."""
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in model.state_dict().items():
        if value.is_meta:
            raise OutputError(f"tensor {key!r} is on the meta device; materialise the model first")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # tied weights: each name gets its own copy
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        out[key] = t
    return out


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    report: PatchReport | None = None,
    *,
    spec: ModelSpec | None = None,
    force: bool = False,
    depth: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and its patch manifest to a safetensors file, atomically.

    The manifest describes the model as it is now. Tensors that only pruned branches use
    are left out; the manifest lists their keys.

    Args:
        model: the patched (or plain) model.
        path: output file.
        report: the :class:`~dpatch.PatchReport` of the model's last patch (its schedule
            labels the file); default: inspect ``model``, labelled with the schedule it was
            last patched with.
        spec: the model spec to rebuild it (default: what :func:`dpatch.models.create_model`
            recorded, timm's architecture name, or a transformers model's class; the
            manifest of a transformers model also holds its class and full config).
        force: overwrite an existing file.
        depth: extra records for the manifest's ``depth`` entry (folded sites).

    Raises:
        InvalidValueError: ``report`` does not describe the model as it is now (a report
            from before a later ``retune``), naming the first difference.
    """
    from safetensors.torch import save_file

    from dpatch.depth import unused_state_keys

    out = check_output(path, force)
    if report is not None and (stale := disagreement(model, report.sites)):
        raise InvalidValueError(
            f"the report given to save does not describe the model as it is now ({stale}); "
            "pass the report of the model's last inject/retune, or leave report out"
        )
    if spec is None:
        spec = spec_of(model)
    manifest = build_manifest(
        report if report is not None else inspect_model(model), spec, rebuild_info(model)
    )
    tensors = _plain_tensors(model)
    pruned_keys = unused_state_keys(model)
    if pruned_keys:  # tensors only pruned branches use (see dpatch.prune)
        tensors = {k: v for k, v in tensors.items() if k not in set(pruned_keys)}
    depth = {**(depth or {}), **({"pruned_keys": list(pruned_keys)} if pruned_keys else {})}
    if depth:
        manifest[DEPTH_KEY] = depth
    metadata = {MANIFEST_KEY: json.dumps(manifest, sort_keys=True), "format": "pt"}
    return atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=metadata), force=force)


# --------------------------------------------------------------------------- reading
def _check_readable(path: Path) -> None:
    if not path.exists():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if path.is_dir():
        raise WeightsError(f"weights path {str(path)!r} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise WeightsError(f"weights file {str(path)!r} is not readable (permissions)")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file {str(path)!r} is empty")


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header size, then '{'; a file
    named ``.safetensors`` is read as one (so a damaged one says so)."""
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The dpatch manifest of a safetensors file, None for a plain one; reads no tensors.

    Raises:
        WeightsError: missing, unreadable or corrupt file.
        ManifestError: a manifest that is not valid JSON or of an unknown format.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    _check_readable(p)
    if not _is_safetensors(p):
        return None
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"{str(p)!r} is not a valid safetensors file ({first_line(exc)})"
        ) from exc
    raw = meta.get(MANIFEST_KEY)
    return None if raw is None else parse_manifest(raw, str(p))


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a weights file: safetensors, or a weights-only torch checkpoint.

    Nested checkpoints (``state_dict``, ``model``, ``model_state_dict``, ...) are unwrapped;
    EMA weights are used when they are the only weights in the file.

    Raises:
        WeightsError: missing, unreadable, corrupt or truncated file, or a pickle that needs
            more than tensors to load.
    """
    p = Path(path)
    _check_readable(p)
    if _is_safetensors(p):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(
                f"{str(p)!r} is a corrupt or truncated safetensors file ({first_line(exc)}); "
                "re-download or re-save it"
            ) from exc
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # bad opcodes: damage, not unsafe content
            raise WeightsError(
                f"{str(p)!r} is not a readable checkpoint (corrupt or truncated: "
                f"{first_line(exc)}); re-download or re-save it"
            ) from exc
        raise WeightsError(
            f"{str(p)!r} holds pickled Python objects besides tensors, and dpatch only loads "
            "weights-only checkpoints; re-save it with torch.save(model.state_dict(), path) "
            "or convert it to safetensors"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise WeightsError(
            f"{str(p)!r} is not a readable checkpoint (corrupt or truncated: "
            f"{first_line(exc)}); re-download or re-save it"
        ) from exc
    return _unwrap(obj, p)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in (*_NESTED_KEYS, *_EMA_KEYS):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _is_state_dict(inner):
                return dict(inner)
            if isinstance(inner, Mapping):
                for key2 in _NESTED_KEYS:
                    if _is_state_dict(inner.get(key2)):
                        return dict(inner[key2])
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
        if tensors:
            return tensors
    raise WeightsError(
        f"{str(path)!r} holds no state dict (found {type(obj).__name__}"
        + (f" with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, Mapping) else "")
        + "); save one with torch.save(model.state_dict(), path)"
    )


def _match_prefixes(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Strip DDP/compile/EMA wrapper prefixes (``module.``, ``_orig_mod.``) where they make
    the keys fit the model better."""
    state = {k: v for k, v in state.items() if k not in _DROP_KEYS}
    best = state
    best_hits = len(expected & set(state))
    changed = True
    while changed and best_hits < len(expected):
        changed = False
        for prefix in _PREFIXES:
            if best and all(k.startswith(prefix) for k in best):
                cand = {k[len(prefix) :]: v for k, v in best.items()}
                cand = {k: v for k, v in cand.items() if k not in _DROP_KEYS}
                hits = len(expected & set(cand))
                if hits > best_hits or (hits == best_hits and len(cand) == len(best)):
                    best, best_hits, changed = cand, hits, True
                    break
    return best


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    what: str = "",
    missing_ok: Collection[str] = (),
) -> None:
    """Load a weights file into ``model`` strictly, with one clear line on any mismatch.

    ``missing_ok`` names keys the file may lack (a pruned file's manifest lists them).

    Raises:
        WeightsError: unreadable file or weights of another architecture (missing,
            unexpected and mis-shaped keys are listed).
    """
    state = load_state_dict_file(path)
    own = model.state_dict()
    state = _match_prefixes(state, set(own))
    allowed = set(missing_ok)
    missing = [k for k in own if k not in state and k not in allowed]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        target = f" {what}" if what else " the model"
        raise WeightsError(
            f"weights in {str(path)!r} do not fit{target}: {'; '.join(parts)}; "
            "are they for another architecture or size?"
        )
    model.load_state_dict(state, strict=not allowed)


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild a patched model from a dpatch file: build it from the manifest's spec (or use
    ``model``), load the weights strictly and re-apply every site's rate, mode and scaling,
    and the model's own LayerDrop rates (with what ``inject`` turned off, for ``strip``).

    Raises:
        ManifestError: the file has no manifest, or its sites do not fit the model.
        WeightsError: see :func:`load_weights`.
    """
    manifest = read_manifest(path)
    if manifest is None:
        raise ManifestError(
            f"{str(path)!r} has no dpatch manifest; build the model yourself and use "
            "--weights / dpatch.load_weights"
        )
    if model is None:
        entry = manifest.get("model")
        if not entry or not entry.get("spec"):
            raise ManifestError(
                f"the manifest of {str(path)!r} names no model spec; pass the model: "
                "dpatch.load(path, model=...)"
            )
        model = rebuild(entry)
    pruned_keys = [str(k) for k in (manifest.get(DEPTH_KEY) or {}).get("pruned_keys") or []]
    load_weights(model, path, missing_ok=pruned_keys)
    skip = bool(manifest.get("schedule", {}).get("skip"))
    apply_sites(model, manifest["sites"], skip=skip, schedule=schedule_from_manifest(manifest))
    apply_layerdrop_entries(model, manifest.get("layerdrop") or [])
    pruned = [qualify(d["path"], d["branch"]) for d in manifest["sites"] if d.get("pruned")]
    if pruned:
        _prune_again(model, pruned, pruned_keys, path)
    return model


def _prune_again(
    model: nn.Module, names: list[str], keys: list[str], path: str | os.PathLike[str]
) -> None:
    """Prune a rebuilt model's branches as its file says; the keys the file left out must
    be exactly ones the pruned model does not use."""
    from dpatch.depth import prune, unused_state_keys

    prune(model, names)
    used = sorted(set(keys) - set(unused_state_keys(model)))
    if used:
        raise ManifestError(
            f"{str(path)!r} leaves out {len(used)} tensor(s) the pruned model uses (e.g. "
            f"{used[0]}); the file was made by another dpatch or for another model"
        )


@dataclass(frozen=True)
class Target:
    """A model built from what a user named (see :func:`load_target`).

    Attributes:
        model: the model (patched when it was rebuilt from a dpatch file).
        spec: the spec it was built from, when known.
        notes: what a user may want to know (a bare name resolved to a library).
    """

    model: nn.Module
    spec: ModelSpec | None
    notes: tuple[str, ...] = ()


_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def load_target(
    target: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    model: str | None = None,
    pretrained: bool = False,
) -> Target:
    """Build the model ``target`` names: a model spec (``timm:NAME``, ``tv:NAME``,
    ``hf:ORG/NAME``, ``hf:PATH``, a bare name, ``module:factory``), a dpatch file (rebuilt with its patch), or a plain checkpoint
    whose architecture ``model`` names. What ``dpatch inject TARGET`` does first.

    Args:
        target: a spec or a file path.
        weights: a state dict file to load into the built model.
        model: the architecture (a spec) of a plain checkpoint given as ``target``.
        pretrained: download the library's pretrained weights.

    Raises:
        WeightsError: a missing file, or a checkpoint without a manifest and no ``model``.
        ModelNotFoundError, DownloadError: see :func:`dpatch.models.create_model`.
    """
    path = Path(target)
    if path.suffix in _CHECKPOINT_SUFFIXES or path.is_file():
        if not path.exists():
            raise WeightsError(f"file {target!r} does not exist")
        manifest = read_manifest(path) if path.suffix != ".pt" else None
        if manifest is not None:
            # A manifest always applies: with ``model``, onto that architecture.
            if model is None:
                loaded = load(path)
                return Target(loaded, spec_of(loaded))
            spec, note = parse_spec(model)
            loaded = load(path, model=create_model(spec, pretrained=pretrained))
            return Target(loaded, spec, (note,) if note else ())
        if model is None:
            raise WeightsError(
                f"{target!r} is a checkpoint without a dpatch manifest; say which "
                "architecture it holds (--model NAME, or model= in Python)"
            )
        weights, target = path, model
    spec, note = parse_spec(target)
    built = create_model(spec, pretrained=pretrained)
    if weights is not None:
        load_weights(built, weights, what=spec.text)
    return Target(built, spec, (note,) if note else ())
