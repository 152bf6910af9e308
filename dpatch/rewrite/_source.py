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
from typing import Any

from torch import nn

from dpatch.analysis import BlockSite, Span
from dpatch.errors import TraceError

__all__ = ["compile_like", "rewrite_source"]

_METHOD_ADDS = {"add", "add_", "__add__", "__iadd__"}
_INPLACE_METHODS = {"add_", "__iadd__"}


def _forward_of(cls: type[nn.Module]) -> Callable[..., Any]:
    fn: Callable[..., Any] = inspect.unwrap(cls.forward)
    return fn


#: Decorators that only write a forward's docstring (transformers'): a rewritten forward
#: may go without them. Any other decorator may change behaviour, so its block is not
#: rewritten.
_DOC_DECORATORS = frozenset(
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
    behaviour = [d for d in fdef.decorator_list if _decorator_name(d) not in _DOC_DECORATORS]
    if behaviour:
        raise TraceError(f"its forward is decorated (@{ast.unparse(behaviour[0])})")
    fdef.decorator_list = []  # documentation only: the rewritten forward needs none
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
    """Replace each residual addition (by AST node identity) with its slot call."""

    def __init__(self, this: str, plans: dict[int, BlockSite], unwrapped: set[int]) -> None:
        self.this = this
        self.plans = plans  # id(ast node) -> its site
        self.unwrapped = unwrapped  # additions whose slot call was removed where it stood

    def _call(self, node: ast.AST) -> ast.expr:
        site = self.plans[id(node)]
        ops = _operands(node)
        assert ops is not None and site.add is not None
        first, second = ops
        branch_first = site.add.branch_first
        branch, shortcut = (first, second) if branch_first else (second, first)
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
        return ast.Call(_attr_chain(self.this, site.attr), args, keywords)

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


def rewrite_source(module: nn.Module, sites: list[BlockSite], spans: dict[Any, Span]) -> str:
    """The source of ``type(module).forward`` with each site's addition going through its
    slot.

    Raises:
        TraceError: the source is unavailable, decorated, or an addition cannot be found
            in it exactly (then the block is not rewritten).
    """
    fdef, start, indent = _parse(_forward_of(type(module)))
    if not fdef.args.args:
        raise TraceError("its forward takes no self")
    this = fdef.args.args[0].arg
    by_span: dict[Span, ast.AST] = {}
    for node in ast.walk(fdef):
        if isinstance(node, ast.BinOp | ast.AugAssign | ast.Call):
            span = _span_of(node, start, indent)
            if span is not None:
                by_span[span] = node
    plans: dict[int, BlockSite] = {}
    for site in sites:
        add = site.add
        assert add is not None
        span = spans.get(add.node)
        found = by_span.get(span) if span is not None else None
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
    rewritten = _Rewrite(this, plans, unwrapped).visit(fdef)
    ast.fix_missing_locations(rewritten)
    return ast.unparse(rewritten) + "\n"


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
    module), closure cells (``__class__`` for zero-argument ``super()``) and defaults."""
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
    return fn
