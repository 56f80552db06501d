"""Summarize a table of records per column with pandas: types, nulls, statistics, top values.

Returns {"rows": int, "columns": [{"name": str, "dtype": str, "kind": str, "count": int,
"nulls": int, "unique": int, ...}, ...]}. Columns of numbers add min, max, mean, std, p25,
median and p75; other columns add "top": [{"value": ..., "count": int}, ...], most frequent
first. Values JSON has no form for (NaN, an infinite std) are null. The table comes as
records, or as a CSV or .xlsx file of the request (in_file, its alias).
"""

import json
import math
from collections.abc import Callable
from typing import Annotated, Any

import pandas as pd
from msgspec import Meta

# The kind of a column, from the JSON values in it: one of these, "number" (integers and
# floats), "mixed" or "empty" (nulls only).
KINDS = {
    type(None): "null", bool: "boolean", int: "integer", float: "float", str: "text",
    list: "list", dict: "object",
}  # fmt: skip


class Input:
    records: Annotated[list[dict], Meta(max_length=200000)] | None = None  # [{"column": value}]
    # or: the alias of a request file, a .csv (UTF-8, header row) or an .xlsx (first sheet)
    in_file: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")] | None = None
    columns: list[str] | None = None  # only these columns, in this order; None: all
    top: Annotated[int, Meta(ge=0, le=100)] = 5  # most frequent values listed per column


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    records = load_records(ctx)
    frame = pd.DataFrame.from_records(records)
    names = [str(name) for name in frame.columns]
    wanted = names if ctx["columns"] is None else ctx["columns"]
    for name in wanted:
        if name not in names:
            raise ValueError(f"unknown column {name!r} (columns: {', '.join(names)})")
    columns: list[dict[str, Any]] = []
    for name in wanted:
        kinds = {KINDS.get(type(r.get(name)), "object") for r in records} - {"null"}
        if kinds == {"integer", "float"}:
            kinds = {"number"}
        kind = "empty" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"
        columns.append(describe(name, frame[name], kind, ctx["top"]))
    return {"rows": len(frame), "columns": columns}


def load_records(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """The records given, or those of the request's file in_file (as JSON values)."""
    if (ctx["records"] is None) == (ctx["in_file"] is None):
        raise ValueError("give the table as records or as in_file (a request file)")
    if ctx["in_file"] is None:
        records: list[dict[str, Any]] = ctx["records"]
        return records
    alias = ctx["in_file"]
    try:
        if alias.lower().endswith(".xlsx"):
            frame = pd.read_excel(f"in/{alias}")
        elif alias.lower().endswith(".csv"):
            frame = pd.read_csv(f"in/{alias}")
        else:
            raise ValueError(f"in_file: {alias!r} is neither a .csv nor an .xlsx file")
    except FileNotFoundError:
        raise ValueError(f"in_file: the request has no file {alias!r}") from None
    loaded: list[dict[str, Any]] = json.loads(frame.to_json(orient="records", date_format="iso"))
    return loaded


def describe(name: str, series: pd.Series, kind: str, top: int) -> dict[str, Any]:
    values = series.map(hashable)  # lists and objects are counted by their JSON text
    summary: dict[str, Any] = {
        "name": name,
        "dtype": str(series.dtype),
        "kind": kind,
        "count": int(series.notna().sum()),
        "nulls": int(series.isna().sum()),
        "unique": int(values.nunique(dropna=True)),
    }
    if kind in ("integer", "float", "number"):  # numbers and nulls only
        # Nulls made the column float.
        whole: Callable[[Any], Any] = int if kind == "integer" else number
        quartiles = series.quantile([0.25, 0.5, 0.75])
        summary.update(
            {
                "min": whole(number(series.min())),
                "max": whole(number(series.max())),
                "mean": number(series.mean()),
                "std": number(series.std()),
                "p25": number(quartiles[0.25]),
                "median": number(quartiles[0.5]),
                "p75": number(quartiles[0.75]),
            }
        )
    else:
        counts = values.value_counts(dropna=True).head(top)
        summary["top"] = [
            {"value": plain(value), "count": int(count)} for value, count in counts.items()
        ]
    return summary


def hashable(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return value


def number(value: Any) -> Any:
    """A statistic as int or float, or None for NaN and infinities."""
    if value is None or pd.isna(value):
        return None
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
