"""The doors of the allowed libraries: file paths and URLs, pickles and expression evaluators.

Any callable of an allowed library with a parameter whose name says it takes a file or a URL
(``PATH_PARAMETERS``: ``filepath_or_buffer``, ``filename``, ``root``, ``url``...) is handed to
a script guarded, whatever module it lives in, found by its parameters rather than by a list of
functions, so a release that adds a reader is guarded too (``tests/test_door_inventory.py``
lists every such callable of the locked versions and fails on one that is neither guarded nor
refused). The guard, for each such argument:

- a buffer, a file object, ``None`` or any other non-path value goes through unchanged;
- a path (``str``, ``bytes`` or an ``os.PathLike``, converted once, so a path-like that
  answers differently the second time gets no second chance) must lie inside the run's
  scratch folder and is passed on as that exact, converted text;
- a URL (leading spaces and control characters ignored, as URL parsers ignore them) may only
  be ``http`` or ``https``, fetched under the network rules; ``file:`` and every other scheme
  are refused; a number (a file descriptor) is refused.

Refused outright: callables that only work with real files, unpickle, or fetch data at run
time (``REFUSED``). Expression evaluators (``pandas.eval``, ``DataFrame.eval``/``query``) get
an expression checked against what those evaluators are for: columns, constants, operators,
pandas' math functions and the ``.str``/``.dt``/``.cat`` accessors (``sandbox.expressions``).
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
from typing import Any, NoReturn

from sandbox.expressions import check_expression

Refuse = Callable[[str], NoReturn]

# Parameter names that take a file path or a URL: these, and any name PATH_NAME matches
# (``lexicon_file``, ``model_dir``, ``path_to_jar``, ``grammar_url``), unless NOT_PATHS lists it.
PATH_PARAMETERS = frozenset({
    "path", "paths", "filepath", "filepath_or_buffer", "path_or_buf", "path_or_buffer",
    "filename", "filenames", "fname", "file", "files_path", "io", "buf", "excel_writer",
    "root", "url", "urls", "uri", "base_url", "websocket_base_url", "fileobj", "fp", "outfile",
    "output_file", "dir", "dirname", "directory", "fileids", "fileid", "corpus_file",
    "corpus_filename", "model_file", "model_filename", "searchpath", "tmp_path", "out_path",
    "semtype_file", "path_to_bin", "path_to_jar", "path_to_model", "path_to_tree",
    "tab_dir", "bin_dir", "parser_dirname", "name_or_path", "inputfilename", "image_file",
    "resource_url", "destinationFile", "sql_path", "path_input", "source_file", "target_file",
    "infile", "filename_or_obj", "destpath", "urlbase",
})  # fmt: skip
PATH_NAME = re.compile(
    r"(file|path|dir|directory|folder|url|uri|filename|fname)s?$|^(file|path|url|uri)_"
    r"|_(path|file|dir|url)_|^path_to_",
    re.IGNORECASE,
)
# Names that look like paths but never take one in the allowed libraries, and why.
NOT_PATHS: dict[str, str] = {
    "fromfile": "a label in a diff header (difflib)",
    "tofile": "a label in a diff header (difflib)",
    "fromfiledate": "a date in a diff header (difflib)",
    "tofiledate": "a date in a diff header (difflib)",
    "max_fname_arg_count": "a count (pandas' docstring helper)",
    "cycle_path": "a graph path: a list of nodes (nltk)",
    "record_path": "a path of keys into nested records (pandas.json_normalize)",
    "worksheet_path": "a member name inside an .xlsx archive (openpyxl)",
    "book_path": "a member name inside an .xlsx archive (openpyxl)",
}


def path_parameter(name: str) -> bool:
    """Whether a parameter of this name takes a file path or a URL."""
    if name in NOT_PATHS:
        return False
    return name in PATH_PARAMETERS or PATH_NAME.search(name) is not None


# Callables whose path parameter has another name, by dotted name.
EXTRA_PATH_PARAMETERS: dict[str, tuple[str, ...]] = {
    "pandas.io.parsers.TextFileReader": ("f",),
    "pandas.io.parsers.readers.TextFileReader": ("f",),
    "numpy.fromregex": ("file",),
}

# Refused outright: they only work with real files, unpickle, or fetch data at run time.
REFUSED: tuple[str, ...] = (
    "pandas.read_pickle", "pandas.DataFrame.to_pickle", "pandas.Series.to_pickle",
    "pandas.read_hdf", "pandas.HDFStore", "pandas.DataFrame.to_hdf", "pandas.Series.to_hdf",
    "pandas.read_sql", "pandas.read_sql_query", "pandas.read_sql_table",
    "pandas.DataFrame.to_sql", "pandas.Series.to_sql", "pandas.read_clipboard",
    "pandas.DataFrame.to_clipboard", "pandas.Series.to_clipboard",
    "numpy.fromfile", "numpy.ndarray.tofile", "numpy.ndarray.dump", "numpy.generic.tofile",
    "numpy.generic.dump", "numpy.memmap",
    "numpy.lib.format.open_memmap", "numpy.DataSource", "numpy.lib.npyio.DataSource",
    "nltk.download", "nltk.downloader.download", "nltk.downloader.Downloader",
    "typing.get_type_hints", "typing.ForwardRef", "numpy.lib.stride_tricks.as_strided",
    "numpy.lib.stride_tricks.DummyArray",
    "io.open", "io.open_code", "io.FileIO", "operator.attrgetter", "operator.methodcaller",
    "string.Formatter",
)  # fmt: skip

# Expression evaluators: the expression is checked before they see it.
EXPRESSIONS: dict[str, tuple[int, str]] = {
    "pandas.eval": (0, "expr"),
    "pandas.DataFrame.eval": (0, "expr"),
    "pandas.DataFrame.query": (0, "expr"),
}
_EXPRESSION_KEYWORDS = ("local_dict", "global_dict", "resolvers", "target")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_URL_SCHEMES = frozenset({"http", "https", "ws", "wss"})
# What URL parsers strip from either end before they look for a scheme.
_URL_STRIP = "".join(chr(code) for code in range(0x21))
_LIBRARY_FUNCTIONS = ("cython_function_or_method", "fused_cython_function", "cyfunction")


def _text(value: Any, what: str) -> str:
    """``value`` as an exact ``str`` (a subclass is copied, never asked)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {type(value).__name__}")
    return str.__str__(value)


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


def anchor(value: object) -> object:
    """What names a callable however it was reached: the function of a bound method, the
    descriptor of a builtin method."""
    if isinstance(value, MethodType):
        return value.__func__
    if isinstance(value, BuiltinFunctionType):
        owner = value.__self__
        if owner is not None and not isinstance(owner, ModuleType):
            descriptor = getattr(type(owner), value.__name__, None)
            if descriptor is not None:
                return descriptor
    return value


def identity(value: object) -> int:
    """The id that names a callable however it was reached (bound or not)."""
    return id(anchor(value))


@dataclass(frozen=True)
class Door:
    """How a callable is guarded: ``path`` (those parameters), ``refused`` or ``expression``."""

    name: str
    kind: str
    parameters: tuple[tuple[str, int], ...] = ()
    """(parameter name, its index among the code's parameters, ``self`` of a method and
    ``cls`` of a class's ``__new__``/``__init__`` counted; -1 for keyword-only)."""


def passed_position(function: object, index: int) -> int:
    """Where a caller of ``function`` passes the parameter at ``index``: a bound method and a
    class (its ``__init__``) are passed one argument less than their code takes."""
    if index < 0:
        return -1
    return index - 1 if isinstance(function, MethodType | type) else index


def code_parameters(value: object) -> tuple[tuple[str, ...], int] | None:
    """The parameter names of a Python or Cython callable (a class: of its ``__init__`` or
    ``__new__``), ``self`` included, and how many may be passed by position."""
    target: Any = value.__func__ if isinstance(value, MethodType) else value
    if type(target).__name__ == "_ArrayFunctionDispatcher":  # numpy's wrapped functions
        target = getattr(target, "_implementation", None)
    elif isinstance(value, type):
        target = None
        for klass in value.__mro__:
            for name in ("__init__", "__new__"):
                member = vars(klass).get(name)
                if isinstance(member, staticmethod):
                    member = member.__func__
                if isinstance(member, FunctionType) or type(member).__name__ in _LIBRARY_FUNCTIONS:
                    target = member
                    break
            if target is not None:
                break
    if not (isinstance(target, FunctionType) or type(target).__name__ in _LIBRARY_FUNCTIONS):
        return None
    code = getattr(target, "__code__", None)
    if code is None:
        return None
    count = code.co_argcount + code.co_kwonlyargcount
    return tuple(code.co_varnames[:count]), code.co_argcount


def path_door(value: object, name: str, extra: tuple[str, ...] = ()) -> Door | None:
    """The path door of ``value`` if any of its parameters takes a file or a URL."""
    found = code_parameters(value)
    if found is None:
        return None
    names, positional = found
    wanted = [
        (parameter, index if index < positional else -1)
        for index, parameter in enumerate(names)
        if path_parameter(parameter) or parameter in extra
    ]
    return Door(name, "path", tuple(wanted)) if wanted else None


class Doors:
    """The doors of one run: recognises a door and hands out its guarded form."""

    def __init__(self, refuse: Refuse, scratch: str | None) -> None:
        self._refuse = refuse
        self._scratch = os.path.realpath(scratch) if scratch else None
        self._table = door_table()
        self._found: dict[int, tuple[object, Door | None]] = {}
        self.wrappers: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()
        """The guarded forms handed out: the sandbox's own functions a script may hold."""

    def guard(self, value: Any, where: str) -> Any:
        """``value`` itself if it is no door, its guarded form if it is one."""
        door = self.door(value)
        if door is None:
            return value
        if door.kind == "refused":
            self._refuse(f"'{door.name}' (reached as '{where}') is not available to scripts")
        return self._wrap(value, door, where)

    def door(self, value: Any) -> Door | None:
        """The door ``value`` is, if it is one (looked up once per callable)."""
        if not callable(value):
            return None
        target = anchor(value)
        key = id(target)
        if len(sys.modules) != _BUILT_WITH[0]:
            door_table(refresh=True)  # modules imported since: their listed doors too
        door = self._table.get(key)
        if door is not None:
            return door
        found = self._found.get(key)
        if found is not None and found[0] is target:
            return found[1]  # the same object (an id alone could be a new one's)
        door = None
        module = getattr(value, "__module__", None)
        if isinstance(module, str) and module != "builtins":
            door = path_door(value, f"{module}.{getattr(value, '__qualname__', '?')}")
        if len(self._found) > 100_000:
            self._found.clear()
        self._found[key] = (target, door)  # kept alive while it is remembered
        return door

    def _wrap(self, function: Callable[..., Any], door: Door, where: str) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if door.kind == "expression":
                args, kwargs = self._checked_expression(args, kwargs, where)
                # Names resolve to the frame's columns only, never to a caller's variables.
                kwargs["local_dict"] = {}
                kwargs["global_dict"] = {}
                return function(*args, **kwargs)
            if door.kind == "names":
                self._check_names(function, args, kwargs, door, where)
                if door.name in NAMED_AFTER_CALLER:
                    # The class is named after its caller's module, which would be this one.
                    kwargs["module"] = _module_of(sys._getframe(1))
                result = function(*args, **kwargs)
                if door.name == "dataclasses.dataclass" and not args and callable(result):
                    return self._wrap(result, Door(door.name, "names", (("cls", 0),)), where)
                return result
            positional = list(args)
            for parameter, index in door.parameters:
                position = passed_position(function, index)
                if parameter in kwargs:
                    kwargs[parameter] = self.checked_path(kwargs[parameter], where)
                elif 0 <= position < len(positional):
                    positional[position] = self.checked_path(positional[position], where)
            if door.name == "numpy.load" and kwargs.get("allow_pickle"):
                self._refuse(f"'{where}' with allow_pickle=True (unpickling)")
            return function(*positional, **kwargs)

        guarded.__name__ = getattr(function, "__name__", door.name)
        guarded.__doc__ = getattr(function, "__doc__", None)
        self.wrappers.add(guarded)
        return guarded

    def guarded_open(  # noqa: PLR0917 - the signature of open itself
        self,
        file: Any,
        mode: Any = "r",
        buffering: Any = -1,
        encoding: Any = None,
        errors: Any = None,
        newline: Any = None,
        closefd: Any = True,
        opener: Any = None,
    ) -> Any:
        """The ``open`` builtin of a script: a path inside the run's scratch folder only
        (``in/`` holds the request's files, read-only; ``out/`` is what the reply lists); no
        file descriptor, no opener, no unbuffered raw file (``io.FileIO`` opens by path)."""
        if opener is not None or closefd is not True:
            self._refuse("'open' with an opener or closefd")
        if type(buffering) is not int or buffering == 0:
            self._refuse("'open' unbuffered (buffering=0 gives a raw file object)")
        if isinstance(file, str | bytes) and _SCHEME.match(os.fsdecode(file).strip(_URL_STRIP)):
            self._refuse("'open' with a URL (open takes a path in the run's scratch folder)")
        path = self.checked_path(file, "open")
        return open(
            path,
            _text(mode, "mode"),
            buffering,
            None if encoding is None else _text(encoding, "encoding"),
            None if errors is None else _text(errors, "errors"),
            None if newline is None else _text(newline, "newline"),
        )

    def checked_path(self, argument: Any, name: str) -> Any:
        """``argument`` as the library will get it: unchanged if it is no path, the exact
        checked text (or a path object holding it) if it is one; refused otherwise."""
        # Decided by type(), never isinstance(): an object's __class__ may claim to be a bool.
        kind = type(argument)
        if argument is None or kind is bool:
            return argument
        if issubclass(kind, int):
            self._refuse(f"'{name}' with a file descriptor")
        path_like = hasattr(kind, "__fspath__")
        if issubclass(kind, str):
            text = str.__str__(argument)
        elif issubclass(kind, bytes):
            text = os.fsdecode(bytes(argument))
        elif path_like:
            converted = os.fspath(argument)  # once: the answer is what is checked and used
            text = (
                str.__str__(converted)
                if isinstance(converted, str)
                else os.fsdecode(bytes(converted))
            )
        else:
            return argument  # a buffer, a file object, a list of lines: nothing to open
        stripped = text.strip(_URL_STRIP)
        scheme = _SCHEME.match(stripped)
        if scheme is not None:
            if scheme.group(1).lower() not in _URL_SCHEMES:
                self._refuse(f"'{name}' with a {scheme.group(1)}: URL (only http(s) and ws(s))")
            return stripped  # fetched under the network rules
        if "\0" in text:
            self._refuse(f"'{name}' with a path holding a NUL character")
        real = os.path.realpath(text)
        if not (
            self._scratch and (real == self._scratch or real.startswith(self._scratch + os.sep))
        ):
            self._refuse(
                f"'{name}' with the path '{text[:200]}' (only the run's scratch folder is "
                "writable and readable; use io.BytesIO or io.StringIO for data in memory)"
            )
        if path_like:
            return pathlib.Path(text)
        return text if issubclass(kind, str) else os.fsencode(text)

    def _checked_expression(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], name: str
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments with the expression, checked, as an exact string (a subclass
        could answer pandas' own ``splitlines`` with another expression)."""
        for keyword in _EXPRESSION_KEYWORDS:
            if kwargs.get(keyword) is not None:
                self._refuse(f"'{name}' with {keyword}=")
        if "expr" in kwargs:
            kwargs = {**kwargs, "expr": self._expression(kwargs["expr"], name)}
            return args, kwargs
        # The expression: the first string argument (after self for the DataFrame methods).
        position = next((i for i, arg in enumerate(args) if isinstance(arg, str)), None)
        if position is None:
            self._refuse(f"'{name}' without an expression string")
        checked = self._expression(args[position], name)
        return (*args[:position], checked, *args[position + 1 :]), kwargs

    def _expression(self, expression: Any, name: str) -> str:
        if not isinstance(expression, str):
            self._refuse(f"'{name}' without an expression string")
        text = str.__str__(expression)
        problem = check_expression(text)
        if problem is not None:
            self._refuse(f"'{name}': {problem}")
        return text

    def _check_names(
        self,
        function: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        door: Door,
        name: str,
    ) -> None:
        """Arguments that name attributes (or namespaces of a class to make): no private or
        dunder name anywhere in them, and no module or library object to write to."""
        for parameter, index in door.parameters:
            position = passed_position(function, index)
            if parameter in kwargs:
                value = kwargs[parameter]
            elif 0 <= position < len(args):
                value = args[position]
            else:
                continue
            if parameter in FORGED and value is not None:
                self._refuse(f"'{name}' with {parameter}= (a class says where it was made)")
            if parameter in SCRIPTS_OWN:
                if not _made_by_a_script(value):
                    self._refuse(f"'{name}' on {type(value).__name__} (only on the script's own)")
                continue
            private = private_name(value)
            if private is not None:
                self._refuse(f"'{name}' with the private name '{private[:60]}' in '{parameter}'")


# Callables that take the names of attributes to read or write, or the namespace of a class they
# make, by dotted name -> those parameters. Nothing private may be named, and what they write
# to (SCRIPTS_OWN) must be the script's own.
# Indices count self (methods). (Enum's functional API is a metaclass call: sandbox.hooks.)
NAMES: dict[str, tuple[tuple[str, int], ...]] = {
    "functools.update_wrapper": (("wrapper", 0), ("wrapped", 1), ("assigned", 2),
                                 ("updated", 3)),
    "functools.wraps": (("wrapped", 0), ("assigned", 1), ("updated", 2)),
    "dataclasses.make_dataclass": (("cls_name", 0), ("fields", 1), ("namespace", -1),
                                   ("module", -1)),
    "dataclasses.dataclass": (("cls", 0),),
    "collections.namedtuple": (("module", -1),),
    "pandas.api.extensions.register_dataframe_accessor": (("name", 0),),
    "pandas.api.extensions.register_series_accessor": (("name", 0),),
    "pandas.api.extensions.register_index_accessor": (("name", 0),),
}  # fmt: skip
# pandas methods that take a function *or the name of one*, looked up on the object (its
# dunders included): on every class pandas defines (frames, series, groupby, windows,
# resamplers, EWM), found as its modules are imported.
PANDAS_BY_NAME = frozenset({"agg", "aggregate", "apply", "transform", "map", "pipe", "applymap"})
PANDAS_BY_NAME_PARAMETERS = (("func", 1), ("arg", 1))
# What these write to, and what a wrapper says it wraps (``__wrapped__``, which typing, pydantic
# and inspect follow to a function's globals): the script's own functions and classes only.
SCRIPTS_OWN = frozenset({"wrapper", "cls", "wrapped"})
FORGED = frozenset({"module", "qualname"})
# Names doors whose class takes its module from the caller's frame unless told (module=).
NAMED_AFTER_CALLER = frozenset({"collections.namedtuple"})


def _module_of(frame: Any) -> str:
    name = frame.f_globals.get("__name__") if frame is not None else None
    return name if type(name) is str else "script"


_NAME_SCAN_LIMIT = 10_000


def private_name(value: Any, depth: int = 0, seen: list[int] | None = None) -> str | None:
    """The first string in ``value`` (nested lists, tuples, sets and dict keys and values)
    that starts with '_' (a module= or qualname= of any kind counts, too), or None."""
    budget = seen if seen is not None else [0]
    budget[0] += 1
    if budget[0] > _NAME_SCAN_LIMIT or depth > 8:
        return "(too much to check)"
    kind = type(value)
    if issubclass(kind, str):
        text = str.__str__(value)
        return text if text.startswith("_") else None
    if kind in (list, tuple, set, frozenset):
        items: Any = value
    elif kind is dict:
        items = [*value.keys(), *value.values()]
    else:
        return None
    for item in items:
        found = private_name(item, depth + 1, budget)
        if found is not None:
            return found
    return None


def _made_by_a_script(value: Any) -> bool:
    """A function or class the script itself defined (what a wrapper may be written on)."""
    if isinstance(value, FunctionType):
        return value.__code__.co_filename == "<script>"
    if isinstance(value, type):
        return bool(type.__getattribute__(value, "__module__") == "script")
    return False


_TABLE: dict[int, Door] = {}
_KEPT: list[object] = []  # keeps the door objects, and so their ids, alive
_BUILT_WITH = [-1]  # how many modules were imported when the table was last built
_FOUND_NAMES: set[str] = set()  # listed doors already in the table


class _Imports:
    """A meta path finder that finds nothing and remembers what was imported since it was
    last asked: the table is completed from those modules alone. (Looking through every
    module again would touch, and so copy, thousands of pages a child shares with its warm
    parent.)"""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        self.names.append(name)

    def take(self) -> list[str]:
        names, self.names = self.names, []
        return names


_IMPORTS = _Imports()


def door_table(*, refresh: bool = False) -> dict[int, Door]:
    """The listed doors among the modules imported so far, by the id of their function.

    Built in the warm parent before it forks (runs share it), and completed when modules have
    been imported since, from those modules only. Doors found by their parameters are found
    as they are reached.
    """
    if _BUILT_WITH[0] == len(sys.modules) and not refresh:
        return _TABLE
    first = _BUILT_WITH[0] < 0
    _BUILT_WITH[0] = len(sys.modules)
    if first:
        sys.meta_path.insert(0, _IMPORTS)  # a finder that finds nothing
        _IMPORTS.take()
        new = [name for name in sys.modules if name.startswith("pandas.")]
    else:
        new = _IMPORTS.take()
        if not new:
            return _TABLE
    for name in REFUSED:
        _add(name, Door(name, "refused"))
    for name, (position, keyword) in EXPRESSIONS.items():
        _add(name, Door(name, "expression", ((keyword, position),)))
    for name, parameters in NAMES.items():
        _add(name, Door(name, "names", parameters))
    for name, extra in EXTRA_PATH_PARAMETERS.items():
        _add(name, None, extra)
    for name, method in _pandas_methods_by_name(new):
        _KEPT.append(method)
        _TABLE[identity(method)] = Door(name, "names", PANDAS_BY_NAME_PARAMETERS)
    return _TABLE


def _pandas_methods_by_name(modules: list[str]) -> list[tuple[str, Callable[..., Any]]]:
    """The methods in ``PANDAS_BY_NAME`` of the classes in these pandas modules."""
    found: dict[int, tuple[str, Callable[..., Any]]] = {}
    for module_name in modules:
        module = sys.modules.get(module_name)
        if not module_name.startswith("pandas.") or module is None:
            continue
        for value in list(vars(module).values()):
            if not isinstance(value, type) or not value.__module__.startswith("pandas"):
                continue
            for method_name in PANDAS_BY_NAME:
                method = value.__dict__.get(method_name)
                if isinstance(method, FunctionType):
                    name = f"{value.__module__}.{value.__qualname__}.{method_name}"
                    found[id(method)] = (name, method)
    return list(found.values())


def _add(name: str, door: Door | None, extra: tuple[str, ...] = ()) -> None:
    """Put the listed door ``name`` in the table if its module is imported (``door`` None:
    the path door its parameters, with ``extra``, make)."""
    if name in _FOUND_NAMES:
        return
    value = resolve(name)
    if value is None:
        return
    if door is None:
        door = path_door(value, name, extra)
        if door is None:
            return
    _FOUND_NAMES.add(name)
    _KEPT.append(value)
    _TABLE[identity(value)] = door
