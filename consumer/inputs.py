"""Typed input of named scripts: a ``class Input`` declared in the script, checked before it runs.

A script may declare what its ``ctx`` holds::

    class Input:
        text: str
        form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFKC"
        limit: Annotated[int, Meta(ge=1, le=1000)] = 10

A field may also be typed with another class declared the same way (``rows: list[Row]``).
The declaration is read from the source with :mod:`ast`, never executed in the service: each
annotation is mapped to a type from a short list and each default must be a literal. The
replica turns it into a msgspec Struct (unknown fields refused) and validates ``ctx`` against it
before anything runs, so bad input is ``rejected`` / ``invalid_request`` with a message naming
the field. The script then gets ``ctx`` as plain JSON values with the defaults filled in; the
declaration itself is blanked out of the source it runs (line numbers stay the same).

A script imports what its declaration names, so that it is an ordinary module for linters and
type checkers: ``from typing import Annotated, Literal`` (``typing`` is a module scripts may
import anyway) and ``from msgspec import Meta``. ``msgspec`` is no module a script may import, and
``Meta`` means nothing outside the declaration, so that one statement is blanked too, when it is
exactly that and alone on its lines; anything else (another name, an alias, a second statement on
the line) is left in the source, where the sandbox refuses it as any import it does not allow.
"""

from __future__ import annotations

import ast
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from consumer.errors import InvalidRequest

INPUT_CLASS = "Input"
# The line ends Python's tokenizer knows besides "\n"; it reads each as "\n", in string
# literals too, so the source may be written with "\n" alone without changing what it means.
_OTHER_LINE_ENDS = re.compile(r"\r\n?")
# The statement that imports the declaration's constraint type, blanked before the run.
_META_IMPORT = ("msgspec", [("Meta", None)])
_NAMES: dict[str, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "dict": dict,
    "list": list,
    "Any": Any,
    "None": None,
}
_META_KEYWORDS = frozenset(
    {"ge", "gt", "le", "lt", "min_length", "max_length", "pattern", "description", "examples"}
)


class InputDeclarationError(ValueError):
    """A script's ``class Input`` uses something this module does not understand."""


@dataclass(frozen=True)
class Declared:
    """A script as it runs: its source without the declaration, and its input type if any."""

    source: str
    input_type: type[msgspec.Struct] | None

    def check(self, name: str, ctx: dict[str, Any]) -> dict[str, Any]:
        """``ctx`` validated and with defaults filled, or :class:`InvalidRequest`."""
        if self.input_type is None:
            return ctx
        try:
            value = msgspec.convert(ctx, self.input_type)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"invalid ctx for '{name}': {_located(str(exc))}") from None
        converted: dict[str, Any] = msgspec.to_builtins(value)
        return converted


def declare(source: str, name: str) -> Declared:
    """Read the ``class Input`` of a script, if it has one, with the classes it uses."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return Declared(source=source, input_type=None)  # the run reports the syntax error
    for statement in tree.body:
        if _is_meta_import(statement, tree.body):
            source = _blank(source, statement)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    if INPUT_CLASS not in classes:
        return Declared(source=source, input_type=None)
    reader = _Reader(classes, prefix=name)
    input_type = reader.struct(INPUT_CLASS)
    for used in reader.built:
        source = _blank(source, classes[used])
    return Declared(source=source, input_type=input_type)


class _Reader:
    """Builds Structs from declared classes; a class used as a field type (``list[Row]``)
    becomes a nested Struct, refused unknown fields included."""

    def __init__(self, classes: dict[str, ast.ClassDef], prefix: str) -> None:
        self.classes = classes
        self.prefix = prefix
        self.built: dict[str, type[msgspec.Struct]] = {}
        self._building: set[str] = set()

    def struct(self, class_name: str) -> type[msgspec.Struct]:
        if class_name in self.built:
            return self.built[class_name]
        if class_name in self._building:
            raise InputDeclarationError(f"class {class_name} refers to itself")
        self._building.add(class_name)
        node = self.classes[class_name]
        fields = [self._field(st) for st in node.body if not _is_docstring(st)]
        built = msgspec.defstruct(
            f"{self.prefix}.{class_name}", fields, forbid_unknown_fields=True, kw_only=True
        )
        self._building.discard(class_name)
        self.built[class_name] = built
        return built

    def _field(self, statement: ast.stmt) -> tuple[str, Any] | tuple[str, Any, Any]:
        return _field(statement, self._type)

    def _type(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Name) and node.id not in _NAMES and node.id in self.classes:
            return self.struct(node.id)
        return _type(node, self._type)


def _field(
    statement: ast.stmt, read_type: Callable[[ast.expr], Any]
) -> tuple[str, Any] | tuple[str, Any, Any]:
    if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
        raise InputDeclarationError(
            f"line {statement.lineno}: class Input may only hold 'name: type [= default]' lines"
        )
    field_name = statement.target.id
    if field_name.startswith("_"):
        raise InputDeclarationError(f"line {statement.lineno}: field names may not start with _")
    field_type = read_type(statement.annotation)
    if statement.value is None:
        return field_name, field_type
    try:
        default = ast.literal_eval(statement.value)
    except ValueError:
        raise InputDeclarationError(
            f"line {statement.lineno}: the default of '{field_name}' must be a literal"
        ) from None
    if isinstance(default, (list, dict, set)):
        default = msgspec.field(default_factory=_copier(default))
    return field_name, field_type, default


def _copier(value: Any) -> Any:
    return lambda: msgspec.json.decode(msgspec.json.encode(value))


def _type(node: ast.expr, inner: Callable[[ast.expr], Any]) -> Any:
    """The type an annotation names, from a fixed vocabulary; ``inner`` reads nested ones."""
    if isinstance(node, ast.Constant) and node.value is None:
        return None
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return typing.Union[inner(node.left), inner(node.right)]  # noqa: UP007
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        head = node.value.id
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if head == "list" and len(args) == 1:
            return list[inner(args[0])]  # type: ignore[misc]
        if head == "dict" and len(args) == 2:
            return dict[inner(args[0]), inner(args[1])]  # type: ignore[misc]
        if head == "Literal":
            values = tuple(ast.literal_eval(arg) for arg in args)
            return Literal[values]
        if head == "Annotated" and len(args) == 2:
            return Annotated[inner(args[0]), _meta(args[1])]
    raise InputDeclarationError(
        f"line {node.lineno}: unsupported type '{ast.unparse(node)}' (use str, int, float, "
        "bool, dict, list, Any, None, list[...], dict[str, ...], Literal[...], X | Y, "
        "Annotated[X, Meta(...)] or a class declared in the script)"
    )


def _meta(node: ast.expr) -> msgspec.Meta:
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Meta"
        and not node.args
    ):
        raise InputDeclarationError(f"line {node.lineno}: expected Meta(name=value, ...)")
    options = {}
    for keyword in node.keywords:
        if keyword.arg not in _META_KEYWORDS:
            raise InputDeclarationError(f"line {node.lineno}: Meta({keyword.arg}=...) unknown")
        options[keyword.arg] = ast.literal_eval(keyword.value)
    return msgspec.Meta(**options)


def _is_docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)


def _is_meta_import(statement: ast.stmt, module: list[ast.stmt]) -> bool:
    """Whether ``statement`` is exactly ``from msgspec import Meta``, no other statement of the
    module sharing its lines."""
    if not (
        isinstance(statement, ast.ImportFrom)
        and statement.level == 0
        and (statement.module, [(a.name, a.asname) for a in statement.names]) == _META_IMPORT
    ):
        return False
    last = statement.end_lineno or statement.lineno
    return not any(
        other is not statement
        and other.lineno <= last
        and (other.end_lineno or other.lineno) >= statement.lineno
        for other in module
    )


def source_lines(source: str) -> list[str]:
    r"""The source's lines as Python numbers them, without their ends: a line ends only at
    ``\n``, ``\r\n`` or ``\r``. (``str.splitlines`` also splits at form feeds, vertical
    tabs, ``\x1c``-``\x1e``, ``\x85``, U+2028 and U+2029, which may stand in a docstring or a
    comment, and would shift every line after them.)"""
    return _OTHER_LINE_ENDS.sub("\n", source).split("\n")


def _blank(source: str, node: ast.stmt) -> str:
    r"""The source with a statement's lines emptied, so line numbers do not move; its line
    ends are written ``\n`` (an emptied line after a ``\r`` would otherwise join it)."""
    lines = source_lines(source)
    decorators = node.decorator_list if isinstance(node, ast.ClassDef) else []
    first = (decorators[0].lineno if decorators else node.lineno) - 1
    last = node.end_lineno or node.lineno
    for index in range(first, last):
        lines[index] = ""
    return "\n".join(lines)


def _located(message: str) -> str:
    """msgspec's ``... - at `$.a.b``` with the path written from ``ctx``."""
    return message.replace("`$.", "`ctx.").replace("`$`", "`ctx`").replace("`$[", "`ctx[")
