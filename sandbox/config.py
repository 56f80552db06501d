"""The settings one pool runs with, given by the caller (the sandbox reads no environment)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

DEFAULT_ALLOWED_MODULES: tuple[str, ...] = (
    # Standard library, for computing.
    "math", "json", "re", "datetime", "decimal", "statistics", "collections", "itertools",
    "functools", "string", "textwrap", "unicodedata", "difflib", "csv", "io", "base64",
    "hashlib", "uuid", "random", "secrets", "time", "typing", "dataclasses", "enum", "copy",
    "operator", "heapq", "bisect", "zoneinfo",
    # Pre-installed libraries.
    "pandas", "numpy", "openpyxl", "sqlglot", "pymorphy3", "nltk", "rapidfuzz", "openai",
    "requests",
)  # fmt: skip

# Modules a script may never reach, whatever the configured allow list says.
FORBIDDEN_MODULES: frozenset[str] = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "signal", "socket", "ctypes", "importlib",
    "pickle", "marshal", "shelve", "multiprocessing", "threading", "builtins", "gc",
    "inspect", "shutil", "tempfile", "pathlib", "pty", "fcntl", "resource", "mmap",
    "code", "codeop", "runpy", "pkgutil", "zipimport", "asyncio", "concurrent", "select",
    "selectors", "ssl", "http", "urllib", "ftplib", "smtplib", "telnetlib", "sysconfig",
    "site", "webbrowser", "tracemalloc", "faulthandler", "atexit", "copyreg", "posixpath",
    "ntpath", "glob", "linecache", "_thread", "_posixsubprocess", "_socket", "_ctypes",
    "_pickle", "_signal", "_imp", "_frozen_importlib", "_frozen_importlib_external",
    "types", "traceback", "timeit", "doctest", "pdb", "bdb", "trace", "cProfile", "profile",
    "pydoc", "zipfile", "tarfile", "gzip", "bz2", "lzma", "dbm", "sqlite3", "fileinput",
    "filecmp", "logging", "xmlrpc", "socketserver", "imaplib", "poplib", "nntplib",
})  # fmt: skip

# Parts of allowed libraries that are refused as modules (reached as attributes or imported):
# they capture frames, unpickle, call C directly, fetch data or start processes, hand out a
# function's globals (nltk.decorators.getinfo) or set any attribute by name, dunders included
# (nltk.decorators.update_wrapper, pandas.core.common.temp_setattr).
FORBIDDEN_SUBMODULES: tuple[str, ...] = (
    "pandas.core.computation", "pandas.compat.pickle_compat", "pandas.io.pickle",
    "pandas.io.common", "pandas.io.parsers", "pandas.io.clipboard", "pandas.io.clipboards",
    "pandas.io.sql", "pandas.io.pytables", "pandas.testing", "numpy.ctypeslib",
    "numpy.f2py", "numpy.distutils", "numpy.testing", "numpy.lib.format", "nltk.downloader",
    "nltk.internals", "nltk.data", "nltk.classify.senna", "nltk.app", "nltk.parse.corenlp",
    "nltk.tag.stanford", "nltk.parse.stanford", "nltk.tokenize.stanford", "sqlglot.executor",
    "openai.cli", "pymorphy3.cli", "requests.utils", "numpy.random._pickle", "nltk.picklesec",
    "nltk.decorators", "pandas.core.common",
)  # fmt: skip

# Of those, the ones where no function or class is for scripts at all (refused by owner too).
FORBIDDEN_OWNERS: tuple[str, ...] = (
    "pandas.core.computation", "pandas.compat.pickle_compat", "pandas.io.pickle",
    "pandas.io.common", "numpy.ctypeslib", "nltk.downloader", "nltk.internals",
    "nltk.picklesec", "sqlglot.executor", "nltk.decorators", "pandas.core.common",
)  # fmt: skip


class PoolConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How many scripts run at once and what each run may use. The defaults and bounds here are
    the ones the service's environment variables take (``consumer.config`` reads them from this
    class, so they are written once)."""

    workers: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 2
    """Scripts running at once."""
    warm_children: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 2
    """Children kept forked and waiting for a script."""
    memory_mb: Annotated[int, msgspec.Meta(ge=16, le=1024 * 1024)] = 512
    """Memory a run may add on top of the warm parent's own."""
    stdout_limit: Annotated[int, msgspec.Meta(ge=0, le=64 * 1024 * 1024)] = 65536
    """Characters of printed output kept; the rest is cut and the cut marked."""
    result_limit: Annotated[int, msgspec.Meta(ge=1024)] = 900_000
    """Bytes the JSON-encoded result may take."""
    allowed_modules: tuple[str, ...] = DEFAULT_ALLOWED_MODULES
    """Top-level modules a script may import."""
    kill_grace: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    """Seconds between the soft stop at a timeout and SIGKILL."""
    python: str = ""
    """Interpreter for the warm parent; empty means the running one."""
    preload: bool = True
    """Import every allowed module in the warm parent before forking (off: import on use)."""
    tiers: tuple[Literal["stdlib", "full"], ...] = ("stdlib", "full")
    """Warm parents kept: ``stdlib`` imports only the standard-library modules allowed, ``full``
    every allowed module; each run goes to the smallest whose preload covers its imports."""
    huge_pages: bool = True
    """Back the warm parents' memory with huge pages where the kernel allows (cheaper forks)."""
    mode: Literal["warm", "fresh"] = "warm"
    """``fresh`` starts a new interpreter (imports included) for every run: a benchmark baseline."""
    disabled_layers: tuple[str, ...] = ()
    """Isolation layers switched off: for tests of one layer on its own and for diagnosis."""
    run_as_user: str = "nobody"
    """The user runs switch to when the service runs as root."""
    scratch_dir: str = ""
    """Where the runs' scratch folders are made; empty means the system temporary folder."""
    scratch_limit_mb: Annotated[int, msgspec.Meta(ge=1, le=1024 * 1024)] = 64
    """What a run's scratch folder may hold in all, in MB (and so the largest file)."""
    scratch_files: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000
    """How many files and folders a run's scratch folder may hold."""
    out_files: Annotated[int, msgspec.Meta(ge=0)] = 100
    """How many files a run may leave in ``out/`` (more ends the run ``output_limit``)."""
    out_files_mb: Annotated[int, msgspec.Meta(ge=1, le=1024 * 1024)] = 256
    """What the files in ``out/`` may hold in all, in MB."""
    network: Literal["on", "off"] = "on"
    """Whether runs may use the network at all."""
    net_ports: tuple[int, ...] = (80, 443)
    """TCP ports runs may connect to on public addresses."""
    net_allow: tuple[str, ...] = ()
    """Destinations allowed even when private, loopback or local: CIDRs, hosts, host:port."""
    read_paths: tuple[str, ...] = ()
    """Extra files and folders runs may read (data a library needs)."""
    passthrough_env: tuple[str, ...] = (
        "LANG", "LC_ALL", "TZ", "PYTHONPATH", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
        "NLTK_DATA", "SSL_CERT_FILE", "SSL_CERT_DIR",
    )  # fmt: skip
    """Environment variables the warm parent keeps; every other one is dropped."""
