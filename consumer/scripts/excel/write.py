"""Write rows into an .xlsx workbook, returned as base64 or as a file of the reply.

Returns {"file": str (base64), "bytes": int, "sheets": [{"name": str, "rows": int,
"columns": int}, ...]}; with out_file the workbook is written to out/<out_file> instead (stored
and listed in the reply's files, for workbooks too large for a message) and "file" is left out,
"out_file" names it. Each sheet is {"name": str, "rows": [[...], ...] or [{...}, ...],
"columns": [str, ...] (optional)}; with column names the first row is a bold, shaded header.
Cells are strings, numbers, booleans or null; strings are written as text (ISO dates stay
strings, "=..." is not a formula unless formulas=true).
"""

import base64
import io
from typing import Annotated, Any

import openpyxl
from msgspec import Meta
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE, Cell
from openpyxl.styles import Font, PatternFill
from openpyxl.utils import get_column_letter

SHEET_KEYS = {"name", "rows", "columns"}
BAD_TITLE_CHARACTERS = set("[]:*?/\\")
MAX_TEXT = 32767  # characters Excel keeps in one cell


class Input:
    sheets: Annotated[list[dict], Meta(min_length=1, max_length=50)]  # {"name", "rows", "columns"}
    auto_width: bool = True  # widen columns to fit their content (up to 60 characters)
    freeze_header: bool = True  # keep the header row in view when scrolling
    formulas: bool = False  # write strings starting with "=" as formulas
    # write the workbook to out/<out_file> (listed in the reply's files) instead of base64
    out_file: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,94}\.xlsx$")] | None = (
        None
    )


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    book = openpyxl.Workbook()
    book.remove(book.active)
    written: list[dict[str, Any]] = []
    for index, spec in enumerate(ctx["sheets"]):
        where = f"sheets[{index}]"
        name, columns, rows = sheet_parts(spec, where, [s["name"] for s in written])
        sheet = book.create_sheet(name)
        if columns:
            sheet.append([make_cell(sheet, column, "", False) for column in columns])
            for cell in sheet[1]:
                cell.font = Font(bold=True)
                cell.fill = PatternFill("solid", fgColor="DDEBF7")
            if ctx["freeze_header"]:
                sheet.freeze_panes = "A2"
        for number, row in enumerate(rows):
            at = f"{where}.rows[{number}]"
            sheet.append([make_cell(sheet, value, at, ctx["formulas"]) for value in row])
        if ctx["auto_width"]:
            fit_widths(sheet, ([] if columns is None else [columns]) + rows[:1000])
        width = max([len(row) for row in rows] + [len(columns or [])])
        written.append({"name": name, "rows": len(rows), "columns": width})
    buffer = io.BytesIO()
    book.save(buffer)
    data = buffer.getvalue()
    if ctx["out_file"] is not None:
        with open(f"out/{ctx['out_file']}", "wb") as handle:
            handle.write(data)
        return {"out_file": ctx["out_file"], "bytes": len(data), "sheets": written}
    return {"file": base64.b64encode(data).decode(), "bytes": len(data), "sheets": written}


def sheet_parts(
    spec: Any, where: str, taken: list[str]
) -> tuple[str, list[str] | None, list[list[Any]]]:
    """The checked name, column names and rows (as lists) of one sheet."""
    if not isinstance(spec, dict) or set(spec) - SHEET_KEYS or "name" not in spec:
        raise ValueError(f'{where}: expected {{"name", "rows", "columns"}}, got {spec!r}'[:300])
    name, rows, columns = spec["name"], spec.get("rows", []), spec.get("columns")
    if not isinstance(name, str) or not 1 <= len(name) <= 31 or BAD_TITLE_CHARACTERS & set(name):
        raise ValueError(f"{where}.name: 1 to 31 characters, none of []:*?/\\")
    if name.lower() in [t.lower() for t in taken]:
        raise ValueError(f"{where}.name: {name!r} is used twice")
    if not isinstance(rows, list):
        raise ValueError(f"{where}.rows: expected a list of rows")
    if columns is not None and not (
        isinstance(columns, list) and all(isinstance(c, str) for c in columns)
    ):
        raise ValueError(f"{where}.columns: expected a list of strings")
    if rows and all(isinstance(row, dict) for row in rows):
        if columns is None:
            found: list[str] = []
            for row in rows:
                found.extend(key for key in row if key not in found)
            columns = found
        return name, columns, [[row.get(c) for c in columns] for row in rows]
    for number, row in enumerate(rows):
        if not isinstance(row, list):
            raise ValueError(f"{where}.rows[{number}]: rows are all lists or all objects")
    return name, columns, rows


def make_cell(sheet: Any, value: Any, where: str, formulas: bool) -> Any:
    """A cell value; text loses the control characters Excel cannot store."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{where}: a cell is a string, number, boolean or null: {value!r}"[:300])
    value = ILLEGAL_CHARACTERS_RE.sub("", value)
    if len(value) > MAX_TEXT:
        raise ValueError(f"{where}: a cell holds at most {MAX_TEXT} characters, not {len(value)}")
    if formulas or not value.startswith("="):
        return value
    text = Cell(sheet, value=value)
    text.data_type = "s"  # "=..." as text, not a formula
    return text


def fit_widths(sheet: Any, rows: list[list[Any]]) -> None:
    widths: dict[int, int] = {}
    for row in rows:
        for index, value in enumerate(row, 1):
            size = 0 if value is None else len(str(value))
            widths[index] = max(widths.get(index, 0), size)
    for index, size in widths.items():
        sheet.column_dimensions[get_column_letter(index)].width = min(max(size + 2, 8), 60)
