"""Translate SQL from one dialect to another with sqlglot.

ctx:
    sql (str, required): one or more SQL statements.
    read (str): the source dialect, for example "postgres", "mysql", "tsql" (default: generic).
    write (str): the target dialect (default: generic).
    pretty (bool): format the output over several lines (default false).

Returns {"statements": [str, ...]}, one entry per input statement.
"""

import sqlglot


def execute(ctx):
    sql = ctx.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise ValueError("ctx.sql must be a non-empty string")
    statements = sqlglot.transpile(
        sql,
        read=ctx.get("read") or None,
        write=ctx.get("write") or None,
        pretty=bool(ctx.get("pretty", False)),
    )
    return {"statements": statements}
