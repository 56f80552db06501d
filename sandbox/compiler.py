"""Compiling a script: parse, check the entry point, and compile with RestrictedPython's rules."""

from __future__ import annotations

import ast
import hashlib
import marshal
import re
import sys
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from importlib.metadata import version
from types import CodeType
from typing import Any

from RestrictedPython.transformer import (
    IOPERATOR_TO_STR,
    RestrictingNodeTransformer,
    copy_locations,
)

from sandbox.api import ErrorInfo
from sandbox.trust import SCRIPT_FILENAME, trusted_code

FILENAME = SCRIPT_FILENAME
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

    Values reach a script through calls, decorators and ``with`` as well as through attributes
    and items. A call ``f(a, *b, k=c)`` becomes ``_ret_(_fn_(f)(_arg_(a), *_args_(b),
    k=_arg_(c)))``: the callee and every argument are checked like values the script reads (a
    door is called in its guarded form, a refused function stays refused however it was
    reached, no module is handed to library code), and so is what comes back. The call itself
    stays in the script's frame, so a library that looks at its caller sees the script. The
    arguments of the builtins in ``PLAIN_CALLEES`` are not checked (they are given anything,
    ``print(module)`` included, and call nothing a script did not choose). A decorator's result
    is checked (``@_deco_(d)``), and ``with x as name`` checks what ``name`` is bound to.
    """

    def visit_Call(self, node: ast.Call) -> Any:  # noqa: N802 - the visitor protocol
        visited = super().visit_Call(node)
        if not isinstance(visited, ast.Call):
            return visited
        node = visited
        func = node.func
        args = list(node.args)
        if isinstance(func, ast.Name) and func.id == "_apply_":
            func, *args = args  # _apply_(f, *args, **kwargs): f called with the same arguments
        if isinstance(func, ast.Name) and func.id == "super" and not args:
            return node  # zero-argument super() must be called in the method's own frame
        if _is_print(func):
            return node  # the sandbox's own print collector, writing to the run's stdout
        plain = isinstance(func, ast.Name) and func.id in PLAIN_CALLEES
        if plain:
            # The builtin of that name takes its arguments as they are (starred ones are still
            # checked). Where the code binds that name anywhere, the call goes through _pfn_,
            # which checks the arguments as _arg_ would unless the name is the builtin after
            # all; where it does not, the name can only be the builtin, called as it is.
            assert isinstance(func, ast.Name)
            args = [_guarded_argument(arg) if isinstance(arg, ast.Starred) else arg for arg in args]
            keywords = [
                _guarded_keyword(keyword) if keyword.arg is None else keyword
                for keyword in node.keywords
            ]
            shadowed = func.id in self._bound
            callee: ast.expr = _wrapped("_pfn_", func) if shadowed else func
            call = ast.Call(func=callee, args=args, keywords=keywords)
            result: ast.expr = (
                call if func.id in PLAIN_RESULTS and not shadowed else _wrapped("_ret_", call)
            )
        else:
            args = [_guarded_argument(arg) for arg in args]
            keywords = [_guarded_keyword(keyword) for keyword in node.keywords]
            call = ast.Call(func=_wrapped("_fn_", func), args=args, keywords=keywords)
            result = _wrapped("_ret_", call)
        copy_locations(result, node)
        ast.fix_missing_locations(result)
        return result

    @property
    def _bound(self) -> frozenset[str]:
        # Visited from anywhere but the root, every name counts as bound: checked calls.
        return getattr(self, "_bound_names", PLAIN_CALLEES)

    def visit_Module(self, node: ast.Module) -> Any:  # noqa: N802 - the visitor protocol
        self._bound_names = bound_names(node) & PLAIN_CALLEES
        return super().visit_Module(node)

    def visit_Expression(self, node: ast.Expression) -> Any:  # noqa: N802
        self._bound_names = bound_names(node) & PLAIN_CALLEES
        return self.node_contents_visit(node)

    def visit_Interactive(self, node: ast.Interactive) -> Any:  # noqa: N802
        self._bound_names = bound_names(node) & PLAIN_CALLEES
        return self.node_contents_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> Any:  # noqa: N802 - the visitor protocol
        """``a[k]`` stays a subscript in the script's own frame, ``_item_(a[_arg_(k)])``: a
        library's ``__getitem__`` that looks at its caller (numpy's ``r_["name"]``) sees the
        script. Stores and deletions are RestrictedPython's (``_write_(a)[k] = v``)."""
        if not isinstance(node.ctx, ast.Load):
            return super().visit_Subscript(node)
        node = self.node_contents_visit(node)
        node.slice = _guarded_key(node.slice)
        result = _wrapped("_item_", node)
        copy_locations(result, node)
        ast.fix_missing_locations(result)
        return result

    def visit_FunctionDef(self, node: ast.FunctionDef) -> Any:  # noqa: N802 - the visitor protocol
        return _guard_decorators(super().visit_FunctionDef(node))

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> Any:  # noqa: N802
        return _guard_decorators(super().visit_AsyncFunctionDef(node))

    def visit_ClassDef(self, node: ast.ClassDef) -> Any:  # noqa: N802 - the visitor protocol
        return _guard_decorators(super().visit_ClassDef(node))

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


# The private names the standard library's code generators use in what they generate
# (dataclasses, namedtuple): nothing else private may be named in generated code, so that
# ``__builtins__``, ``__import__`` or a guard's name never resolve in a namespace it is given.
GENERATORS_NAMES = frozenset({
    "__create_fn__", "_return_type", "_HAS_DEFAULT_FACTORY", "__dataclass_builtins_object__",
    "__dataclass_self__", "_cls", "_tuple_new", "__init__", "__repr__", "__eq__", "__lt__",
    "__le__", "__gt__", "__ge__", "__hash__", "__setattr__", "__delattr__",
})  # fmt: skip
_GENERATORS_PATTERN = re.compile(r"_(?:type|dflt)_[A-Za-z][A-Za-z0-9_]*\Z")


def generators_own(name: str) -> bool:
    """A private name the code generators use (``_dflt_<field>``, ``_type_<field>``...)."""
    return name in GENERATORS_NAMES or _GENERATORS_PATTERN.match(name) is not None


class GeneratedCode(Transformer):
    """The rules for code a library generates at run time from strings (a dataclass's
    ``__init__``, a namedtuple's ``__new__``, an evaluated annotation).

    No module is trusted for what it generates: the strings may hold what a script chose. The
    code may use the generators' own private names (``GENERATORS_NAMES``: ``__create_fn__``,
    ``_HAS_DEFAULT_FACTORY``, ``_dflt_<field>``...) and no other, and read the few dunder
    attributes their templates read (``_gen_getattr_``); every other name, attribute, item,
    call and loop is checked as in a script.
    """

    def check_name(self, node: Any, name: str | None, allow_magic_methods: bool = False) -> None:
        if name is not None and generators_own(name):
            return
        super().check_name(node, name, allow_magic_methods)

    def visit_Module(self, node: ast.Module) -> Any:  # noqa: N802 - the visitor protocol
        self._refuse_rebinding(node)
        return super().visit_Module(node)

    def visit_Expression(self, node: ast.Expression) -> Any:  # noqa: N802
        self._refuse_rebinding(node)
        return super().visit_Expression(node)

    def visit_Interactive(self, node: ast.Interactive) -> Any:  # noqa: N802
        self._refuse_rebinding(node)
        return super().visit_Interactive(node)

    def _refuse_rebinding(self, tree: ast.AST) -> None:
        """Generated code may run in a script's own namespace (an annotation evaluated with the
        script's globals): it may not bind a builtin's name there, where the script's calls by
        that name go unchecked (``Transformer.visit_Call``)."""
        rebound = sorted(namespace_bindings(tree) & PLAIN_CALLEES)
        if rebound:
            self.error(tree, f"Generated code may not bind the builtin name {rebound[0]!r}.")

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


# Builtins whose arguments a call does not check: they take anything (print(module),
# isinstance(x, module.Class)) and call nothing but what the script chose.
PLAIN_CALLEES = frozenset({
    "print", "str", "repr", "format", "len", "abs", "bool", "int", "float", "complex",
    "isinstance", "issubclass", "type", "id", "hash", "callable", "getattr", "hasattr",
    "setattr", "dir", "sorted", "min", "max", "sum", "any", "all", "list", "tuple", "set",
    "frozenset", "dict", "enumerate", "zip", "range", "iter", "next", "map", "filter",
    "reversed", "round", "divmod", "pow", "ord", "chr", "bin", "oct", "hex", "ascii", "slice",
})  # fmt: skip


# Of those, the ones whose result the builtin itself makes (a number, a str, a bool), or a
# numeric protocol method of a value the script holds: no check of what they return.
PLAIN_RESULTS = frozenset({
    "print", "str", "repr", "format", "len", "abs", "bool", "int", "float", "complex",
    "isinstance", "issubclass", "id", "hash", "callable", "hasattr", "setattr", "dir", "sum",
    "any", "all", "range", "round", "divmod", "pow", "ord", "chr", "bin", "oct", "hex",
    "ascii", "slice",
})  # fmt: skip


def _target(node: ast.AST) -> str | None:
    """The name ``node`` itself binds as a target: assigned or deleted, imported, an ``except``
    or ``match`` capture; None for any other node."""
    if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
        return node.id
    if isinstance(node, ast.alias):
        return node.asname or node.name.partition(".")[0]
    if isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar):
        return node.name
    if isinstance(node, ast.MatchMapping):
        return node.rest
    return None


def bound_names(tree: ast.AST) -> frozenset[str]:
    """Every name ``tree`` binds anywhere (assigned, deleted, defined, imported, a parameter,
    an ``except`` or ``match`` target, declared global or nonlocal)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if (target := _target(node)) is not None:
            names.add(target)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Global | ast.Nonlocal):
            names.update(node.names)
    return frozenset(names)


def namespace_bindings(tree: ast.AST) -> frozenset[str]:
    """The names ``tree`` binds in the namespace it runs in (its globals, or the locals it is
    given): at module level, by walrus in a comprehension there, or declared global or
    nonlocal anywhere. A function's and a class's own bodies bind names of their own."""
    names: set[str] = set()
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Global | ast.Nonlocal):
            names.update(node.names)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            # decorators, defaults, bases and annotations run here; the body does not
            inner = [*node.decorator_list]
            if isinstance(node, ast.ClassDef):
                inner += [*node.bases, *(keyword.value for keyword in node.keywords)]
            else:
                inner += [*node.args.defaults, *(d for d in node.args.kw_defaults if d)]
            pending.extend(inner)
            pending.extend(
                child for child in ast.walk(node) if isinstance(child, ast.Global | ast.Nonlocal)
            )
            continue
        if isinstance(node, ast.Lambda):
            pending.extend([*node.args.defaults, *(d for d in node.args.kw_defaults if d)])
            continue
        if (target := _target(node)) is not None:
            names.add(target)
        pending.extend(ast.iter_child_nodes(node))
    return frozenset(names)


def _wrapped(guard: str, node: ast.expr) -> ast.Call:
    return ast.Call(func=ast.Name(guard, ast.Load()), args=[node], keywords=[])


def _is_print(func: ast.expr) -> bool:
    """RestrictedPython's ``print``: ``_print._call_print(...)``."""
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "_call_print"
        and isinstance(func.value, ast.Name)
        and func.value.id == "_print"
    )


def _guarded_argument(arg: ast.expr) -> ast.expr:
    if isinstance(arg, ast.Starred):
        # *b is unpacked into a tuple in the script's frame, then each item is checked.
        unpacked = ast.Tuple(elts=[ast.Starred(value=arg.value, ctx=ast.Load())], ctx=ast.Load())
        return ast.Starred(value=_wrapped("_args_", unpacked), ctx=ast.Load())
    if _is_plain_constant(arg):
        return arg
    return _wrapped("_arg_", arg)


def _guarded_keyword(keyword: ast.keyword) -> ast.keyword:
    if keyword.arg is None:
        # **d is copied into a dict in the script's frame, then each value is checked.
        copied = ast.Dict(keys=[None], values=[keyword.value])
        return ast.keyword(arg=None, value=_wrapped("_kwargs_", copied))
    if _is_plain_constant(keyword.value):
        return keyword
    return ast.keyword(arg=keyword.arg, value=_wrapped("_arg_", keyword.value))


def _guarded_key(key: ast.expr) -> ast.expr:
    """A subscript's key with every part that is not a constant checked like an argument."""
    if isinstance(key, ast.Slice):
        for part in ("lower", "upper", "step"):
            bound = getattr(key, part)
            if bound is not None and not _is_plain_constant(bound):
                setattr(key, part, _wrapped("_arg_", bound))
        return key
    if isinstance(key, ast.Tuple):
        key.elts = [_guarded_key(element) for element in key.elts]
        return key
    if isinstance(key, ast.Starred):
        return _guarded_argument(key)
    return key if _is_plain_constant(key) else _wrapped("_arg_", key)


def _is_plain_constant(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant)


def _guard_decorators(node: Any) -> Any:
    """``@d def f`` keeps Python's order (``d`` first, then the function, then ``d(f)``, all in
    the script's frame), with ``d`` checked as a callee, and what ends up bound to ``f`` is
    checked right after the definition: ``f = _deco_(f)``."""
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node
    if not node.decorator_list:
        return node
    guarded: list[ast.expr] = []
    for decorator in node.decorator_list:
        wrapper = _wrapped("_fn_", decorator)
        copy_locations(wrapper, decorator)
        guarded.append(wrapper)
    node.decorator_list = guarded
    check = ast.Assign(
        targets=[ast.Name(node.name, ast.Store())],
        value=_wrapped("_deco_", ast.Name(node.name, ast.Load())),
    )
    copy_locations(check, node)
    ast.fix_missing_locations(node)
    ast.fix_missing_locations(check)
    return [node, check]


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


@trusted_code
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
            status="error",
            error=ErrorInfo(
                code="missing_entry_point",
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


@trusted_code
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


@trusted_code
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
