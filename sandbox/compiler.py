"""Compiling a script: parse, check the entry point, and compile with RestrictedPython's rules."""

from __future__ import annotations

import ast
import hashlib
import marshal
import sys
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from importlib.metadata import version
from types import CodeType
from typing import Any

from RestrictedPython.transformer import (
    FORBIDDEN_FUNC_NAMES,
    IOPERATOR_TO_STR,
    RestrictingNodeTransformer,
    copy_locations,
)

from sandbox.api import ErrorInfo

FILENAME = "<script>"
# Dunder attributes the standard library's code generators read in what they generate.
TEMPLATE_ATTRIBUTES = frozenset(
    {"__class__", "__qualname__", "__name__", "__setattr__", "__delattr__", "__post_init__"}
)
_RP_VERSION = version("RestrictedPython")
ENTRY_POINT = "execute"


class Transformer(RestrictingNodeTransformer):
    """RestrictedPython's rules, plus augmented assignment to attributes and items, annotated
    assignment to names, and guarded calls and ``with`` targets.

    RestrictedPython refuses ``counts[word] += 1`` and ``self.total += x`` outright. Here they
    become calls to ``_aug_item_`` / ``_aug_attr_``, which read through the same guards as any
    other access, so scripts can use the everyday idiom without a new way around the policy.

    Values reach a script through calls and ``with`` as well as through attributes and items:
    every call ``f(...)`` becomes ``_call_(f, ...)`` (what it returns is checked, and no module
    is handed to library code), and ``with x as name`` checks what ``name`` is bound to.
    """

    def visit_Call(self, node: ast.Call) -> Any:  # noqa: N802 - the visitor protocol
        visited = super().visit_Call(node)
        if not isinstance(visited, ast.Call):
            return visited
        node = visited
        func = node.func
        if isinstance(func, ast.Name) and func.id == "_apply_":
            func.id = "_call_"  # _apply_(f, *args, **kwargs): the same shape
            return node
        if isinstance(func, ast.Name) and func.id == "super" and not node.args:
            return node  # zero-argument super() must be called in the method's own frame
        call = ast.Call(
            func=ast.Name("_call_", ast.Load()), args=[func, *node.args], keywords=node.keywords
        )
        copy_locations(call, node)
        return call

    def visit_With(self, node: ast.With) -> Any:  # noqa: N802 - the visitor protocol
        visited = super().visit_With(node)
        if not isinstance(visited, ast.With):
            return visited
        node = visited
        checks: list[ast.stmt] = []
        for item in node.items:
            target = item.optional_vars
            if isinstance(target, ast.Name):
                check = ast.Assign(
                    targets=[ast.Name(target.id, ast.Store())],
                    value=ast.Call(
                        func=ast.Name("_check_", ast.Load()),
                        args=[ast.Name(target.id, ast.Load())],
                        keywords=[],
                    ),
                )
                copy_locations(check, target)
                ast.fix_missing_locations(check)
                checks.append(check)
        node.body[:0] = checks
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> Any:  # noqa: N802 - the visitor protocol
        """``x: int = 1`` (dataclass fields): allowed for plain names, guarded like the rest."""
        if not isinstance(node.target, ast.Name):
            self.error(node, "Annotated assignment is allowed to plain names only.")
            return node
        return self.node_contents_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> Any:  # noqa: N802 - the visitor protocol
        if not isinstance(node.target, ast.Attribute | ast.Subscript):
            return super().visit_AugAssign(node)
        node = self.node_contents_visit(node)
        target = node.target
        operator = ast.Constant(IOPERATOR_TO_STR[type(node.op)])
        call: ast.Call
        if isinstance(target, ast.Attribute):
            call = ast.Call(
                func=ast.Name("_aug_attr_", ast.Load()),
                args=[target.value, ast.Constant(target.attr), operator, node.value],
                keywords=[],
            )
        else:
            assert isinstance(target, ast.Subscript)
            call = ast.Call(
                func=ast.Name("_aug_item_", ast.Load()),
                args=[target.value, _key_expression(target.slice), operator, node.value],
                keywords=[],
            )
        statement = ast.Expr(value=call)
        copy_locations(statement, node)
        ast.fix_missing_locations(statement)
        return statement


class GeneratedCode(Transformer):
    """The rules for code a library generates at run time from strings (a dataclass's
    ``__init__``, a namedtuple's ``__new__``, an evaluated annotation).

    No module is trusted for what it generates: the strings may hold what a script chose. The
    code may use private *names* (the generators' own ``__dataclass_self__``,
    ``_HAS_DEFAULT_FACTORY``), which only ever resolve in the namespace the library gave it,
    and read the few dunder attributes their templates read (``_gen_getattr_``); every other
    attribute, item, call and loop goes through the same guards as a script.
    """

    def check_name(self, node: Any, name: str | None, allow_magic_methods: bool = False) -> None:
        if name is not None and name in FORBIDDEN_FUNC_NAMES:
            self.error(node, f'"{name}" is a reserved name.')

    def visit_Attribute(self, node: ast.Attribute) -> Any:  # noqa: N802 - the visitor protocol
        if node.attr in TEMPLATE_ATTRIBUTES and isinstance(node.ctx, ast.Load):
            node = self.node_contents_visit(node)
            call = ast.Call(
                func=ast.Name("_gen_getattr_", ast.Load()),
                args=[node.value, ast.Constant(node.attr)],
                keywords=[],
            )
            copy_locations(call, node)
            return call
        return super().visit_Attribute(node)


def _key_expression(key: ast.expr) -> ast.expr:
    """A subscript key as a value: ``a[1:2]`` needs ``slice(1, 2, None)``."""
    if not isinstance(key, ast.Slice):
        return key
    none = ast.Constant(None)
    return ast.Call(
        func=ast.Name("slice", ast.Load()),
        args=[key.lower or none, key.upper or none, key.step or none],
        keywords=[],
    )


@dataclass(frozen=True)
class Compiled:
    """A script ready to run, or the reason it cannot run (``error`` and its ``status``)."""

    code: CodeType | None = None
    error: ErrorInfo | None = None
    status: str = "ok"


def _parse(source: str) -> ast.Module | Compiled:
    """The script's syntax tree, or why it has none (a syntax error, no entry point)."""
    try:
        tree = ast.parse(source, FILENAME, "exec")
    except SyntaxError as exc:
        message = f"line {exc.lineno}: {exc.msg}" if exc.lineno is not None else str(exc)
        trace = "".join(traceback.format_exception_only(type(exc), exc))
        return _error("syntax_error", type(exc).__name__, message, trace)
    except (ValueError, RecursionError, MemoryError) as exc:
        return _error("syntax_error", type(exc).__name__, f"the script cannot be parsed: {exc}")
    if not _defines_entry_point(tree):
        return Compiled(
            status="rejected",
            error=ErrorInfo(
                code="invalid_request",
                type="MissingEntryPoint",
                message=f"the script must define a top-level function '{ENTRY_POINT}(ctx)'",
            ),
        )
    return tree


def compile_unrestricted(source: str) -> Compiled:
    """Plain Python compilation, for runs with the policy layer switched off (tests only)."""
    tree = _parse(source)
    if isinstance(tree, Compiled):
        return tree
    return Compiled(code=compile(tree, FILENAME, "exec", dont_inherit=True))


def compile_script(source: str) -> Compiled:
    """Parse and compile ``source`` under the policy; never raises for what an author wrote."""
    tree = _parse(source)
    if isinstance(tree, Compiled):
        return tree
    try:
        code, errors = restricted(tree, FILENAME, "exec", Transformer)
    except (RecursionError, MemoryError) as exc:
        return _error("syntax_error", type(exc).__name__, f"the script is too complex: {exc}")
    if errors or code is None:
        refused = "; ".join(errors) or "the script was refused"
        return _error(
            "policy_violation", "PolicyViolation", f"refused by the sandbox policy: {refused}"
        )
    return Compiled(code=code)


def restricted(
    tree: ast.AST, filename: str, mode: str, policy: type[RestrictingNodeTransformer]
) -> tuple[CodeType | None, list[str]]:
    """Apply ``policy`` to ``tree`` and compile it: the code, or the rules it breaks.

    RestrictedPython's own compile does the same but inherits the future flags of its module
    (``from __future__ import annotations``), which would turn every annotation of a script
    into a string; this compile inherits nothing.
    """
    errors: list[str] = []
    policy(errors, [], {}).visit(tree)
    if errors:
        return None, errors
    code: CodeType = compile(tree, filename, mode, dont_inherit=True)  # type: ignore[call-overload]
    return code, []


# Compiled scripts by the SHA-256 of their source, kept by the pool in the service process: a
# process that runs scripts never holds another run's code. A run whose source is cached gets its
# own compiled code (marshal) in its run request and skips compilation.
CACHE_CAPACITY = 256
LEARNABLE_BYTES = 64 * 1024


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()


class CodeCache:
    """Scripts compiled under the policy, by source hash, least recently used dropped first."""

    def __init__(self, capacity: int = CACHE_CAPACITY) -> None:
        self.capacity = capacity
        self._code: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._code)

    def get(self, source: str) -> bytes | None:
        key = source_key(source)
        code = self._code.get(key)
        if code is not None:
            self._code.move_to_end(key)
        return code

    def wants(self, source: str) -> bool:
        """Whether ``source`` is small enough to keep and not kept yet."""
        return len(source) <= LEARNABLE_BYTES and source_key(source) not in self._code

    def put(self, source: str, code: bytes) -> None:
        """Keep ``code``, made by :func:`compile_to_marshal` from ``source`` in this process."""
        self._code[source_key(source)] = code
        self._code.move_to_end(source_key(source))
        while len(self._code) > self.capacity:
            self._code.popitem(last=False)


def compile_to_marshal(source: str) -> bytes | None:
    """``source`` compiled under the policy, as marshal data, or None if it does not compile."""
    compiled = compile_script(source)
    return None if compiled.code is None else marshal.dumps(compiled.code)


def code_format() -> str:
    """What compiled code depends on: a pool sends code only to a warm parent that matches."""
    return f"{sys.implementation.cache_tag} {sys.version} RestrictedPython {_RP_VERSION}"


def load_code(data: bytes) -> Compiled:
    """The code a run request carries (made by :meth:`CodeCache.learn` in the pool)."""
    return Compiled(code=marshal.loads(data))  # noqa: S302 - made by the pool, never by a run


def _error(code: Any, kind: str, message: str, trace: str | None = None) -> Compiled:
    return Compiled(
        status="error", error=ErrorInfo(code=code, type=kind, message=message, traceback=trace)
    )


def _defines_entry_point(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == ENTRY_POINT:
            return True
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == ENTRY_POINT for target in node.targets
        ):
            return True
    return False
