"""The shipped excel.read, excel.write, table.describe and table.aggregate scripts, run by name
on the shared replica: real workbooks built and decoded with openpyxl, real pandas runs."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
from typing import Any

import openpyxl
import pytest

from consumer import protocol
from consumer.protocol import Reply
from tests.conftest import Caller

# -- helpers -----------------------------------------------------------------------------------


def workbook(sheets: dict[str, list[list[Any]]]) -> str:
    """An .xlsx with these sheets and rows, as base64."""
    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        sheet = book.create_sheet(name)
        for row in rows:
            sheet.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(file: str) -> openpyxl.Workbook:
    return openpyxl.load_workbook(io.BytesIO(base64.b64decode(file)))


def ok(reply: Reply) -> Any:
    assert reply.status == "ok", reply.error
    return reply.result


def script_error(reply: Reply, *parts: str) -> str:
    assert reply.status == "error", reply.result
    assert reply.error is not None
    assert reply.error.code == "script_error"
    assert reply.error.type == "ValueError", reply.error.message
    for part in parts:
        assert part in reply.error.message, reply.error.message
    return reply.error.message


def invalid(reply: Reply, *parts: str) -> None:
    assert reply.status == "rejected", reply.result
    assert reply.error is not None
    assert reply.error.code == "invalid_request"
    for part in parts:
        assert part in reply.error.message, reply.error.message


TYPED: list[list[Any]] = [
    ["id", "name", "amount", "paid", "day", "at", "time", "empty"],
    [1, "Acme", 120.5, True, dt.date(2026, 1, 15), dt.datetime(2026, 1, 15, 8, 30),
     dt.time(12, 30), None],
    [2, "Globex", 80, False, dt.date(2026, 2, 1), dt.datetime(2026, 2, 1, 0, 0, 5),
     dt.time(0, 0, 1), None],
]  # fmt: skip


# -- excel.read --------------------------------------------------------------------------------


def test_excel_read_gives_objects_with_typed_cells(caller: Caller) -> None:
    """excel.read keys rows by the header and keeps numbers, booleans, ISO dates and nulls."""
    result = ok(caller.named("excel.read", {"file": workbook({"Typed": TYPED})}))
    assert result["sheet_names"] == ["Typed"]
    assert result["skipped_sheets"] == []
    (sheet,) = result["sheets"]
    assert sheet["name"] == "Typed"
    assert sheet["columns"] == TYPED[0]
    assert sheet["truncated"] is False
    assert sheet["rows"] == [
        {"id": 1, "name": "Acme", "amount": 120.5, "paid": True, "day": "2026-01-15",
         "at": "2026-01-15T08:30:00", "time": "12:30:00", "empty": None},
        {"id": 2, "name": "Globex", "amount": 80, "paid": False, "day": "2026-02-01",
         "at": "2026-02-01T00:00:05", "time": "00:00:01", "empty": None},
    ]  # fmt: skip
    assert isinstance(sheet["rows"][1]["amount"], int)


def test_excel_read_gives_durations_in_seconds_and_formulas_as_saved(caller: Caller) -> None:
    """A duration cell is seconds; a formula gives its saved value (none when never computed)."""
    rows = [["took", "formula", "error"], [dt.timedelta(minutes=90), "=1+1", "#N/A"]]
    file = workbook({"S": rows})
    (sheet,) = ok(caller.named("excel.read", {"file": file}))["sheets"]
    assert sheet["rows"] == [{"took": 5400.0, "formula": None, "error": "#N/A"}]


def test_excel_read_without_header_gives_lists(caller: Caller) -> None:
    """excel.read with header=false returns every row, the first included, as a padded list."""
    file = workbook({"S": [["a", "b", "c"], [1], [None, None, 3.5]]})
    result = ok(caller.named("excel.read", {"file": file, "header": False}))
    assert result["sheets"] == [
        {"name": "S", "columns": None, "rows": [["a", "b", "c"], [1, None, None],
         [None, None, 3.5]], "truncated": False}
    ]  # fmt: skip


def test_excel_read_selects_sheets_and_names_an_unknown_one(caller: Caller) -> None:
    """excel.read reads the named sheets in the order asked; an unknown name is a script error."""
    file = workbook({"A": [["x"], [1]], "B": [["y"], [2]], "C": [["z"], [3]]})
    result = ok(caller.named("excel.read", {"file": file, "sheets": ["C", "A"]}))
    assert [sheet["name"] for sheet in result["sheets"]] == ["C", "A"]
    assert result["sheets"][0]["rows"] == [{"z": 3}]
    assert result["sheet_names"] == ["A", "B", "C"]
    script_error(caller.named("excel.read", {"file": file, "sheets": ["A", "Nope"]}), "'Nope'")


def test_excel_read_truncates_at_max_rows(caller: Caller) -> None:
    """excel.read keeps max_rows data rows per sheet and says when it cut a sheet short."""
    rows = [["n"]] + [[n] for n in range(30)]
    file = workbook({"Long": rows, "Short": rows[:11]})
    result = ok(caller.named("excel.read", {"file": file, "max_rows": 10}))
    long, short = result["sheets"]
    assert long["rows"] == [{"n": n} for n in range(10)]
    assert long["truncated"] is True
    assert len(short["rows"]) == 10
    assert short["truncated"] is False


def test_excel_read_max_sheets_lists_the_skipped_ones(caller: Caller) -> None:
    """excel.read reads at most max_sheets sheets and names the ones it left out."""
    file = workbook({name: [["v"], [1]] for name in ("A", "B", "C")})
    result = ok(caller.named("excel.read", {"file": file, "max_sheets": 1}))
    assert [sheet["name"] for sheet in result["sheets"]] == ["A"]
    assert result["skipped_sheets"] == ["B", "C"]


def test_excel_read_names_blank_and_repeated_headers_and_drops_trailing_empty_rows(
    caller: Caller,
) -> None:
    """Blank header cells become column_<n>, repeats get _2; empty rows count only inside."""
    file = workbook({"S": [["a", None, "a"], [1, 2, 3], [], [4, 5, 6, 7], [], [None]]})
    (sheet,) = ok(caller.named("excel.read", {"file": file}))["sheets"]
    assert sheet["columns"] == ["a", "column_2", "a_2", "column_4"]
    assert sheet["rows"] == [
        {"a": 1, "column_2": 2, "a_2": 3, "column_4": None},
        {"a": None, "column_2": None, "a_2": None, "column_4": None},
        {"a": 4, "column_2": 5, "a_2": 6, "column_4": 7},
    ]


def test_excel_read_an_empty_sheet_has_no_rows(caller: Caller) -> None:
    """An empty sheet reads as no rows (and no column names with a header)."""
    file = workbook({"Empty": []})
    (sheet,) = ok(caller.named("excel.read", {"file": file}))["sheets"]
    assert sheet == {"name": "Empty", "columns": [], "rows": [], "truncated": False}
    (sheet,) = ok(caller.named("excel.read", {"file": file, "header": False}))["sheets"]
    assert sheet == {"name": "Empty", "columns": None, "rows": [], "truncated": False}


def test_excel_read_bad_base64_is_a_script_error(caller: Caller) -> None:
    """A file that is not base64 is a ValueError saying so."""
    script_error(caller.named("excel.read", {"file": "not base64 at all!"}), "not valid base64")


@pytest.mark.parametrize(
    "content", [b"just some text", b"PK\x03\x04 but not a zip", b"\xd0\xcf\x11\xe0 an old .xls"]
)
def test_excel_read_a_file_that_is_not_xlsx_is_a_script_error(
    caller: Caller, content: bytes
) -> None:
    """Base64 of something other than an .xlsx is a ValueError saying it is not a workbook."""
    reply = caller.named("excel.read", {"file": base64.b64encode(content).decode()})
    script_error(reply, "not", ".xlsx workbook")


@pytest.mark.parametrize(
    ("ctx", "field"),
    [
        ({"file": ""}, "ctx.file"),
        ({"in_file": "../x.xlsx"}, "ctx.in_file"),
        ({"in_file": ".hidden"}, "ctx.in_file"),
        ({"file": "UEs=", "max_rows": 0}, "ctx.max_rows"),
        ({"file": "UEs=", "max_rows": 100001}, "ctx.max_rows"),
        ({"file": "UEs=", "max_sheets": 101}, "ctx.max_sheets"),
        ({"file": "UEs=", "header": "yes"}, "ctx.header"),
        ({"file": "UEs=", "sheets": "Orders"}, "ctx.sheets"),
        ({"file": "UEs=", "sheet": ["Orders"]}, "`sheet`"),
    ],
)
def test_excel_read_refuses_bad_input_naming_the_field(
    caller: Caller, ctx: dict[str, Any], field: str
) -> None:
    """excel.read's typed input refuses missing, mistyped, out-of-range and unknown fields."""
    invalid(caller.named("excel.read", ctx), field)


@pytest.mark.parametrize(
    ("ctx", "message"),
    [
        ({}, "give the workbook as file (base64) or as in_file"),
        ({"file": "UEs=", "in_file": "a.xlsx"}, "give the workbook as file (base64) or as in_file"),
        ({"in_file": "missing.xlsx"}, "in_file: the request has no file 'missing.xlsx'"),
    ],
)
def test_excel_read_needs_exactly_one_workbook(
    caller: Caller, ctx: dict[str, Any], message: str
) -> None:
    """Neither or both of file and in_file, or an alias the request has no file for: a
    script_error saying so."""
    reply = caller.named("excel.read", ctx)
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "script_error"
    assert reply.error.message.startswith(message)


# -- excel.write -------------------------------------------------------------------------------


def test_excel_write_objects_get_a_styled_header(caller: Caller) -> None:
    """excel.write turns objects into a bold, filled, frozen header and rows; dates stay text."""
    rows = [
        {"id": 1, "customer": "Acme", "ordered": "2026-01-15", "paid": True},
        {"id": 2, "customer": "A much longer customer name", "amount": 80.5},
    ]
    result = ok(caller.named("excel.write", {"sheets": [{"name": "Orders", "rows": rows}]}))
    assert result["sheets"] == [{"name": "Orders", "rows": 2, "columns": 5}]
    raw = base64.b64decode(result["file"])
    assert result["bytes"] == len(raw)
    sheet = decoded(result["file"])["Orders"]
    assert [[cell.value for cell in row] for row in sheet.iter_rows()] == [
        ["id", "customer", "ordered", "paid", "amount"],
        [1, "Acme", "2026-01-15", True, None],
        [2, "A much longer customer name", None, None, 80.5],
    ]
    header = sheet["A1"]
    assert header.font.b is True
    assert header.fill.fill_type == "solid"
    assert sheet["A2"].font.b is False
    assert sheet.freeze_panes == "A2"
    assert sheet.column_dimensions["B"].width > sheet.column_dimensions["A"].width


def test_excel_write_lists_without_columns_have_no_header(caller: Caller) -> None:
    """Rows given as lists with no column names are written as they are, unstyled, unfrozen."""
    sheet_spec = {"name": "Raw", "rows": [[1, "a"], [None, 2.5, False]]}
    result = ok(caller.named("excel.write", {"sheets": [sheet_spec]}))
    assert result["sheets"] == [{"name": "Raw", "rows": 2, "columns": 3}]
    sheet = decoded(result["file"])["Raw"]
    assert [[cell.value for cell in row] for row in sheet.iter_rows()] == [
        [1, "a", None],
        [None, 2.5, False],
    ]
    assert sheet["A1"].font.b is False
    assert sheet.freeze_panes is None


def test_excel_write_columns_choose_and_order_object_keys(caller: Caller) -> None:
    """Given columns, excel.write writes those keys in that order and leaves the others out."""
    sheet_spec = {"name": "S", "columns": ["b", "a"], "rows": [{"a": 1, "b": 2, "c": 3}]}
    result = ok(caller.named("excel.write", {"sheets": [sheet_spec], "auto_width": False}))
    sheet = decoded(result["file"])["S"]
    assert [[cell.value for cell in row] for row in sheet.iter_rows()] == [["b", "a"], [2, 1]]


def test_excel_write_then_read_round_trips(caller: Caller) -> None:
    """What excel.write writes, excel.read reads back the same, sheet by sheet."""
    orders = [
        {"id": 1, "customer": "Acme", "amount": 120.5, "ordered": "2026-01-15", "paid": True},
        {"id": 2, "customer": "Глобекс", "amount": None, "ordered": "2026-02-01", "paid": False},
    ]
    notes = [["checked by", "Ann"], [None, 3]]
    written = ok(
        caller.named(
            "excel.write",
            {"sheets": [{"name": "Orders", "rows": orders}, {"name": "Notes", "rows": notes}]},
        )
    )
    back = ok(caller.named("excel.read", {"file": written["file"], "sheets": ["Orders"]}))
    assert back["sheet_names"] == ["Orders", "Notes"]
    assert back["sheets"][0]["rows"] == orders
    read_notes = {"file": written["file"], "header": False, "sheets": ["Notes"]}
    back = ok(caller.named("excel.read", read_notes))
    assert back["sheets"][0]["rows"] == notes


def test_excel_write_keeps_equals_signs_as_text_unless_formulas(caller: Caller) -> None:
    """A string starting with '=' is text by default and a formula only with formulas=true."""
    sheet_spec = {"name": "S", "rows": [[2, 3, "=A1*B1"]]}
    text = decoded(ok(caller.named("excel.write", {"sheets": [sheet_spec]}))["file"])["S"]["C1"]
    assert text.value == "=A1*B1"
    assert text.data_type == "s"
    formula = decoded(
        ok(caller.named("excel.write", {"sheets": [sheet_spec], "formulas": True}))["file"]
    )["S"]["C1"]
    assert formula.data_type == "f"


@pytest.mark.parametrize(
    ("sheet_spec", "where"),
    [
        ({"name": "a/b", "rows": []}, "sheets[0].name"),
        ({"name": "x" * 32, "rows": []}, "sheets[0].name"),
        ({"name": "S", "rows": [[1], [[2]]]}, "sheets[0].rows[1]"),
        ({"name": "S", "rows": [[1], {"a": 1}]}, "sheets[0].rows[1]"),
        ({"name": "S", "rows": [{"a": {"nested": True}}]}, "sheets[0].rows[0]"),
        ({"name": "S", "rows": [["x" * 32768]]}, "sheets[0].rows[0]"),
        ({"name": "S", "columns": "a", "rows": []}, "sheets[0].columns"),
        ({"nam": "S"}, "sheets[0]"),
    ],
)
def test_excel_write_refuses_a_bad_sheet_naming_where(
    caller: Caller, sheet_spec: dict[str, Any], where: str
) -> None:
    """A bad sheet name, cell, row or key is a ValueError that says where it is."""
    script_error(caller.named("excel.write", {"sheets": [sheet_spec]}), where)


def test_excel_write_refuses_a_repeated_sheet_name_and_bad_input(caller: Caller) -> None:
    """Sheet names are unique regardless of case; the typed input refuses bad fields."""
    sheets = [{"name": "Data", "rows": []}, {"name": "data", "rows": []}]
    script_error(caller.named("excel.write", {"sheets": sheets}), "sheets[1].name", "twice")
    invalid(caller.named("excel.write", {"sheets": []}), "ctx.sheets")
    reply = caller.named("excel.write", {"sheets": [{"name": "S"}], "auto_width": 1})
    invalid(reply, "ctx.auto_width")
    invalid(caller.named("excel.write", {}), "`sheets`")


# -- table.describe ----------------------------------------------------------------------------

MIXED = [
    {"id": 1, "name": "Acme", "amount": 120.5, "mixed": 1, "paid": True, "tags": ["a"]},
    {"id": 2, "name": "Globex", "amount": None, "mixed": "one", "paid": False},
    {"id": 3, "name": "Acme", "amount": 3, "mixed": None, "paid": None, "tags": ["a"]},
    {"id": 4, "name": None, "mixed": 2.5, "note": None},
]


def test_table_describe_summarizes_mixed_columns_with_nulls(caller: Caller) -> None:
    """table.describe gives counts, nulls, uniques, numeric statistics and top values per column."""
    result = ok(caller.named("table.describe", {"records": MIXED}))
    assert result["rows"] == 4
    columns = {column["name"]: column for column in result["columns"]}
    assert list(columns) == ["id", "name", "amount", "mixed", "paid", "tags", "note"]
    assert columns["id"] == {
        "name": "id", "dtype": "int64", "kind": "integer", "count": 4, "nulls": 0, "unique": 4,
        "min": 1, "max": 4, "mean": 2.5, "std": pytest.approx(1.2909944487), "p25": 1.75,
        "median": 2.5, "p75": 3.25,
    }  # fmt: skip
    amount = columns["amount"]
    assert (amount["kind"], amount["count"], amount["nulls"]) == ("number", 2, 2)
    assert [amount[key] for key in ("min", "max", "mean", "median")] == [3, 120.5, 61.75, 61.75]
    name = columns["name"]
    assert (name["kind"], name["count"], name["nulls"], name["unique"]) == ("text", 3, 1, 2)
    assert name["top"] == [{"value": "Acme", "count": 2}, {"value": "Globex", "count": 1}]
    assert "mean" not in name
    mixed = columns["mixed"]
    assert [mixed[key] for key in ("kind", "dtype", "count", "unique")] == ["mixed", "object", 3, 3]
    assert [top["value"] for top in mixed["top"]] == [1, "one", 2.5]
    assert columns["paid"]["kind"] == "boolean"
    assert columns["paid"]["top"] == [{"value": True, "count": 1}, {"value": False, "count": 1}]
    assert columns["tags"]["kind"] == "list"
    assert columns["tags"]["top"] == [{"value": '["a"]', "count": 2}]
    assert columns["note"]["kind"] == "empty"
    note = columns["note"]
    assert [note[key] for key in ("count", "nulls", "unique", "top")] == [0, 4, 0, []]


def test_table_describe_is_json_safe(caller: Caller) -> None:
    """A statistic with no value (the std of one number, stats of nulls) is null, never NaN."""
    reply = caller.named("table.describe", {"records": [{"x": 5, "y": None}]})
    wire = protocol.encode(reply, protocol.JSON).decode()
    assert "NaN" not in wire
    assert "Infinity" not in wire
    x, _ = json.loads(wire)["result"]["columns"]
    assert x["std"] is None
    assert (x["min"], x["max"], x["mean"]) == (5, 5, 5.0)


def test_table_describe_selects_columns_and_limits_top_values(caller: Caller) -> None:
    """columns picks and orders what is described; top caps the listed values."""
    records = [{"a": letter, "b": n} for n, letter in enumerate("xxxyyz")]
    result = ok(caller.named("table.describe", {"records": records, "columns": ["a"], "top": 2}))
    assert [column["name"] for column in result["columns"]] == ["a"]
    assert result["columns"][0]["top"] == [{"value": "x", "count": 3}, {"value": "y", "count": 2}]


def test_table_describe_refuses_unknown_columns_and_bad_input(caller: Caller) -> None:
    """An unknown column is a ValueError naming it; a bad field is refused before running."""
    reply = caller.named("table.describe", {"records": [{"a": 1}], "columns": ["a", "zz"]})
    script_error(reply, "unknown column 'zz'")
    invalid(caller.named("table.describe", {"records": {"a": 1}}), "ctx.records")
    invalid(caller.named("table.describe", {"records": [1, 2]}), "ctx.records[0]")
    invalid(caller.named("table.describe", {"records": [], "top": 101}), "ctx.top")


# -- table.aggregate ---------------------------------------------------------------------------

SALES = [
    {"region": "north", "customer": "Acme", "month": "2026-01", "amount": 120.5, "qty": 2},
    {"region": "north", "customer": "Globex", "month": "2026-01", "amount": 80, "qty": 1},
    {"region": "south", "customer": "Acme", "month": "2026-02", "amount": 42.25, "qty": None},
    {"region": "south", "customer": "Initech", "month": "2026-02", "amount": 10, "qty": 5},
    {"region": None, "customer": "Acme", "month": "2026-02", "amount": 7, "qty": 1},
]


def aggregate(caller: Caller, **ctx: Any) -> Any:
    return ok(caller.named("table.aggregate", {"records": SALES, **ctx}))


def test_table_aggregate_groups_with_named_aggregations(caller: Caller) -> None:
    """group_by with several aggregations, default result names and null as its own group."""
    result = aggregate(
        caller,
        group_by=["region"],
        aggregations=[
            {"column": "amount", "op": "sum", "name": "total"},
            {"column": "qty", "op": "count"},
            {"column": "customer", "op": "nunique"},
            {"column": "customer", "op": "first"},
            {"column": "qty", "op": "last"},
            {"column": "qty", "op": "mean"},
            {"column": "month", "op": "min"},
            {"column": "amount", "op": "max"},
            {"column": "amount", "op": "median"},
        ],
    )  # fmt: skip
    assert result["columns"] == [
        "region", "total", "qty_count", "customer_nunique", "customer_first", "qty_last",
        "qty_mean", "month_min", "amount_max", "amount_median",
    ]  # fmt: skip
    assert result["rows"] == [
        ["north", 200.5, 2, 2, "Acme", 1, 1.5, "2026-01", 120.5, 100.25],
        ["south", 52.25, 1, 2, "Acme", 5, 5.0, "2026-02", 42.25, 26.125],
        [None, 7.0, 1, 1, "Acme", 1, 1.0, "2026-02", 7.0, 7.0],
    ]
    assert result["total_rows"] == 3


def test_table_aggregate_without_group_by_gives_one_row(caller: Caller) -> None:
    """Aggregations alone summarize the whole table; group_by alone counts rows per group."""
    aggregations = [
        {"column": "amount", "op": "sum"},
        {"column": "qty", "op": "count"},
        {"column": "region", "op": "last"},
    ]
    result = aggregate(caller, aggregations=aggregations)
    assert result == {
        "columns": ["amount_sum", "qty_count", "region_last"],
        "rows": [[259.75, 4, "south"]],
        "total_rows": 1,
    }
    result = aggregate(caller, group_by=["customer"])
    assert result["columns"] == ["customer", "count"]
    assert result["rows"] == [["Acme", 3], ["Globex", 1], ["Initech", 1]]


def test_table_aggregate_pivots(caller: Caller) -> None:
    """A pivot has a row per index value, a column per value of columns and null for none."""
    result = aggregate(
        caller, pivot={"index": "customer", "columns": "month", "values": "amount", "op": "sum"}
    )
    assert result["columns"] == ["customer", "2026-01", "2026-02"]
    assert result["rows"] == [
        ["Acme", 120.5, 49.25],
        ["Globex", 80.0, None],
        ["Initech", None, 10.0],
    ]
    result = aggregate(
        caller,
        pivot={"index": ["region", "customer"], "columns": "month", "values": "qty", "op": "count"},
    )
    assert result["columns"] == ["region", "customer", "2026-01", "2026-02"]
    assert result["rows"] == [
        ["north", "Acme", 1, None],
        ["north", "Globex", 1, None],
        ["south", "Acme", None, 0],
        ["south", "Initech", None, 1],
        [None, "Acme", None, 1],
    ]


@pytest.mark.parametrize(
    ("condition", "customers"),
    [
        ({"column": "customer", "op": "==", "value": "Acme"}, ["Acme", "Acme", "Acme"]),
        ({"column": "customer", "op": "!=", "value": "Acme"}, ["Globex", "Initech"]),
        ({"column": "amount", "op": "<", "value": 42.25}, ["Initech", "Acme"]),
        ({"column": "amount", "op": "<=", "value": 42.25}, ["Acme", "Initech", "Acme"]),
        ({"column": "amount", "op": ">", "value": 80}, ["Acme"]),
        ({"column": "amount", "op": ">=", "value": 80}, ["Acme", "Globex"]),
        ({"column": "month", "op": ">=", "value": "2026-02"}, ["Acme", "Initech", "Acme"]),
        ({"column": "customer", "op": "in", "value": ["Globex", "Initech"]}, ["Globex", "Initech"]),
        ({"column": "region", "op": "not_in", "value": ["north", "south"]}, ["Acme"]),
        ({"column": "qty", "op": "==", "value": None}, ["Acme"]),
        ({"column": "region", "op": "!=", "value": None}, ["Acme", "Globex", "Acme", "Initech"]),
    ],
)
def test_table_aggregate_filters(
    caller: Caller, condition: dict[str, Any], customers: list[str]
) -> None:
    """Each filter op keeps the rows it names, in their order; == null and != null test nulls."""
    result = aggregate(caller, filters=[condition])
    assert result["columns"] == ["region", "customer", "month", "amount", "qty"]
    assert [row[1] for row in result["rows"]] == customers


def test_table_aggregate_combines_filters_sort_and_limit(caller: Caller) -> None:
    """Filters all hold; sort_by with per-column direction, limit after it; total_rows before."""
    result = aggregate(
        caller,
        filters=[
            {"column": "amount", "op": ">", "value": 5},
            {"column": "customer", "op": "!=", "value": "Globex"},
        ],
        sort_by=["customer", "amount"],
        descending=[False, True],
        limit=2,
    )
    assert result["rows"] == [
        ["north", "Acme", "2026-01", 120.5, 2],
        ["south", "Acme", "2026-02", 42.25, None],
    ]
    assert result["total_rows"] == 4
    result = aggregate(
        caller,
        group_by=["customer"],
        aggregations=[{"column": "amount", "op": "sum", "name": "total"}],
        sort_by=["total"],
        descending=True,
        limit=1,
    )
    assert result == {"columns": ["customer", "total"], "rows": [["Acme", 169.75]], "total_rows": 3}


@pytest.mark.parametrize(
    "ctx",
    [
        {"group_by": ["nope"]},
        {"aggregations": [{"column": "nope", "op": "sum"}]},
        {"filters": [{"column": "nope", "op": "==", "value": 1}]},
        {"sort_by": ["nope"]},
        {"pivot": {"index": "customer", "columns": "nope", "values": "amount", "op": "sum"}},
        {
            "group_by": ["customer"],
            "aggregations": [{"column": "amount", "op": "sum"}],
            "sort_by": ["amount"],
        },
    ],
)
def test_table_aggregate_unknown_column_is_named(caller: Caller, ctx: dict[str, Any]) -> None:
    """A column that is not in the table is a ValueError naming it and the columns there are."""
    reply = caller.named("table.aggregate", {"records": SALES, **ctx})
    message = script_error(reply, "unknown column")
    assert "'nope'" in message or "'amount'" in message


@pytest.mark.parametrize(
    ("ctx", "field"),
    [
        ({"aggregations": [{"column": "amount", "op": "total"}]}, "ctx.aggregations[0].op"),
        ({"aggregations": [{"sum": "amount"}]}, "ctx.aggregations[0]"),
        ({"aggregations": [{"column": 1, "op": "sum"}]}, "ctx.aggregations[0]"),
        ({"filters": [{"column": "amount", "op": "~=", "value": 1}]}, "ctx.filters[0].op"),
        ({"filters": [{"op": "==", "value": 1}]}, "missing required field `column`"),
        (
            {"pivot": {"index": "customer", "columns": "month", "values": "amount", "op": "prod"}},
            "ctx.pivot.op",
        ),
        ({"pivot": {"index": "customer", "values": "amount"}}, "missing required field `columns`"),
        ({"limit": 0}, "ctx.limit"),
        ({"descending": "yes"}, "ctx.descending"),
        ({"group_by": "customer"}, "ctx.group_by"),
        ({"expression": "amount > 5"}, "`expression`"),
    ],
)
def test_table_aggregate_refuses_unknown_ops_before_running(
    caller: Caller, ctx: dict[str, Any], field: str
) -> None:
    """Unknown operations and mistyped fields are invalid_request naming the field."""
    invalid(caller.named("table.aggregate", {"records": SALES, **ctx}), field)


PIVOT = {"index": "customer", "columns": "month", "values": "amount", "op": "sum"}


@pytest.mark.parametrize(
    ("ctx", "part"),
    [
        ({"aggregations": [{"column": "customer", "op": "mean"}]}, "not numeric"),
        (
            {
                "aggregations": [
                    {"column": "amount", "op": "sum"},
                    {"column": "qty", "op": "max", "name": "amount_sum"},
                ]
            },
            "twice",
        ),
        ({"filters": [{"column": "customer", "op": ">", "value": 3}]}, "cannot compare"),
        ({"filters": [{"column": "amount", "op": "<", "value": None}]}, "null"),
        ({"filters": [{"column": "customer", "op": "in", "value": "Acme"}]}, "list"),
        ({"pivot": {"index": [], "columns": "month", "values": "amount"}}, "pivot.index"),
        ({"pivot": PIVOT, "group_by": ["region"]}, "combined"),
        ({"sort_by": ["amount", "qty"], "descending": [True]}, "descending"),
    ],
)
def test_table_aggregate_refuses_bad_operations_with_a_message(
    caller: Caller, ctx: dict[str, Any], part: str
) -> None:
    """Operations that cannot run are a ValueError that says what is wrong."""
    script_error(caller.named("table.aggregate", {"records": SALES, **ctx}), part)


def test_table_aggregate_passes_records_through_when_no_operation_is_asked(caller: Caller) -> None:
    """With no operation the records come back as columns and rows; no records, no columns."""
    result = aggregate(caller)
    assert result["columns"] == ["region", "customer", "month", "amount", "qty"]
    assert result["rows"][2] == ["south", "Acme", "2026-02", 42.25, None]
    assert result["total_rows"] == 5
    empty = ok(caller.named("table.aggregate", {"records": []}))
    assert empty == {"columns": [], "rows": [], "total_rows": 0}
