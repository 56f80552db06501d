"""Turning a script's return value into plain JSON values, with the contract's conversions."""

from __future__ import annotations

import datetime as dt
import decimal
import math
import sys
import uuid
from typing import Any

from sandbox.errors import NotSerializable

MAX_DEPTH = 100


def to_json_value(value: Any, depth: int = 0) -> Any:
    """Return ``value`` as None, bool, int, float, str, list and str-keyed dict only.

    datetime, date and time become ISO-8601 strings; Decimal and UUID strings; set, frozenset
    and tuple lists; numpy scalars and arrays their Python values; a pandas Series a list and a
    DataFrame a list of records. Non-finite floats become None (JSON has no NaN).
    """
    if depth > MAX_DEPTH:
        raise NotSerializable(f"result is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    # Subclasses (pymorphy3's tags, IntEnum members...) become the plain value they hold.
    if isinstance(value, str):
        return value if type(value) is str else str.__str__(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        number = float.__float__(value)
        return number if math.isfinite(number) else None
    if isinstance(value, dict):
        return {_key(key): to_json_value(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json_value(item, depth + 1) for item in value]
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return _iso(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    converted = _convert_numpy_pandas(value, depth)
    if converted is not _UNCONVERTED:
        return converted
    raise NotSerializable(f"a value of type '{type(value).__name__}' has no JSON form")


def _iso(value: dt.datetime | dt.date | dt.time) -> Any:
    pandas = sys.modules.get("pandas")
    if pandas is not None and value is pandas.NaT:
        return None
    return value.isoformat()


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    # The keys json.dumps accepts, spelled the way it spells them, plus the scalar
    # conversions values get (dates, decimals, UUIDs, numpy scalars).
    if isinstance(key, list | tuple | set | frozenset | dict):
        raise NotSerializable(f"a dict key of type '{type(key).__name__}' has no JSON form")
    converted = to_json_value(key)
    if isinstance(converted, str):
        return converted
    if converted is None:
        return _float_key(key) if isinstance(key, float) else "null"
    if isinstance(converted, bool):
        return "true" if converted else "false"
    if isinstance(converted, int | float):
        return repr(converted)
    raise NotSerializable(f"a dict key of type '{type(key).__name__}' has no JSON form")


def _float_key(key: float) -> str:
    if math.isnan(key):
        return "NaN"
    return "Infinity" if key > 0 else "-Infinity"


_UNCONVERTED = object()


def _convert_numpy_pandas(value: Any, depth: int) -> Any:
    """numpy and pandas values, looked up only if the script imported them."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            return to_json_value(value.tolist(), depth + 1)
        if isinstance(value, numpy.datetime64):
            return None if numpy.isnat(value) else str(value)
        if isinstance(value, numpy.generic):
            return to_json_value(value.item(), depth + 1)
    pandas = sys.modules.get("pandas")
    if pandas is not None:
        if isinstance(value, pandas.DataFrame):
            records = value.to_dict(orient="records")
            return to_json_value(records, depth + 1)
        if isinstance(value, pandas.Series | pandas.Index):
            return to_json_value(value.tolist(), depth + 1)
        if value is pandas.NA or value is pandas.NaT:
            return None
        if isinstance(value, pandas.Timedelta):
            return value.isoformat()
    return _UNCONVERTED
