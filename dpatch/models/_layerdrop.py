"""A model's own LayerDrop (Fan et al. 2019): a forward that skips whole layers of a list
at random in training, as fairseq and many transformers models do (wav2vec2, HuBERT,
Whisper, BART, OPT, ...: ``config.layerdrop``, ``encoder_layerdrop``, ``decoder_layerdrop``).

Recognised by reading code, not by a table of models, and without running anything:

- a module whose ``forward`` source has a loop over one of its layer lists
  (``for layer in self.layers``, ``enumerate(self.layers)``, ``range(n)`` with
  ``self.layers[i]``) and, inside that loop, reads a ``*layerdrop*`` attribute of its config
  (``self.config.layerdrop``) or of itself (``self.layerdrop``); the rate is what that
  attribute holds. When the module keeps its own copy of a config value
  (``self.layerdrop = config.encoder_layerdrop`` in ``__init__``, as transformers 5 encoders
  do), the config value is the rate the model claims and the copy is what its forward
  reads; both are reported, and setting a rate sets both;
- a fairseq ``LayerDropModuleList``: a module list whose class name says LayerDrop and
  that holds its rate as ``p`` (it drops layers while it is iterated).
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from dpatch.marks import block_meta, layerdrop_mark, set_layerdrop_mark

__all__ = [
    "LayerDrop",
    "find_layerdrop",
    "layerdrop_from_dict",
    "paused_layerdrop",
    "restore_layerdrop",
    "set_layerdrop",
    "unused_layerdrop",
]

_CONFIG = "config."


@dataclass(frozen=True)
class LayerDrop:
    """One layer list that a model's own code drops layers of, in training.

    Attributes:
        path: the module whose forward skips layers ("" for the model itself).
        layers: the qualified name of its layer list.
        count: layers in the list.
        rate: the rate the model claims: the value ``attr`` names.
        attr: where that rate is set, relative to ``path``: ``config.layerdrop``,
            ``config.encoder_layerdrop``, ... (the model's config), or a plain attribute
            of the module (``layerdrop``; ``layers.p`` for a ``LayerDropModuleList``).
        read: what the forward reads, relative to ``path`` (``config.layerdrop``, or the
            module's own copy ``layerdrop``).
        read_rate: the value ``read`` holds now: the rate that really runs (equal to
            ``rate`` unless the two were set apart).
        original: the rate before dpatch turned this LayerDrop off (``inject``), which
            ``strip`` puts back; None when dpatch did not change it.
    """

    path: str
    layers: str
    count: int
    rate: float
    attr: str
    read: str
    read_rate: float
    original: float | None = None

    def describe(self) -> str:
        """``encoder.layers (12 layers) at 0.1 (config.layerdrop)``."""
        how = [self.attr]
        if self.read != self.attr and self.read_rate != self.rate:
            how.append(f"its forward reads {self.read} = {self.read_rate:g}")
        if self.original is not None:
            how.append(f"turned off by dpatch inject, was {self.original:g}")
        return f"{self.layers} ({self.count} layers) at {self.rate:g} ({'; '.join(how)})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "layers": self.layers,
            "count": self.count,
            "rate": self.rate,
            "attr": self.attr,
            "read": self.read,
            "read_rate": self.read_rate,
            "original": self.original,
        }


def layerdrop_from_dict(d: dict[str, Any]) -> LayerDrop:
    """The record :meth:`LayerDrop.to_dict` wrote (a manifest's ``layerdrop`` entry).

    Raises:
        KeyError, TypeError, ValueError: a malformed entry.
    """
    original = d.get("original")
    return LayerDrop(
        path=str(d["path"]),
        layers=str(d["layers"]),
        count=int(d["count"]),
        rate=float(d["rate"]),
        attr=str(d["attr"]),
        read=str(d.get("read") or d["attr"]),
        read_rate=float(d.get("read_rate", d["rate"])),
        original=None if original is None else float(original),
    )


# --------------------------------------------------------------------------- reading code
@dataclass(frozen=True)
class _Loop:
    """A layer loop of a forward: the list it walks and the LayerDrop attribute it reads."""

    lists: tuple[str, ...]  # child names the loop iterates or indexes, in source order
    read: str  # "layerdrop" (self.layerdrop) or "config.layerdrop" (self.config.layerdrop)


def _is_layerdrop(name: str) -> bool:
    return "layerdrop" in name.lower()


def _self_attr(node: ast.AST) -> str | None:
    """``X`` for ``self.X``, ``config.X`` for ``self.config.X``, else None."""
    if not isinstance(node, ast.Attribute):
        return None
    base = node.value
    if isinstance(base, ast.Name) and base.id == "self":
        return node.attr
    if (
        isinstance(base, ast.Attribute)
        and base.attr == "config"
        and isinstance(base.value, ast.Name)
        and base.value.id == "self"
    ):
        return _CONFIG + node.attr
    return None


def _function_ast(fn: Any, needle: str = "") -> ast.AST | None:
    """The parsed source of ``fn`` (None without source, or when it lacks ``needle``)."""
    try:
        source = inspect.getsource(inspect.unwrap(fn))
        if needle not in source.lower():
            return None
        return ast.parse(textwrap.dedent(source))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None  # built in, generated without source, or not Python source


def _own_nodes(loop: ast.For | ast.AsyncFor) -> Iterator[ast.AST]:
    """The nodes of a loop's body, not descending into loops or functions nested in it:
    what a nested loop reads belongs to that loop."""
    stack: list[ast.AST] = list(reversed(loop.body))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.For | ast.AsyncFor | ast.FunctionDef | ast.Lambda):
            continue
        stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _iterated(loop: ast.For | ast.AsyncFor) -> list[str]:
    """Names ``X`` of ``self.X`` the loop walks (``self.layers``, ``enumerate(self.layers)``,
    ``zip(self.layers, ...)``, ``self.layers[:n]``), then those its body indexes
    (``self.layers[i]``, for ``range`` loops)."""
    out = [
        name
        for node in ast.walk(loop.iter)
        if (name := _self_attr(node)) is not None and not name.startswith(_CONFIG)
    ]
    for node in _own_nodes(loop):
        if isinstance(node, ast.Subscript):
            name = _self_attr(node.value)
            if name is not None and not name.startswith(_CONFIG):
                out.append(name)
    return out


@functools.lru_cache(maxsize=512)
def _loops(cls: type) -> tuple[_Loop, ...]:
    """The layer loops of ``cls.forward`` that read a LayerDrop attribute."""
    tree = _function_ast(getattr(cls, "forward", None), "layerdrop")
    if tree is None:
        return ()
    out: list[_Loop] = []
    for loop in ast.walk(tree):
        if not isinstance(loop, ast.For | ast.AsyncFor):
            continue
        reads = [
            name
            for node in _own_nodes(loop)
            if (name := _self_attr(node)) is not None and _is_layerdrop(name.rsplit(".", 1)[-1])
        ]
        if reads:
            out.append(_Loop(tuple(_iterated(loop)), reads[0]))
    return tuple(out)


@functools.lru_cache(maxsize=512)
def _copied_from(cls: type, attr: str) -> str | None:
    """``Y`` when ``cls.__init__`` sets ``self.attr`` from ``config.Y`` (``config.Y``,
    ``self.config.Y`` or ``getattr(config, "Y", default)``), else None."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass.__module__.startswith("torch."):
            continue
        tree = _function_ast(vars(klass)["__init__"])
        if tree is None:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Assign) or len(node.targets) != 1:
                continue
            if _self_attr(node.targets[0]) != attr:
                continue
            value = node.value
            if isinstance(value, ast.Attribute) and _config_name(value.value):
                return value.attr
            if (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Name)
                and value.func.id == "getattr"
                and len(value.args) >= 2
                and _config_name(value.args[0])
                and isinstance(value.args[1], ast.Constant)
                and isinstance(value.args[1].value, str)
            ):
                return value.args[1].value
            return None  # set from something else: the attribute is its own
    return None


def _config_name(node: ast.AST) -> bool:
    """``config`` or ``self.config``."""
    if isinstance(node, ast.Name):
        return node.id == "config"
    return _self_attr(node) == "config"


# --------------------------------------------------------------------------- finding
def _rate(value: Any) -> float | None:
    """A rate-like number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def _qualify(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _ancestors(path: str) -> Iterator[str]:
    """``a.b.c`` -> ``a.b.c``, ``a.b``, ``a``, ``""``."""
    while path:
        yield path
        path = path.rpartition(".")[0]
    yield ""


def _config_with(modules: dict[str, nn.Module], path: str, name: str) -> Any:
    """The config of the module at ``path`` or its nearest ancestor that has ``name``."""
    for p in _ancestors(path):
        config = getattr(modules[p], "config", None)
        if config is not None and _rate(getattr(config, name, None)) is not None:
            return config
    return None


def _original_class(module: nn.Module) -> type:
    meta = block_meta(module)
    return meta.orig_cls if meta is not None else type(module)


def _from_loops(modules: dict[str, nn.Module], path: str, module: nn.Module) -> list[LayerDrop]:
    out: list[LayerDrop] = []
    cls = _original_class(module)
    for loop in _loops(cls):
        name = next(
            (n for n in loop.lists if isinstance(module._modules.get(n), nn.ModuleList)), None
        )
        read_rate = _rate(_get(module, loop.read))
        if name is None or read_rate is None:
            continue
        attr, rate = loop.read, read_rate
        if not loop.read.startswith(_CONFIG):
            source = _copied_from(cls, loop.read)
            config = _config_with(modules, path, source) if source else None
            if source and _is_layerdrop(source) and config is not None:
                attr, rate = _CONFIG + source, float(getattr(config, source))
        count = len(list(module.get_submodule(name).children()))
        original = _original(module, name)
        out.append(
            LayerDrop(path, _qualify(path, name), count, rate, attr, loop.read, read_rate, original)
        )
    return out


def _from_list(modules: dict[str, nn.Module], path: str, module: nn.Module) -> LayerDrop | None:
    """A fairseq ``LayerDropModuleList`` at ``path``: a record owned by its parent."""
    rate = _rate(getattr(module, "p", None))
    if rate is None or not isinstance(module, nn.ModuleList) or not path:
        return None
    if not _is_layerdrop(type(module).__name__):
        return None
    parent, _, name = path.rpartition(".")
    attr = f"{name}.p"
    original = _original(modules[parent], name)
    return LayerDrop(parent, path, len(module), rate, attr, attr, rate, original)


def _original(owner: nn.Module, name: str) -> float | None:
    mark = layerdrop_mark(owner)
    return None if mark is None else mark.get(name)


def find_layerdrop(model: nn.Module) -> tuple[LayerDrop, ...]:
    """Every layer list ``model``'s own code drops layers of in training, in module order.
    Reads code and attributes only; runs nothing."""
    modules = dict(model.named_modules(remove_duplicate=False))
    out: list[LayerDrop] = []
    seen: set[str] = set()
    for path, module in modules.items():
        found = _from_loops(modules, path, module)
        listed = _from_list(modules, path, module)
        for record in [*found, *([listed] if listed else [])]:
            if record.layers not in seen:
                seen.add(record.layers)
                out.append(record)
    return tuple(out)


def unused_layerdrop(model: nn.Module, records: tuple[LayerDrop, ...]) -> list[str]:
    """Notes for ``*layerdrop*`` values above 0 in ``model.config`` that no forward reads:
    the model drops no layers whatever its config says (MiniCPM-V#1118)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    used = {r.attr for r in records} | {r.read for r in records}
    names = sorted(k for k in _config_keys(config) if _is_layerdrop(k))
    notes = []
    for name in names:
        value = _rate(getattr(config, name, None))
        if value and _CONFIG + name not in used:
            notes.append(
                f"config.{name} is {value:g}, but no forward of this model reads it: it "
                "skips no layers by that rate"
            )
    return notes


def _config_keys(config: Any) -> list[str]:
    to_dict = getattr(config, "to_dict", None)
    try:
        keys = list(to_dict()) if callable(to_dict) else list(vars(config))
    except Exception:  # a config object that cannot list itself: nothing to say
        return []
    return [k for k in keys if isinstance(k, str)]


# --------------------------------------------------------------------------- setting
def _assign(obj: Any, name: str, value: float) -> None:
    try:
        setattr(obj, name, value)
    except Exception:  # a strict config's validator (an int-annotated rate): set past it
        object.__setattr__(obj, name, value)


def _holders(modules: dict[str, nn.Module], record: LayerDrop) -> Iterator[tuple[Any, str]]:
    """(object, attribute name) of what sets the rate and of what the forward reads."""
    owner = modules[record.path]
    for dotted in dict.fromkeys((record.attr, record.read)):
        holder_path, _, attr = dotted.rpartition(".")
        if dotted.startswith(_CONFIG):
            holder = _config_with(modules, record.path, attr)
        else:
            holder = _get(owner, holder_path) if holder_path else owner
        if holder is not None:
            yield holder, attr


@contextmanager
def paused_layerdrop(model: nn.Module) -> Iterator[None]:
    """Every LayerDrop rate at 0 for the duration, then exactly as it was: the probe runs a
    model in training mode, where layers skipped at random would go unanalysed."""
    modules = dict(model.named_modules(remove_duplicate=False))
    saved = [
        (holder, attr, getattr(holder, attr))
        for record in find_layerdrop(model)
        if record.rate or record.read_rate
        for holder, attr in _holders(modules, record)
    ]
    for holder, attr, _ in saved:
        _assign(holder, attr, 0.0)
    try:
        yield
    finally:
        for holder, attr, value in reversed(saved):
            _assign(holder, attr, value)


def set_layerdrop(
    model: nn.Module, record: LayerDrop, rate: float, *, remember: bool = False
) -> LayerDrop:
    """Set the rate of one LayerDrop: what its forward reads and, where the model keeps the
    rate in its config, the config value (what a saved config holds). Returns the record
    as it is now.

    Args:
        remember: keep the rate it had, for :func:`restore_layerdrop` (``inject``); a
            rate set without it (``retune``, ``load``) is the user's, and forgets one kept
            earlier.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    owner = modules[record.path]
    name = record.layers.rpartition(".")[2]
    mark = dict(layerdrop_mark(owner) or {})
    if remember:
        mark.setdefault(name, record.rate)
    else:
        mark.pop(name, None)
    set_layerdrop_mark(owner, mark)
    for holder, attr in _holders(modules, record):
        _assign(holder, attr, rate)
    return next(r for r in find_layerdrop(model) if r.layers == record.layers)


def restore_layerdrop(model: nn.Module) -> int:
    """Put back every LayerDrop rate ``inject`` turned off; returns how many."""
    restored = 0
    for record in find_layerdrop(model):
        if record.original is not None:
            set_layerdrop(model, record, record.original)
            restored += 1
    return restored
