"""Check that SQL parses with sqlglot, and where it does not, say where.

Returns {"valid": true, "statements": int}, or {"valid": false, "errors": [{"message": str,
"line": int | None, "column": int | None, "near": str | None}, ...]} for SQL that does not parse.
"""

import re
from typing import Annotated, Any

import sqlglot
from msgspec import Meta
from sqlglot.errors import ErrorLevel, ParseError, TokenError


class Input:
    sql: Annotated[str, Meta(pattern=r"\S", max_length=200_000)]  # one or more SQL statements
    dialect: str | None = None  # e.g. "postgres", "mysql", "tsql"; None: generic SQL


# sqlglot writes a token or a class into its messages as "<Token token_type: ..., text: X,
# ...>" and "<class 'sqlglot.expressions....Where'>"; the text and the class name are enough.
TOKEN = re.compile(r"<Token token_type: [\w.]+, text: (.*?), line: \d+, col: \d+.*?>")
CLASS = re.compile(r"<class '(?:\w+\.)*(\w+)'>")


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    try:
        # RAISE: the parser goes on after an error and reports all of them at the end.
        statements = sqlglot.parse(ctx["sql"], read=ctx["dialect"], error_level=ErrorLevel.RAISE)
    except ParseError as error:
        found = error.errors or [{"description": str(error)}]
        return {"valid": False, "errors": [located(one) for one in found]}
    except TokenError as error:  # an unterminated string or comment: no position is known
        return {"valid": False, "errors": [located({"description": str(error)})]}
    return {"valid": True, "statements": len([s for s in statements if s is not None])}


def located(found: dict[str, Any]) -> dict[str, Any]:
    """A sqlglot error as {"message", "line", "column", "near"}; the column is 1-based where
    the offending token starts (sqlglot counts to where it ends)."""
    message = CLASS.sub(r"\1", TOKEN.sub(r"'\1'", found["description"]))
    near = found.get("highlight") or None
    column = found.get("col")
    if column is not None and near is not None and "\n" not in near:
        column = max(1, column - len(near) + 1)
    return {"message": message, "line": found.get("line"), "column": column, "near": near}
