"""Describe SQL statements with sqlglot: their type, tables, columns and whether they write.

Returns {"statements": [{"type": str, "writes": bool, "tables": [{"catalog": str | None,
"schema": str | None, "name": str}], "columns": [str], "functions": [str], "ctes": [str]}, ...],
"writes": bool}, one entry per statement; "writes" on top is true if any statement writes.
"""

from collections.abc import Iterable
from typing import Annotated, Any

import sqlglot
from msgspec import Meta
from sqlglot import exp


class Input:
    sql: Annotated[str, Meta(pattern=r"\S", max_length=200_000)]  # one or more SQL statements
    dialect: str | None = None  # e.g. "postgres", "mysql", "tsql"; None: generic SQL


# Statements that only read (or set up the session). Anything else counts as writing, and so
# does a read with a writing part inside (SELECT ... INTO, a DELETE in a WITH clause).
READ_ONLY = (exp.Query, exp.Show, exp.Describe, exp.Use, exp.Set)
WRITING_PARTS = (
    exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter,
    exp.TruncateTable, exp.Into, exp.Command,
)  # fmt: skip


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    statements = sqlglot.parse(ctx["sql"], read=ctx["dialect"])
    described = [describe(tree) for tree in statements if tree is not None]
    return {"statements": described, "writes": any(s["writes"] for s in described)}


def describe(tree: exp.Expr) -> dict[str, Any]:
    ctes = unique(cte.alias for cte in tree.find_all(exp.CTE))
    columns = (".".join(part.name for part in c.parts) for c in tree.find_all(exp.Column))
    functions = (function_name(f) for f in tree.find_all(exp.Func))
    return {
        "type": statement_type(tree),
        "writes": not isinstance(tree, READ_ONLY) or tree.find(*WRITING_PARTS) is not None,
        "tables": tables(tree, ctes),
        "columns": sorted(unique(columns)),
        "functions": sorted(unique(functions)),
        "ctes": ctes,
    }


def statement_type(tree: exp.Expr) -> str:
    if isinstance(tree, exp.Query):  # SELECT, and UNION / INTERSECT / EXCEPT of them
        return "select"
    if isinstance(tree, exp.TruncateTable):
        return "truncate"
    if isinstance(tree, exp.Command):  # a statement sqlglot does not parse: its first word
        return str(tree.this).lower()
    return tree.key


def tables(tree: exp.Expr, ctes: list[str]) -> list[dict[str, str | None]]:
    """The tables named, without the statement's own CTEs, sorted by their dotted name."""
    found: dict[str, dict[str, str | None]] = {}
    for table in tree.find_all(exp.Table):
        if not table.name or (not table.db and table.name in ctes):
            continue  # a table function such as generate_series(), or a CTE
        parts = [table.catalog, table.db, table.name]
        found[".".join(part for part in parts if part)] = {
            "catalog": table.catalog or None,
            "schema": table.db or None,
            "name": table.name,
        }
    return [found[name] for name in sorted(found)]


def function_name(function: exp.Func) -> str:
    if isinstance(function, exp.Anonymous):  # a function sqlglot does not know, as written
        return function.name.upper()
    return function.sql_name()


def unique(values: Iterable[str]) -> list[str]:
    """The values without repeats, in the order first seen."""
    return list(dict.fromkeys(values))
