"""What an expression given to pandas' evaluators (``pd.eval``, ``DataFrame.eval``/``query``)
may contain.

Those evaluators walk the expression themselves and read attributes with no guard at all, so
the expression is checked before they see it, against what they are for: column names,
constants, arithmetic, comparisons and boolean logic, lists for ``in``, assignment to a column
(``eval``), pandas' math functions (``sin(a)``), and the ``.str``, ``.dt`` and ``.cat``
accessors with their public methods plus a few Series methods (``a.isin([1, 2])``). No other
attribute (so no single-underscore names, no ``.values.ctypes``, no frames), no subscripts,
no ``@`` references to the caller's variables, no f-strings or ``str.format``, no lambdas or
comprehensions.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from functools import cache
from typing import Any

MATH_FUNCTIONS = frozenset({
    "sin", "cos", "tan", "exp", "log", "expm1", "log1p", "sqrt", "sinh", "cosh", "tanh",
    "arcsin", "arccos", "arctan", "arccosh", "arcsinh", "arctanh", "abs", "arctan2", "log10",
    "floor", "ceil",
})  # fmt: skip
ACCESSORS = frozenset({"str", "dt", "cat"})
SERIES_METHODS = frozenset({
    "isin", "isna", "notna", "isnull", "notnull", "abs", "round", "between", "astype", "fillna",
    "clip",
})  # fmt: skip
_NODES = (
    ast.Module, ast.Expression, ast.Expr, ast.Assign, ast.BoolOp, ast.And, ast.Or, ast.BinOp,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr,
    ast.BitXor, ast.UnaryOp, ast.Not, ast.Invert, ast.USub, ast.UAdd, ast.Compare, ast.Eq,
    ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Is, ast.IsNot,
    ast.Name, ast.Load, ast.Store, ast.Constant, ast.List, ast.Tuple, ast.Call, ast.keyword,
    ast.Attribute,
)  # fmt: skip
_BACKTICKS = re.compile(r"`[^`]*`")
MAX_LENGTH = 10_000


def _backticks_in_strings(expression: str) -> str | None:
    """Refuse a backtick inside a string literal: it would pair with another and hide the code
    between them from this check (pandas reads strings first)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expression).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError, ValueError, RecursionError):
        return "an expression that does not tokenize"
    for token in tokens:
        if token.type == tokenize.STRING and "`" in token.string:
            return "a backtick inside a string in an expression"
    return None


def _accessor_methods() -> frozenset[str]:
    """The public names of pandas' .str, .dt and .cat accessors (pandas is imported by then)."""
    pandas = sys.modules.get("pandas")
    if pandas is None:
        return frozenset()
    return _accessor_methods_of(pandas)


@cache
def _accessor_methods_of(pandas: Any) -> frozenset[str]:
    found: set[str] = set()
    for kind in (pandas.Series.str, pandas.Series.dt, pandas.Series.cat):
        accessor = getattr(kind, "_accessor", kind)
        found.update(name for name in dir(accessor) if not name.startswith("_"))
    return frozenset(found)


def check_expression(expression: str) -> str | None:
    """None if ``expression`` holds only what the evaluators are for; otherwise what it holds."""
    if len(expression) > MAX_LENGTH:
        return f"an expression over {MAX_LENGTH} characters"
    if "@" in expression:
        return "'@' references to local variables"
    problem = _backticks_in_strings(expression)
    if problem is not None:
        return problem
    # `column name` is a column; no backtick is inside a string, so this finds only those.
    text = _BACKTICKS.sub(lambda found: "_column_" + str(len(found.group(0))), expression)
    try:
        tree = ast.parse(text, "<expression>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None  # pandas reports its own syntax errors; nothing in it can run
    allowed_attributes = ACCESSORS | SERIES_METHODS | _accessor_methods()
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            return f"{type(node).__name__} in an expression (only columns, constants, operators)"
        if isinstance(node, ast.Attribute) and (
            node.attr.startswith("_") or node.attr not in allowed_attributes
        ):
            return f"the attribute '{node.attr}' in an expression"
        if isinstance(node, ast.Name) and node.id.startswith("__"):
            return f"the name '{node.id}' in an expression"
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id not in MATH_FUNCTIONS:
                return f"calling '{func.id}' in an expression (pandas' math functions only)"
            if not isinstance(func, ast.Name | ast.Attribute):
                return "calling the result of an expression"
        if isinstance(node, ast.Assign) and not all(isinstance(t, ast.Name) for t in node.targets):
            return "assigning to anything but a column"
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes):
            return "bytes in an expression"
    return None
