"""The known doors of the allowed libraries: file paths, pickles and expression evaluators.

Door wrappers are handed to a script in place of a library function that takes a file path,
unpickles, or evaluates an expression: in-memory use (``io.BytesIO``, ``io.StringIO``, no path
at all) goes through unchanged, a path inside the run's scratch folder is allowed, and anything
else is a policy violation. (What libraries do internally is covered by ``sandbox.hooks``.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import BuiltinFunctionType, MethodType, ModuleType
from typing import Any, NoReturn

Refuse = Callable[[str], NoReturn]

# name -> (position among the call's arguments, keyword name) of a file path argument.
PATH_ARGUMENTS: dict[str, tuple[int, str]] = {
    "pandas.read_csv": (0, "filepath_or_buffer"),
    "pandas.read_table": (0, "filepath_or_buffer"),
    "pandas.read_fwf": (0, "filepath_or_buffer"),
    "pandas.read_excel": (0, "io"),
    "pandas.read_json": (0, "path_or_buf"),
    "pandas.read_html": (0, "io"),
    "pandas.read_xml": (0, "path_or_buffer"),
    "pandas.read_parquet": (0, "path"),
    "pandas.read_feather": (0, "path"),
    "pandas.read_orc": (0, "path"),
    "pandas.read_sas": (0, "filepath_or_buffer"),
    "pandas.read_spss": (0, "path"),
    "pandas.read_stata": (0, "filepath_or_buffer"),
    "pandas.ExcelFile": (0, "path_or_buffer"),
    "pandas.io.parsers.TextFileReader": (0, "f"),
    "pandas.io.parsers.readers.TextFileReader": (0, "f"),
    "pandas.ExcelWriter": (0, "path"),
    "pandas.DataFrame.to_csv": (0, "path_or_buf"),
    "pandas.DataFrame.to_excel": (0, "excel_writer"),
    "pandas.DataFrame.to_json": (0, "path_or_buf"),
    "pandas.DataFrame.to_html": (0, "buf"),
    "pandas.DataFrame.to_xml": (0, "path_or_buffer"),
    "pandas.DataFrame.to_parquet": (0, "path"),
    "pandas.DataFrame.to_feather": (0, "path"),
    "pandas.DataFrame.to_orc": (0, "path"),
    "pandas.DataFrame.to_stata": (0, "path"),
    "pandas.DataFrame.to_markdown": (0, "buf"),
    "pandas.DataFrame.to_latex": (0, "buf"),
    "pandas.DataFrame.to_string": (0, "buf"),
    "pandas.Series.to_csv": (0, "path_or_buf"),
    "pandas.Series.to_excel": (0, "excel_writer"),
    "pandas.Series.to_json": (0, "path_or_buf"),
    "pandas.Series.to_markdown": (0, "buf"),
    "pandas.Series.to_latex": (0, "buf"),
    "pandas.Series.to_string": (0, "buf"),
    "numpy.load": (0, "file"),
    "numpy.save": (0, "file"),
    "numpy.savez": (0, "file"),
    "numpy.savez_compressed": (0, "file"),
    "numpy.savetxt": (0, "fname"),
    "numpy.loadtxt": (0, "fname"),
    "numpy.genfromtxt": (0, "fname"),
    "openpyxl.load_workbook": (0, "filename"),
    "openpyxl.reader.excel.load_workbook": (0, "filename"),
    "openpyxl.Workbook.save": (0, "filename"),
    "openpyxl.writer.excel.save_workbook": (1, "filename"),
}

# Refused outright: they only work with real files, unpickle, or fetch data at run time.
REFUSED: tuple[str, ...] = (
    "pandas.read_pickle", "pandas.DataFrame.to_pickle", "pandas.Series.to_pickle",
    "pandas.read_hdf", "pandas.HDFStore", "pandas.DataFrame.to_hdf", "pandas.Series.to_hdf",
    "pandas.read_sql", "pandas.read_sql_query", "pandas.read_sql_table",
    "pandas.DataFrame.to_sql", "pandas.Series.to_sql", "pandas.read_clipboard",
    "pandas.DataFrame.to_clipboard", "pandas.Series.to_clipboard",
    "numpy.fromfile", "numpy.ndarray.tofile", "numpy.ndarray.dump", "numpy.memmap",
    "numpy.lib.format.open_memmap", "numpy.DataSource", "numpy.lib.npyio.DataSource",
    "nltk.download", "nltk.downloader.download", "nltk.downloader.Downloader",
    "typing.get_type_hints", "typing.ForwardRef",
    "io.open", "io.open_code", "io.FileIO", "operator.attrgetter", "operator.methodcaller",
    "string.Formatter",
)  # fmt: skip

# Expression evaluators: refused when the expression reaches names outside the frame.
EXPRESSIONS: dict[str, tuple[int, str]] = {
    "pandas.eval": (0, "expr"),
    "pandas.DataFrame.eval": (0, "expr"),
    "pandas.DataFrame.query": (0, "expr"),
}
_EXPRESSION_KEYWORDS = ("local_dict", "global_dict", "resolvers", "target")


def resolve(path: str) -> object | None:
    """The object at a dotted path, looked up among modules already imported."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is None:
            continue
        value: object = module
        for name in parts[cut:]:
            value = getattr(value, name, None)
            if value is None:
                return None
        return value
    return None


def identity(value: object) -> int:
    """The id that names a callable however it was reached (bound or not)."""
    if isinstance(value, MethodType):
        return id(value.__func__)
    if isinstance(value, BuiltinFunctionType):
        owner = value.__self__
        if owner is not None and not isinstance(owner, ModuleType):
            descriptor = getattr(type(owner), value.__name__, None)
            if descriptor is not None:
                return id(descriptor)
    return id(value)


@dataclass(frozen=True)
class _Door:
    name: str
    kind: str  # "path", "refused" or "expression"
    position: int = 0
    keyword: str = ""
    method: bool = False  # a function defined on a class: unbound, its first argument is self


class Doors:
    """The door table of one run: recognises a door and hands out its guarded form."""

    def __init__(self, refuse: Refuse, scratch: str | None) -> None:
        self._refuse = refuse
        self._scratch = os.path.realpath(scratch) if scratch else None
        self._table = door_table()

    def guard(self, value: Any, where: str) -> Any:
        """``value`` itself if it is no door, its guarded form if it is one."""
        door = self._table.get(identity(value))
        if door is None:
            return value
        if door.kind == "refused":
            self._refuse(f"'{door.name}' (reached as '{where}') is not available to scripts")
        return self._wrap(value, door, where)

    def _wrap(self, function: Callable[..., Any], door: _Door, where: str) -> Callable[..., Any]:
        offset = 1 if door.method and not isinstance(function, MethodType) else 0

        def guarded(*args: Any, **kwargs: Any) -> Any:
            argument = _argument(args, kwargs, door.position + offset, door.keyword)
            if door.kind == "path":
                self._check_path(argument, where)
                if door.name == "numpy.load" and kwargs.get("allow_pickle"):
                    self._refuse(f"'{where}' with allow_pickle=True (unpickling)")
            else:
                self._check_expression(argument, kwargs, where)
                # Names resolve to the frame's columns only, never to a caller's variables.
                kwargs["local_dict"] = {}
                kwargs["global_dict"] = {}
            return function(*args, **kwargs)

        guarded.__name__ = getattr(function, "__name__", door.name)
        guarded.__doc__ = getattr(function, "__doc__", None)
        return guarded

    def _check_path(self, argument: Any, name: str) -> None:
        if not isinstance(argument, str | bytes | os.PathLike):
            return  # None, a buffer or a file-like object: in memory.
        text = os.fsdecode(argument)
        if text.lower().startswith("file:"):
            self._refuse(f"'{name}' with a file URL")
        if "://" in text:
            return  # A URL: fetched over the network, under the network rules.
        real = os.path.realpath(text)
        if self._scratch and (real == self._scratch or real.startswith(self._scratch + os.sep)):
            return
        self._refuse(
            f"'{name}' with the path '{text}' (only the run's scratch folder is writable and "
            "readable; use io.BytesIO or io.StringIO for data in memory)"
        )

    def _check_expression(self, expression: Any, kwargs: dict[str, Any], name: str) -> None:
        if isinstance(expression, str) and ("@" in expression or "__" in expression):
            self._refuse(f"'{name}' with '@' references or private names in the expression")
        for keyword in _EXPRESSION_KEYWORDS:
            if kwargs.get(keyword) is not None:
                self._refuse(f"'{name}' with {keyword}=")


_TABLE: dict[int, _Door] = {}
_KEPT: list[object] = []  # keeps the door objects, and so their ids, alive


def door_table() -> dict[int, _Door]:
    """The doors among the modules imported so far, by the id of their function.

    Built once (the warm parent builds it before forking, so runs share it) and again only
    if it came out empty.
    """
    if _TABLE:
        return _TABLE
    for name, (position, keyword) in PATH_ARGUMENTS.items():
        _add(name, _Door(name, "path", position, keyword))
    for name in REFUSED:
        _add(name, _Door(name, "refused"))
    for name, (position, keyword) in EXPRESSIONS.items():
        _add(name, _Door(name, "expression", position, keyword))
    return _TABLE


def _add(name: str, door: _Door) -> None:
    value = resolve(name)
    if value is None:
        return
    owner = resolve(name.rpartition(".")[0])
    _KEPT.append(value)
    _TABLE[identity(value)] = _Door(
        door.name, door.kind, door.position, door.keyword, method=isinstance(owner, type)
    )


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, keyword: str) -> Any:
    if keyword in kwargs:
        return kwargs[keyword]
    return args[position] if len(args) > position else None
