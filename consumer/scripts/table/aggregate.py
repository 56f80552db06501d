"""Filter, group and aggregate or pivot a table of records with pandas; sort and limit.

Returns {"columns": [...], "rows": [[...], ...], "total_rows": int}: the result table as
column names and rows of values (null for missing), total_rows counted before the limit. The
table comes as records, or as a CSV or .xlsx file of the request (in_file, its alias); with
out_file the result is written to out/<out_file> as CSV (listed in the reply's files) and
"rows" is left out.
Operations are named, never evaluated: a filter is {"column", "op", "value"}, an aggregation
{"column", "op", "name"}, a pivot {"index", "columns", "values", "op"}.
"""

from typing import Annotated, Any, Literal

import pandas as pd
from msgspec import Meta

# The aggregation a caller names -> the pandas reduction it runs (first/last: non-null).
AGGREGATIONS = {
    "sum": "sum", "mean": "mean", "median": "median", "min": "min", "max": "max",
    "count": "count", "nunique": "nunique", "first": "first", "last": "last",
}  # fmt: skip
NUMERIC_ONLY = {"sum", "mean", "median"}
FILTERS = {
    "==": lambda column, value: column.isna() if value is None else column == value,
    "!=": lambda column, value: column.notna() if value is None else column != value,
    "<": lambda column, value: column < value,
    "<=": lambda column, value: column <= value,
    ">": lambda column, value: column > value,
    ">=": lambda column, value: column >= value,
    "in": lambda column, value: column.isin(value),
    "not_in": lambda column, value: ~column.isin(value),
}


class Filter:
    column: str
    op: Literal["==", "!=", "<", "<=", ">", ">=", "in", "not_in"]
    value: Any = None  # a list for "in" / "not_in"; null matches missing values with == / !=


class Aggregation:
    column: str
    op: Literal["sum", "mean", "median", "min", "max", "count", "nunique", "first", "last"]
    name: str | None = None  # the result column; default "<column>_<op>"


class Pivot:
    index: str | list[str]  # the row keys
    columns: str  # one result column per value of this column
    values: str  # the column aggregated into the cells
    op: Literal["sum", "mean", "median", "min", "max", "count", "nunique", "first", "last"] = "sum"


class Input:
    records: Annotated[list[dict], Meta(max_length=200000)] | None = None  # [{"column": value}]
    # or: the alias of a request file, a .csv (UTF-8, header row) or an .xlsx (first sheet)
    in_file: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")] | None = None
    # write the result to out/<out_file> as CSV instead of returning its rows
    out_file: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,95}\.csv$")] | None = (
        None
    )
    filters: list[Filter] = []  # all must hold
    group_by: list[str] = []  # group on these columns (null is a group of its own)
    aggregations: list[Aggregation] = []
    pivot: Pivot | None = None
    sort_by: list[str] = []  # result columns to sort on
    descending: bool | list[bool] = False  # for all sort columns, or one per column
    limit: Annotated[int, Meta(ge=1, le=100000)] | None = None  # rows kept after sorting


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    # Nullable dtypes keep whole numbers whole when a column has nulls.
    frame = load_table(ctx).convert_dtypes()
    for number, spec in enumerate(ctx["filters"]):
        frame = apply_filter(frame, spec, f"filters[{number}]")
    if ctx["pivot"] is not None:
        if ctx["group_by"] or ctx["aggregations"]:
            raise ValueError("pivot cannot be combined with group_by or aggregations")
        frame = pivot(frame, ctx["pivot"])
    elif ctx["group_by"] or ctx["aggregations"]:
        frame = aggregate(frame, ctx["group_by"], ctx["aggregations"])
    if ctx["sort_by"]:
        check(frame, ctx["sort_by"])
        descending = ctx["descending"]
        if isinstance(descending, list) and len(descending) != len(ctx["sort_by"]):
            raise ValueError("descending: give one flag per sort_by column, or one for all")
        order = [not d for d in descending] if isinstance(descending, list) else not descending
        frame = frame.sort_values(ctx["sort_by"], ascending=order, kind="stable")
    total = len(frame)
    if ctx["limit"] is not None:
        frame = frame.head(ctx["limit"])
    if ctx["out_file"] is not None:
        frame.to_csv(f"out/{ctx['out_file']}", index=False)
        return {"columns": list(frame.columns), "out_file": ctx["out_file"], "total_rows": total}
    frame = frame.astype(object).where(frame.notna(), None)
    return {"columns": list(frame.columns), "rows": frame.values.tolist(), "total_rows": total}


def load_table(ctx: dict[str, Any]) -> pd.DataFrame:
    """The table from records or from the request's file in_file (exactly one of them)."""
    if (ctx["records"] is None) == (ctx["in_file"] is None):
        raise ValueError("give the table as records or as in_file (a request file)")
    if ctx["in_file"] is None:
        return pd.DataFrame.from_records(ctx["records"])
    alias = ctx["in_file"]
    try:
        if alias.lower().endswith(".xlsx"):
            return pd.read_excel(f"in/{alias}")
        if alias.lower().endswith(".csv"):
            return pd.read_csv(f"in/{alias}")
    except FileNotFoundError:
        raise ValueError(f"in_file: the request has no file {alias!r}") from None
    raise ValueError(f"in_file: {alias!r} is neither a .csv nor an .xlsx file")


def check(frame: pd.DataFrame, columns: list[str]) -> None:
    known = [str(name) for name in frame.columns]
    for column in columns:
        if column not in known:
            raise ValueError(f"unknown column {column!r} (columns: {', '.join(known)})")


def apply_filter(frame: pd.DataFrame, spec: dict[str, Any], where: str) -> pd.DataFrame:
    column, op, value = spec["column"], spec["op"], spec["value"]
    check(frame, [column])
    if op in ("in", "not_in") and not isinstance(value, list):
        raise ValueError(f"{where}: {op!r} takes a list of values")
    if op in ("<", "<=", ">", ">=") and value is None:
        raise ValueError(f"{where}: {op!r} cannot compare with null")
    try:
        return frame[FILTERS[op](frame[column], value)]
    except TypeError as exc:
        raise ValueError(f"{where}: cannot compare {column!r} {op} {value!r} ({exc})") from None


def numeric(frame: pd.DataFrame, column: str, op: str, where: str) -> None:
    if op in NUMERIC_ONLY and frame[column].dtype.kind not in "iufb":
        raise ValueError(f"{where}: {op!r} needs numbers; column {column!r} is not numeric")


def aggregate(
    frame: pd.DataFrame, group_by: list[str], aggregations: list[dict[str, Any]]
) -> pd.DataFrame:
    check(frame, group_by)
    named: dict[str, tuple[str, str]] = {}
    for number, spec in enumerate(aggregations):
        where = f"aggregations[{number}]"
        column, op = spec["column"], spec["op"]
        check(frame, [column])
        numeric(frame, column, op, where)
        name = spec["name"] or f"{column}_{op}"
        if name in named or name in group_by:
            raise ValueError(f"{where}: the result column {name!r} is named twice")
        named[name] = (column, AGGREGATIONS[op])
    if not group_by:  # the whole table: one row
        return pd.DataFrame({name: [whole(frame[c], op)] for name, (c, op) in named.items()})
    groups = frame.groupby(group_by, dropna=False, sort=True)
    if not named:
        return groups.size().reset_index(name="count")
    return groups.agg(**named).reset_index()


def whole(series: pd.Series, op: str) -> Any:
    if op in ("first", "last"):
        present = series.dropna()
        return None if present.empty else present.iloc[0 if op == "first" else -1]
    return series.agg(op)


def pivot(frame: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    op, values, columns = spec["op"], spec["values"], spec["columns"]
    index = [spec["index"]] if isinstance(spec["index"], str) else spec["index"]
    if not index:
        raise ValueError("pivot.index: name at least one column")
    check(frame, [*index, columns, values])
    numeric(frame, values, op, "pivot")
    table = frame.groupby([*index, columns], dropna=False, sort=True)[values].agg(AGGREGATIONS[op])
    table = table.unstack(columns)  # one column per value of `columns`, null where none
    if op in ("count", "nunique"):
        table = table.astype("Int64")
    table.columns = list(table.columns)
    return table.reset_index()
