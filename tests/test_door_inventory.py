"""The door inventory: every public callable of the allowed libraries (at the locked versions)
that takes a path-like or URL parameter is guarded or refused.

The walk imports every public module of every allowed library, as a script could, and looks at
the parameters of every public function, class and method. A parameter whose name suggests a
file, a folder or a URL (``SUGGESTS_PATH``) must be one the doors guard (its name is in
``sandbox.doors.PATH_PARAMETERS``, or listed for that callable), belong to a callable the
policy refuses, or be listed below as not a path, with the reason. A release that adds a reader
under a new name makes this test fail until the reader is classified.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import inspect
import io
import pkgutil
import re
import warnings
from collections.abc import Iterator
from functools import cache
from types import ModuleType
from typing import Any

import pytest

from sandbox.config import DEFAULT_ALLOWED_MODULES
from sandbox.doors import NOT_PATHS, Doors, code_parameters
from sandbox.errors import PolicyViolation
from sandbox.policy import Policy

SUGGESTS_PATH = re.compile(
    r"path|file|fname|url|uri|^dir|dir$|folder|^io$|^buf|^root$|^src$|^dst$|writer|^f$|^fp$"
    r"|^fh$|handle|^source$|^target$|location|stream|^dest|^out$",
    re.IGNORECASE,
)

# Parameter names the inventory flags that never take a path or URL in these libraries (the
# doors do not guard them), whatever callable, and why. The doors' own list, for names they
# would otherwise guard, is sandbox.doors.NOT_PATHS.
NOT_PATHS_HERE: dict[str, str] = {
    "target": "a value or column to act on",
    "targets": "values to act on",
    "source": "source text (SQL, templates) or a value",
    "sources": "values",
    "f": "a function (to apply, to wrap)",
    "files": "an upload mapping (requests) or an OpenAI resource",
    "stream": "a boolean (OpenAI streaming) or an open stream object",
    "stream_options": "OpenAI streaming options",
    "stream_id": "an identifier",
    "stream_cls": "a class",
    "stream_mode": "a setting",
    "stream_format": "an audio format name",
    "raw_stream": "an open stream object",
    "buffer_stream": "an open stream object",
    "upstream": "a lineage node (sqlglot)",
    "downstream": "lineage nodes (sqlglot)",
    "handle": "an open handle object",
    "handles": "handle objects",
    "handler": "a callback or handler object",
    "handlers": "handler objects",
    "event_handler": "a callback object",
    "default_handler": "a callback",
    "conflict_handler": "an option parser setting",
    "elt_handler": "a callback",
    "tool_handlers": "callbacks",
    "strip_handles": "a flag (tweets)",
    "handle_negation": "a flag",
    "noAdjustHandles": "a drawing setting",
    "buffer": "a buffer object (bytes, array)",
    "buffered": "a flag",
    "buffer_size": "a size",
    "buffersize": "a size",
    "buf_size": "a size",
    "writer": "a writer object (csv, openpyxl)",
    "location": "a position in text or a cell location",
    "locations": "SQL locations (sqlglot syntax nodes)",
    "content_location": "a header value",
    "binary_location": "an external prover binary (nltk's prover wrappers run processes)",
    "redirect": "a flag",
    "aws_profile": "an AWS profile name",
    "profile": "a profile name",
    "text_profile": "a profile of text",
    "filesystem": "an fsspec/pyarrow filesystem object",
    "xpath": "an XPath expression",
    "dest": "a destination value or object",
    "dest_list": "replacement values (pandas)",
    "dest_pos": "a position (rapidfuzz)",
    "dest_len": "a length (rapidfuzz)",
    "destination_string": "a string to edit (rapidfuzz)",
    "destination": "a destination value",
    "out": "an output array (numpy)",
    "src": "a source array or value",
    "dst": "a destination array or value",
    "file_id": "an OpenAI file id ('file-...'), sent as text",
    "file_ids": "OpenAI file ids",
    "uploaded_file_ids": "OpenAI file ids",
    "existing_files": "multipart parts already built",
    "file_search": "an OpenAI setting",
    "fastpath": "a flag (pandas)",
    "usedforsecurity": "a hashlib flag",
    "limit_direction": "'forward' or 'backward' (pandas interpolate)",
    "direction": "a direction, not a folder",
    "dirty": "a flag",
    "include_fileid": "a flag",
    "add_curly_variants": "a flag",
    "filetype": "a kind of file, as text",
    "fn_fid_or_fname": "a FrameNet frame id or name inside its own corpus",
    "fn_fname": "a FrameNet frame name",
    "fileid_or_classid": "a VerbNet class id inside its own corpus",
    "convert_file_like": "a flag",
    "created_handles": "handle objects",
    "strict_data_files": "a pytest option (pandas' test helpers)",
    "urllib3_version": "a version string",
    "old_url": "a URL compared, never fetched",
    "new_url": "a URL compared, never fetched",
    "url_input": "a URL checked, never fetched (nltk.pathsec)",
    "zip_obj_or_path": "checked, never opened (nltk.pathsec)",
    "text_or_uri": "an XML namespace (openpyxl)",
    "namespaceUri": "an XML namespace (openpyxl)",
    "invalidUrl": "a flag (openpyxl)",
    "token_exchange_url": "an OpenAI setting, fetched under the network rules",
    "grammar_url": "an nltk resource name (nltk.data is refused)",
    "allowed_dir": "a folder a path is checked against (nltk.pathsec)",
    "parse_fileid_xform": "a function (nltk)",
    "security": "an OpenAI request setting",
}

# Attributes of openpyxl's XML classes: values of the document, never paths.
OPENPYXL_XML = ("errDir", "fadeDir", "pathLst", "buFont", "buFontTx", "DocSecurity", "Target",
                "fileVersion", "fileSharing", "fileRecoveryPr", "backupFile", "longFileNames",
                "fileRecovery")  # fmt: skip

# Particular callables and parameters, by dotted-name pattern, that need no door, and why.
NOT_PATH_CALLABLES: dict[tuple[str, str], str] = {
    ("pandas.compat.numpy.function.*", "fname"): "the name of a function, in error messages",
    ("openpyxl.*", "path"): "ElementTree paths inside an XML element (find, findall)",
    ("*.urlsplit", "url"): "parsing a URL, nothing is fetched",
    ("numpy.typing.mypy_plugin.*", "file"): "a mypy plugin hook, never called by runs",
    ("pandas.conftest.*", "*"): "pandas' pytest fixtures",
    ("nltk.draw.*", "*"): "Tk widgets (no display in a run)",
    **{("openpyxl.*", name): "an attribute of an XML element" for name in OPENPYXL_XML},
}


def _public_modules() -> Iterator[ModuleType]:
    policy = Policy(DEFAULT_ALLOWED_MODULES)
    for top in DEFAULT_ALLOWED_MODULES:
        with _quiet():
            module = importlib.import_module(top)
        yield module
        if not hasattr(module, "__path__"):
            continue
        for info in pkgutil.walk_packages(module.__path__, top + ".", onerror=lambda _n: None):
            parts = info.name.split(".")
            if any(part.startswith("_") or part in ("tests", "testing") for part in parts):
                continue
            if not policy.module_allowed(info.name):
                continue
            with _quiet(), contextlib.suppress(Exception):
                yield importlib.import_module(info.name)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _parameters(value: Any) -> tuple[str, ...]:
    found = code_parameters(value)
    if found is not None:
        return found[0]
    try:
        return tuple(inspect.signature(value).parameters)
    except (TypeError, ValueError):
        return ()


@cache
def inventory() -> list[tuple[str, str, Any]]:
    """(dotted name, parameter, callable) for every public path-like parameter."""
    seen: set[int] = set()
    found: list[tuple[str, str, Any]] = []

    def visit(value: Any, name: str) -> None:
        if id(value) in seen or isinstance(value, ModuleType) or not callable(value):
            return
        seen.add(id(value))
        for parameter in _parameters(value):
            if SUGGESTS_PATH.search(parameter) and parameter not in ("self", "cls"):
                found.append((name, parameter, value))

    for module in _public_modules():
        for attribute in [name for name in dir(module) if not name.startswith("_")]:
            with _quiet(), contextlib.suppress(Exception):
                value = getattr(module, attribute)
                visit(value, f"{module.__name__}.{attribute}")
                if isinstance(value, type):
                    for member in [m for m in vars(value) if not m.startswith("_")]:
                        with contextlib.suppress(Exception):
                            visit(getattr(value, member), f"{module.__name__}.{attribute}.{member}")
    return found


def _status(policy: Policy, doors: Doors, name: str, parameter: str, value: Any) -> str | None:
    """None when the parameter is accounted for; otherwise why not."""
    try:
        policy.check(value, name)
    except PolicyViolation:
        return None  # refused (a forbidden owner, a listed refusal)
    door = doors.door(value)
    if door is not None and door.kind in ("refused", "expression"):
        return None
    if door is not None and parameter in dict(door.parameters):
        return None
    if parameter in NOT_PATHS_HERE or parameter in NOT_PATHS:
        return None
    for pattern, wanted in NOT_PATH_CALLABLES:
        if fnmatch.fnmatchcase(name, pattern) and wanted in ("*", parameter):
            return None
    return "neither guarded, refused nor listed as not a path"


def test_every_path_like_parameter_is_guarded_or_refused() -> None:
    """Each public callable parameter that suggests a file, folder or URL is accounted for."""
    found = inventory()
    policy = Policy(DEFAULT_ALLOWED_MODULES, "/nonexistent-scratch")
    doors = Doors(policy.refuse, "/nonexistent-scratch")
    assert len(found) > 500  # the walk reached the libraries
    open_doors = sorted(
        f"{name}({parameter})"
        for name, parameter, value in found
        if _status(policy, doors, name, parameter, value) is not None
    )
    assert open_doors == [], f"{len(open_doors)} unclassified:\n" + "\n".join(open_doors)


@pytest.mark.parametrize(
    ("name", "parameter"),
    [
        ("pandas.read_csv", "filepath_or_buffer"),
        ("pandas.DataFrame.to_json", "path_or_buf"),
        ("numpy.fromregex", "file"),
        ("numpy.save", "file"),
        ("openpyxl.load_workbook", "filename"),
        ("openpyxl.Workbook.save", "filename"),
        ("requests.get", "url"),
    ],
)
def test_known_readers_and_writers_are_guarded(name: str, parameter: str) -> None:
    """Spot checks: the classic readers and writers come out guarded on their path argument."""
    policy = Policy(DEFAULT_ALLOWED_MODULES, "/nonexistent-scratch")
    doors = Doors(policy.refuse, "/nonexistent-scratch")
    from sandbox.doors import resolve

    value = resolve(name)
    assert value is not None, name
    door = doors.door(value)
    assert door is not None, name
    assert door.kind == "path"
    assert parameter in dict(door.parameters)
