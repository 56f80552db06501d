"""Translate SQL from one dialect to another with sqlglot.

Returns {"statements": [str, ...]}, one entry per input statement.
"""

from typing import Annotated, Any

import sqlglot
from msgspec import Meta


class Input:
    sql: Annotated[str, Meta(pattern=r"\S")]  # one or more SQL statements
    read: str | None = None  # source dialect, e.g. "postgres", "mysql", "tsql"; None: generic
    write: str | None = None  # target dialect; None: generic
    pretty: bool = False  # format the output over several lines


def execute(ctx: dict[str, Any]) -> dict[str, list[str]]:
    statements = sqlglot.transpile(
        ctx["sql"],
        read=ctx["read"],
        write=ctx["write"],
        pretty=ctx["pretty"],
    )
    return {"statements": statements}
