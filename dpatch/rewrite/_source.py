"""Rewriting a block's forward at source level, for forwards that branch on shapes.

A block traced by :mod:`dpatch.analysis._metatrace` has a graph specialised to one input shape, so
its forward cannot be generated from the graph. Instead the forward's own source is edited:
each residual addition found in the trace is located by its source span and replaced by a
call of its slot, ``self.<slot>(branch, shortcut)`` (``x += b`` becomes
``x = self.<slot>(b, x)``; a native slot call inside the branch is unwrapped, as in the
graph rewrite). Everything else, control flow included, stays as written, so inputs whose
shapes take another path compute exactly what the unpatched block computes.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from dpatch.analysis import BlockSite, HelperSpan, Span
from dpatch.errors import TraceError, first_line

__all__ = ["DOC_DECORATORS", "SourceRewrite", "compile_like", "rewrite_source"]

_METHOD_ADDS = {"add", "add_", "__add__", "__iadd__"}
_INPLACE_METHODS = {"add_", "__iadd__"}


def _forward_of(cls: type[nn.Module]) -> Callable[..., Any]:
    fn: Callable[..., Any] = inspect.unwrap(cls.forward)
    return fn


#: Decorators that only write a forward's docstring (transformers'): a rewritten forward
#: goes without them. Any other decorator (``@deprecate_kwarg``, ``@can_return_tuple``)
#: stays in the rewritten source and is applied again when it is compiled.
DOC_DECORATORS = frozenset(
    {
        "auto_docstring",
        "add_start_docstrings",
        "add_start_docstrings_to_model_forward",
        "add_code_sample_docstrings",
        "replace_return_docstrings",
    }
)


def _decorator_name(node: ast.expr) -> str:
    """``auto_docstring`` for ``@auto_docstring``, ``@utils.auto_docstring(...)``."""
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Attribute):
        return target.attr
    return target.id if isinstance(target, ast.Name) else ""


def _parse(fn: Callable[..., Any]) -> tuple[ast.FunctionDef, int, int]:
    """The forward's definition, its first line in the file, and the indent dedent removed."""
    try:
        lines, start = inspect.getsourcelines(fn)
    except (OSError, TypeError) as exc:
        raise TraceError("its forward's source is not available") from exc
    source = "".join(lines)
    dedented = textwrap.dedent(source)
    indent = len(lines[0]) - len(lines[0].lstrip()) if dedented != source else 0
    try:
        tree = ast.parse(dedented)
    except SyntaxError as exc:
        raise TraceError(f"its forward's source does not parse ({exc.msg})") from exc
    fdef = tree.body[0] if tree.body else None
    if not isinstance(fdef, ast.FunctionDef):
        raise TraceError("its forward is not a plain function definition")
    fdef.decorator_list = [
        d for d in fdef.decorator_list if _decorator_name(d) not in DOC_DECORATORS
    ]
    return fdef, start, indent


def _span_of(node: ast.expr | ast.stmt, start: int, indent: int) -> Span | None:
    if node.end_lineno is None or node.end_col_offset is None:
        return None
    return Span(
        node.lineno + start - 1,
        node.col_offset + indent,
        node.end_lineno + start - 1,
        node.end_col_offset + indent,
    )


def _operands(node: ast.AST) -> tuple[ast.expr, ast.expr] | None:
    """(first, second) operands of an addition, in the order torch.fx records them."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return node.left, node.right
    if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add):
        if isinstance(node.target, ast.Name):
            return ast.Name(node.target.id, ast.Load()), node.value
        return None
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _METHOD_ADDS
        and len(node.args) == 1
        and not node.keywords
    ):
        return node.func.value, node.args[0]
    if isinstance(node, ast.Call) and _is_torch_add(node.func) and len(node.args) == 2:
        return node.args[0], node.args[1]
    return None


def _is_torch_add(func: ast.expr) -> bool:
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "add"
        and isinstance(func.value, ast.Name)
        and func.value.id == "torch"
    )


def _attr_chain(this: str, target: str) -> ast.expr:
    expr: ast.expr = ast.Name(this, ast.Load())
    for atom in target.split("."):
        expr = ast.Attribute(expr, atom, ast.Load())
    return expr


class _Unwrap(ast.NodeTransformer):
    """Replace ``self.<slot>(e)`` by ``e`` (the slot is applied at the addition instead)."""

    def __init__(self, slot: str) -> None:
        self.slot = slot
        self.found = 0

    def visit_Call(self, node: ast.Call) -> Any:
        self.generic_visit(node)
        if (
            ast.unparse(node.func) == self.slot
            and len(node.args) == 1
            and not node.keywords
            and not isinstance(node.args[0], ast.Starred)
        ):
            self.found += 1
            return node.args[0]
        return node


class _Rewrite(ast.NodeTransformer):
    """Replace each residual addition (by AST node identity) with its slot call, and each
    call of a helper that holds one with a call of the helper's rewritten copy."""

    def __init__(
        self,
        this: str,
        plans: dict[int, BlockSite],
        unwrapped: set[int],
        slot: str | None = None,
        helper_calls: dict[int, tuple[str, BlockSite]] | None = None,
        pruned: frozenset[str] = frozenset(),
        copy_shortcut: bool = False,
    ) -> None:
        self.this = this
        self.plans = plans  # id(ast node) -> its site
        self.unwrapped = unwrapped  # additions whose slot call was removed where it stood
        self.slot = slot  # the slot is this parameter (a helper's copy), not an attribute
        self.helper_calls = helper_calls or {}  # id(call) -> (helper copy's name, site)
        self.pruned = pruned  # slot attributes whose additions become their shortcut
        self.copy_shortcut = copy_shortcut  # the forward writes in place somewhere

    def _call(self, node: ast.AST) -> ast.expr:
        site = self.plans[id(node)]
        ops = _operands(node)
        assert ops is not None and site.add is not None
        first, second = ops
        branch_first = site.add.branch_first
        branch, shortcut = (first, second) if branch_first else (second, first)
        if site.attr in self.pruned:
            # The block returns the shortcut; a copy where the forward writes into tensors
            # in place, which would otherwise write into the shortcut (often its input).
            if self.copy_shortcut:
                return ast.Call(ast.Attribute(shortcut, "clone", ast.Load()), [], [])
            return shortcut
        if site.add.slot_node is not None and id(node) not in self.unwrapped:
            unwrap = _Unwrap(f"{self.this}.{site.add.slot_node.target}")
            branch = unwrap.visit(branch)
            if unwrap.found != 1:
                raise TraceError(
                    f"its slot {site.add.slot_node.target} is not called once inside the "
                    "added expression"
                )
        args: list[ast.expr] = [branch, shortcut]
        if site.add.alpha != 1.0:
            args.append(ast.Constant(site.add.alpha))
        keywords = [ast.keyword("branch_first", ast.Constant(True))] if branch_first else []
        slot = ast.Name(self.slot, ast.Load()) if self.slot else _attr_chain(self.this, site.attr)
        return ast.Call(slot, args, keywords)

    def visit_BinOp(self, node: ast.BinOp) -> Any:
        self.generic_visit(node)
        return self._call(node) if id(node) in self.plans else node

    def visit_AugAssign(self, node: ast.AugAssign) -> Any:
        self.generic_visit(node)
        if id(node) not in self.plans:
            return node
        assert isinstance(node.target, ast.Name)
        return ast.Assign([ast.Name(node.target.id, ast.Store())], self._call(node))

    def visit_Call(self, node: ast.Call) -> Any:
        self.generic_visit(node)
        if id(node) in self.helper_calls:
            name, site = self.helper_calls[id(node)]
            slot = ast.keyword(_SLOT_PARAM, _attr_chain(self.this, site.attr))
            return ast.Call(ast.Name(name, ast.Load()), node.args, [*node.keywords, slot])
        if id(node) not in self.plans:
            return node
        call = self._call(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _INPLACE_METHODS:
            # ``a.add_(b)`` changed ``a`` in place: later reads of ``a`` see the sum.
            if not isinstance(func.value, ast.Name):
                raise TraceError(f"an in-place addition onto {ast.unparse(func.value)!r}")
            return ast.NamedExpr(ast.Name(func.value.id, ast.Store()), call)
        return call


def _by_span(fdef: ast.FunctionDef, start: int, indent: int) -> dict[Span, ast.AST]:
    out: dict[Span, ast.AST] = {}
    for node in ast.walk(fdef):
        if isinstance(node, ast.BinOp | ast.AugAssign | ast.Call):
            span = _span_of(node, start, indent)
            if span is not None:
                out[span] = node
    return out


#: The keyword a helper's rewritten copy takes its slot by.
_SLOT_PARAM = "_dpatch_slot"


def _helper_copy(
    forward: Callable[..., Any], call: ast.AST, helper: HelperSpan, site: BlockSite, name: str
) -> ast.FunctionDef:
    """A copy of the plain function ``call`` calls (``dropout_add(x, residual, p, training)``,
    written in the forward's module), named ``name``, whose residual addition goes through
    the slot it takes as the keyword ``_dpatch_slot``.

    Raises:
        TraceError: the call is not of such a function, or the addition is not in it.
    """
    assert site.add is not None
    func = call.func if isinstance(call, ast.Call) else None
    target = forward.__globals__.get(func.id) if isinstance(func, ast.Name) else None
    if getattr(target, "__code__", None) is not helper.code or site.add.slot_node is not None:
        raise TraceError(
            f"the residual addition {site.add.node.name} is written in a function its "
            "forward calls that dpatch cannot copy (only plain functions of the same "
            "module, holding the whole addition)"
        )
    assert target is not None
    fdef, start, indent = _parse(target)
    if fdef.decorator_list:
        raise TraceError(f"the function {target.__name__} holding an addition is decorated")
    found = _by_span(fdef, start, indent).get(helper.span)
    if found is None or _operands(found) is None:
        raise TraceError(
            f"the residual addition {site.add.node.name} is not an addition written in "
            f"{target.__name__}"
        )
    copy = _Rewrite("", {id(found): site}, set(), slot=_SLOT_PARAM).visit(fdef)
    copy.body = copy.body[_after_docstring(copy) :] or [ast.Pass()]
    copy.name = name
    copy.args.kwonlyargs.append(ast.arg(_SLOT_PARAM))
    copy.args.kw_defaults.append(None)
    return copy


def rewrite_source(
    module: nn.Module,
    sites: list[BlockSite],
    spans: dict[Any, Span],
    helpers: dict[Any, HelperSpan] | None = None,
    pruned: frozenset[str] = frozenset(),
) -> SourceRewrite:
    """The source of ``type(module).forward`` with each site's addition going through its
    slot. An addition written in a plain function the forward calls (``helpers``) goes
    through a rewritten copy of that function, defined at the top of the forward. A pruned
    site's addition becomes its shortcut, and the statements that only computed its branch
    are left out (``pruned``: slot attributes).

    Raises:
        TraceError: the source is unavailable, or an addition cannot be found in it (or in
            a function it calls) exactly (then the block is not rewritten).
    """
    src, _ = _rewrite(module, sites, spans, helpers or {}, pruned)
    if not pruned:
        return SourceRewrite(src, ((),) * len(sites))
    _, before = _rewrite(module, sites, spans, helpers or {}, frozenset())
    dropped: list[tuple[str, ...]] = []
    for site in sites:
        if site.attr not in pruned:
            dropped.append(())
            continue
        _, alone = _rewrite(module, sites, spans, helpers or {}, frozenset({site.attr}))
        slots = {s.attr for s in sites}
        dropped.append(tuple(t for t in _unreached(before, alone) if t not in slots))
    return SourceRewrite(src, tuple(dropped))


@dataclass(frozen=True)
class SourceRewrite:
    """A rewritten forward's source, and per site the children and attributes (relative to
    the block) only its pruned branch used."""

    source: str
    dropped: tuple[tuple[str, ...], ...]


def _unreached(before: set[str], after: set[str]) -> tuple[str, ...]:
    """References of ``before`` that no reference of ``after`` reaches (``a.b`` keeps
    ``a`` and ``a.b.c``)."""

    def reached(t: str) -> bool:
        return any(r == t or r.startswith(t + ".") or t.startswith(r + ".") for r in after)

    return tuple(sorted(t for t in before if not reached(t)))


def _rewrite(
    module: nn.Module,
    sites: list[BlockSite],
    spans: dict[Any, Span],
    helpers: dict[Any, HelperSpan],
    pruned: frozenset[str],
) -> tuple[str, set[str]]:
    """The rewritten source and the ``self.<a.b>`` attribute chains it reads."""
    forward = _forward_of(type(module))
    fdef, start, indent = _parse(forward)
    if not fdef.args.args:
        raise TraceError("its forward takes no self")
    this = fdef.args.args[0].arg
    by_span = _by_span(fdef, start, indent)
    plans: dict[int, BlockSite] = {}
    helper_calls: dict[int, tuple[str, BlockSite]] = {}
    copies: list[ast.stmt] = []
    for site in sites:
        add = site.add
        assert add is not None
        span = spans.get(add.node)
        found = by_span.get(span) if span is not None else None
        helper = helpers.get(add.node)
        if found is not None and _operands(found) is None and helper is not None:
            if site.attr in pruned:
                raise TraceError(
                    f"its residual addition {add.node.name} is written in a function its "
                    "forward calls; pruning needs it written in the forward"
                )
            name = f"_dpatch_{getattr(getattr(found, 'func', None), 'id', 'helper')}_{site.attr}"
            copies.append(_helper_copy(forward, found, helper, site, name))
            helper_calls[id(found)] = (name, site)
            continue
        if found is None or _operands(found) is None:
            where = f" (line {span.line})" if span is not None else ""
            raise TraceError(
                f"the residual addition {add.node.name}{where} is not an addition "
                "written in its forward"
            )
        plans[id(found)] = site
    unwrapped: set[int] = set()
    for node in by_span.values():
        if id(node) in plans and _unwrap_apart(fdef, this, node, plans[id(node)]):
            unwrapped.add(id(node))
    dead_before = _dead_statements(fdef.body)
    rewrite = _Rewrite(
        this,
        plans,
        unwrapped,
        helper_calls=helper_calls,
        pruned=pruned,
        copy_shortcut=bool(pruned) and _writes_in_place(fdef),
    )
    rewritten = rewrite.visit(fdef)
    if pruned:
        dead = _dead_statements(rewritten.body) - dead_before
        rewritten.body = [st for st in rewritten.body if id(st) not in dead] or [ast.Pass()]
    rewritten.body[_after_docstring(rewritten) : _after_docstring(rewritten)] = copies
    ast.fix_missing_locations(rewritten)
    return ast.unparse(rewritten) + "\n", _self_refs(rewritten, this)


def _self_refs(fdef: ast.FunctionDef, this: str) -> set[str]:
    """``a.b`` for every ``self.a.b`` the function reads (longest chains)."""
    refs: set[str] = set()
    for node in ast.walk(fdef):
        chain: list[str] = []
        cur: ast.expr = node if isinstance(node, ast.Attribute) else ast.Constant(None)
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if chain and isinstance(cur, ast.Name) and cur.id == this:
            refs.add(".".join(reversed(chain)))
    return {r for r in refs if not any(o.startswith(r + ".") for o in refs)}


def _writes_in_place(fdef: ast.FunctionDef) -> bool:
    """Whether the forward may write into a tensor in place (``x += y``, ``x.relu_()``,
    ``x[mask] = 0``)."""
    for node in ast.walk(fdef):
        if isinstance(node, ast.AugAssign):
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Subscript) for t in node.targets):
            return True
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr.endswith("_")
            and not node.func.attr.startswith("_")
        ):
            return True
    return False


def _assigned_names(stmt: ast.stmt) -> set[str] | None:
    """The names an assignment of plain names binds (``a = ...``, ``a, _ = ...``); None for
    any other statement."""
    if isinstance(stmt, ast.Assign):
        targets: list[ast.expr] = list(stmt.targets)
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        targets = [stmt.target]
    else:
        return None
    names: set[str] = set()
    while targets:
        t = targets.pop()
        if isinstance(t, ast.Name):
            names.add(t.id)
        elif isinstance(t, ast.Tuple | ast.List):
            targets.extend(t.elts)
        elif isinstance(t, ast.Starred):
            targets.append(t.value)
        else:
            return None
    return names


def _dead_statements(body: list[ast.stmt]) -> set[int]:
    """ids of the top-level assignments in ``body`` whose names nothing reads afterwards.
    Compound statements count as reading every name they mention and binding none."""
    live: set[str] = set()
    dead: set[int] = set()
    for stmt in reversed(body):
        names = _assigned_names(stmt)
        if names is None:
            live |= _names_in(stmt)
        elif names & live:
            live = (live - names) | _names_in(stmt.value)  # type: ignore[attr-defined]
        else:
            dead.add(id(stmt))
    return dead


def _names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _after_docstring(fdef: ast.FunctionDef) -> int:
    first = fdef.body[0] if fdef.body else None
    is_doc = (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )
    return 1 if is_doc else 0


def _unwrap_apart(fdef: ast.FunctionDef, this: str, node: ast.AST, site: BlockSite) -> bool:
    """Remove a native slot's call that stands in a statement of its own before the
    addition (``h = self.drop_path(h)`` then ``h = h + residual``), so the addition can
    apply it. Only where the trace shows the slot's output feeds that addition alone and
    the forward calls the slot once; True if removed."""
    assert site.add is not None
    slot_node = site.add.slot_node
    if slot_node is None or list(slot_node.users) != [site.add.node]:
        return False
    target = f"{this}.{slot_node.target}"
    ops = _operands(node)
    assert ops is not None
    branch = ops[0] if site.add.branch_first else ops[1]
    if _count_calls(branch, target) != 0 or _count_calls(fdef, target) != 1:
        return False
    unwrap = _Unwrap(target)
    fdef.body = [unwrap.visit(stmt) for stmt in fdef.body]
    return unwrap.found == 1


def _count_calls(tree: ast.AST, target: str) -> int:
    return sum(isinstance(n, ast.Call) and ast.unparse(n.func) == target for n in ast.walk(tree))


def compile_like(src: str, original: Callable[..., Any], filename: str) -> Callable[..., Any]:
    """Compile a rewritten ``def`` so it runs as ``original`` did: the same globals (its
    module), closure cells (``__class__`` for zero-argument ``super()``), defaults and
    decorators (each decorator expression evaluated again in the original's module, as
    the ``def`` statement did).

    Raises:
        TraceError: a decorator expression does not evaluate there (it names something
            local to the class body).
    """
    code = original.__code__
    freevars = code.co_freevars
    wrapper = f"def __dpatch_make({', '.join(freevars)}):\n{textwrap.indent(src, '    ')}"
    linecache.cache[filename] = (len(wrapper), None, wrapper.splitlines(keepends=True), filename)
    module = compile(wrapper, filename, "exec")
    make = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    body = next(c for c in make.co_consts if isinstance(c, types.CodeType))
    cells = original.__closure__ or ()
    closure = tuple(cells[freevars.index(name)] for name in body.co_freevars)
    fn = types.FunctionType(
        body, original.__globals__, body.co_name, original.__defaults__, closure
    )
    fn.__kwdefaults__ = original.__kwdefaults__
    fn.__qualname__ = original.__qualname__
    fdef = ast.parse(src).body[0]
    assert isinstance(fdef, ast.FunctionDef)
    decorated: Callable[..., Any] = fn
    for node in reversed(fdef.decorator_list):
        try:
            decorator = eval(  # the decorator as the original ``def`` evaluated it
                compile(ast.Expression(node), filename, "eval"), original.__globals__
            )
        except Exception as exc:
            raise TraceError(
                f"its forward's decorator @{ast.unparse(node)} cannot be applied again "
                f"({first_line(exc, typed=True)})"
            ) from exc
        decorated = decorator(decorated)
    return decorated
