"""Read an .xlsx workbook (base64, or a request file) into rows per sheet, with typed cells.

The workbook comes inline as base64 (``file``, for small ones) or as a file of the request
(``in_file``: its alias, read from in/<alias>; any size within the file limits).

Returns {"sheets": [{"name": str, "columns": [str, ...] | None, "rows": [...],
"truncated": bool}, ...], "sheet_names": [str, ...], "skipped_sheets": [str, ...]}.
With header=true each row is an object keyed by the first row's names; otherwise a list.
Numbers and booleans stay as they are, dates and times become ISO strings (a date-time at
midnight is a date), durations seconds, empty cells null. Empty rows at the end are left out.
"""

import base64
import datetime
import io
from typing import Annotated, Any

import openpyxl
from msgspec import Meta


class Input:
    file: Annotated[str, Meta(min_length=1)] | None = None  # the .xlsx file, base64
    # or: the alias of one of the request's files (read from in/<alias>)
    in_file: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")] | None = None
    sheets: list[str] | None = None  # sheet names to read, in this order; None: all
    header: bool = True  # the first row holds the column names
    max_rows: Annotated[int, Meta(ge=1, le=100000)] = 10000  # data rows kept per sheet
    max_sheets: Annotated[int, Meta(ge=1, le=100)] = 20  # sheets read at most


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    if (ctx["file"] is None) == (ctx["in_file"] is None):
        raise ValueError("give the workbook as file (base64) or as in_file (a request file)")
    data = decode(ctx["file"]) if ctx["in_file"] is None else read_input(ctx["in_file"])
    book = open_workbook(data)
    try:
        names = [sheet.title for sheet in book.worksheets]
        wanted = names if ctx["sheets"] is None else ctx["sheets"]
        for name in wanted:
            if name not in names:
                raise ValueError(f"no sheet named {name!r} (the workbook has {names})")
        read = wanted[: ctx["max_sheets"]]
        sheets = [read_sheet(book[name], ctx["header"], ctx["max_rows"]) for name in read]
    finally:
        book.close()
    return {"sheets": sheets, "sheet_names": names, "skipped_sheets": wanted[len(read) :]}


def decode(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except ValueError:
        raise ValueError("file is not valid base64") from None


def read_input(alias: str) -> bytes:
    try:
        with open(f"in/{alias}", "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ValueError(f"in_file: the request has no file {alias!r}") from None


def open_workbook(data: bytes) -> Any:
    if data[:4] != b"PK\x03\x04":  # every .xlsx is a zip archive
        raise ValueError("file is not an .xlsx workbook (.xls and encrypted files are not read)")
    try:
        return openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # noqa: BLE001 - openpyxl fails in many ways on a bad file
        raise ValueError(f"file is not a readable .xlsx workbook: {exc}") from None


def read_sheet(sheet: Any, header: bool, max_rows: int) -> dict[str, Any]:
    columns: list[str] | None = None
    rows: list[Any] = []
    blank = 0  # empty rows seen since the last row with a value
    truncated = False
    for values in sheet.iter_rows(values_only=True):
        row = [cell_value(value) for value in values]
        while row and row[-1] is None:
            row.pop()
        if header and columns is None:
            columns = column_names(row)
            continue
        if not row:
            blank += 1
            continue
        if len(rows) + blank >= max_rows:
            truncated = True
            break
        rows.extend([] for _ in range(blank))
        blank = 0
        rows.append(row)
    if header and columns is None:  # an empty sheet
        columns = []
    width = max([len(row) for row in rows] + [len(columns or [])])
    if columns is not None:
        columns = columns + column_names([None] * (width - len(columns)), len(columns))
        rows = [dict(zip(columns, row + [None] * (width - len(row)), strict=True)) for row in rows]
    else:
        rows = [row + [None] * (width - len(row)) for row in rows]
    return {"name": sheet.title, "columns": columns, "rows": rows, "truncated": truncated}


def column_names(row: list[Any], start: int = 0) -> list[str]:
    """Header cells as names: blanks become column_<n>, repeats get _2, _3, ..."""
    names: list[str] = []
    for index, value in enumerate(row, start + 1):
        name = f"column_{index}" if value is None or value == "" else str(value)
        base, n = name, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def cell_value(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        if value.time() == datetime.time(0, 0) and value.tzinfo is None:
            return value.date().isoformat()
        return value.isoformat()
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, str) and value == "":
        return None
    return value
