"""The attack suite: every route out of the sandbox we know of, each tried against a real replica.

Each payload is a whole script sent over NATS. For every one the test checks the outcome code the
contract asks for and that nothing happened outside the run: no canary file written next to the
secret, no byte of the secret file in the reply, no connection on the test's TCP listener, no
process left behind (the replica's warm parent is back to its steady number of children, none of
them has a child, nothing is left in the session of the child that ran the script, and no new
process of the sandbox user runs anything but the warm parent's code), and the replica still
answers an ordinary request.

Routes that the sandbox lets through are kept, marked ``xfail(strict=True)`` with the reason:
they are findings, not tests to weaken.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

from consumer.protocol import Reply
from sandbox.config import FORBIDDEN_SUBMODULES
from tests.conftest import (
    OLD_SECRET,
    SECRET,
    Caller,
    NatsServer,
    RawReply,
    ReplicaProcess,
    start_replica,
)

ZYGOTE_MARK = "sandbox.zygote"
SETTLE_SECONDS = 20.0
TIERS = 2  # warm parents of a replica on the default EXECUTOR_TIERS (stdlib and full)
METADATA = "http://169.254.169.254/latest/meta-data/"


def _xfail(reason: str) -> pytest.MarkDecorator:
    """A route the sandbox still lets through: kept as a strict xfail with the reason."""
    return pytest.mark.xfail(strict=True, reason=reason)


# -- payloads -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """A script and the outcome codes it may end with (the first is what the contract asks)."""

    source: str
    codes: tuple[str, ...] = ("policy_violation",)
    mentions: tuple[str, ...] = ()
    """At least one of these appears in a policy_violation's message (when given)."""
    kind: str = ""
    """The exception type a script_error must name (when given)."""


def attack(
    name: str,
    source: str,
    *codes: str,
    mentions: tuple[str, ...] = (),
    kind: str = "",
    xfail: str | None = None,
) -> Any:
    """One parametrized payload: ``source`` is dedented; ``codes`` default to policy_violation."""
    payload = Payload(dedent(source).lstrip("\n"), codes or ("policy_violation",), mentions, kind)
    marks = [_xfail(xfail)] if xfail else []
    return pytest.param(payload, id=name, marks=marks)


def body(name: str, statements: str, *codes: str, **options: Any) -> Any:
    """A payload whose ``execute(ctx)`` body is ``statements`` (a module header may precede)."""
    header, _, rest = dedent(statements).strip("\n").rpartition("\n---\n")
    indented = "\n".join("    " + line if line else line for line in rest.splitlines())
    return attack(name, f"{dedent(header)}\ndef execute(ctx):\n{indented}\n", *codes, **options)


IMPORTS = [
    body("import-socket", "import socket\nreturn 1", mentions=("'socket'",)),
    body("import-ctypes", "import ctypes\nreturn 1", mentions=("'ctypes'",)),
    body("import-importlib", "import importlib\nreturn 1", mentions=("'importlib'",)),
    body("import-importlib-util", "import importlib.util\nreturn 1", mentions=("importlib",)),
    body("import-pickle", "import pickle\nreturn 1", mentions=("'pickle'",)),
    body("import-marshal", "import marshal\nreturn 1", mentions=("'marshal'",)),
    body("import-builtins", "import builtins\nreturn 1", mentions=("builtins",)),
    body("import-gc", "import gc\nreturn 1", mentions=("'gc'",)),
    body("import-inspect", "import inspect\nreturn 1", mentions=("'inspect'",)),
    body("import-threading", "import threading\nreturn 1", mentions=("'threading'",)),
    body("import-multiprocessing", "import multiprocessing\nreturn 1", mentions=("multipro",)),
    body("import-signal", "import signal\nreturn 1", mentions=("'signal'",)),
    body("import-shelve", "import shelve\nreturn 1", mentions=("'shelve'",)),
    body("import-posix", "import posix\nreturn 1", mentions=("'posix'",)),
    body("import-private-thread", "import _thread\nreturn 1"),
    body("import-sandbox-itself", "import sandbox.doors\nreturn 1", mentions=("sandbox",)),
    body("import-second-in-list", "import json, subprocess\nreturn 1", mentions=("subprocess",)),
    body("from-subprocess-import", "from subprocess import Popen\nreturn 1"),
    body("from-importlib-import", "from importlib import import_module\nreturn 1"),
    body("from-json-import-star", "from json import *\nreturn 1", mentions=("*",)),
    body("relative-import", "from . import json\nreturn 1", mentions=("relative",)),
    body("relative-import-parent", "from .. import sandbox\nreturn 1", mentions=("relative",)),
    body(
        "import-module-via-openai",
        "from openai.lib._client_auth import import_module\n---\nreturn 1",
        mentions=("importlib", "openai.lib._client_auth"),
    ),
    body(
        "import-module-via-openai-attribute",
        "import openai.lib._client_auth as auth\n---\nreturn str(auth.import_module('os'))",
        mentions=("importlib", "openai.lib._client_auth"),
    ),
    body(
        "importlib-via-sqlglot",
        "import sqlglot\n---\nreturn str(sqlglot.dialects.importlib.import_module('os'))",
        mentions=("importlib",),
    ),
    body("dunder-import-getattr", "return getattr(len, '__self__').__import__('os')"),
]

LIBRARY_ATTRIBUTES = [
    body(
        "pandas-compat-sys",
        "import pandas as pd\n---\nreturn str(pd.compat.sys)",
        mentions=("'sys'",),
    ),
    body(
        "pandas-errors-ctypes",
        "import pandas as pd\n---\nreturn str(pd.errors.ctypes)",
        mentions=("ctypes",),
    ),
    body(
        "numpy-ctypeslib-ctypes",
        "import numpy as np\n---\nreturn str(np.ctypeslib.ctypes)",
        mentions=("ctypes",),
    ),
    body(
        "openpyxl-xml-os", "import openpyxl\n---\nreturn str(openpyxl.xml.os)", mentions=("'os'",)
    ),
    body(
        "openpyxl-compat-inspect",
        "import openpyxl\n---\nreturn str(openpyxl.compat.inspect)",
        mentions=("inspect",),
    ),
    body(
        "sqlglot-helper-inspect",
        "import sqlglot\n---\nreturn str(sqlglot.helper.inspect)",
        mentions=("inspect",),
    ),
    body(
        "sqlglot-expressions-sys",
        "import sqlglot\n---\nreturn str(sqlglot.expressions.sys)",
        mentions=("'sys'",),
    ),
    body(
        "sqlglot-optimizer-threading",
        "import sqlglot\n---\nreturn str(sqlglot.optimizer.threading)",
        mentions=("threading",),
    ),
    body(
        "nltk-subprocess", "import nltk\n---\nreturn str(nltk.subprocess)", mentions=("subprocess",)
    ),
    body("nltk-importlib", "import nltk\n---\nreturn str(nltk.importlib)", mentions=("importlib",)),
    body(
        "nltk-pathsec-socket",
        "import nltk\n---\nreturn str(nltk.pathsec.socket)",
        mentions=("socket",),
    ),
    body("nltk-data-pickle", "from nltk.data import pickle\n---\nreturn 1", mentions=("pickle",)),
    body(
        "nltk-picklesec-pickle",
        "import nltk\n---\nreturn str(nltk.picklesec.pickle)",
        mentions=("pickle",),
    ),
    body(
        "requests-utils-socket",
        "import requests\n---\nreturn str(requests.utils.socket)",
        mentions=("socket",),
    ),
    body(
        "requests-adapters-os",
        "import requests\n---\nreturn str(requests.adapters.os)",
        mentions=("'os'",),
    ),
    body(
        "requests-compat-importlib",
        "import requests\n---\nreturn str(requests.compat.importlib)",
        mentions=("importlib",),
    ),
    body(
        "requests-auth-threading",
        "import requests\n---\nreturn str(requests.auth.threading)",
        mentions=("threading",),
    ),
    body("openai-private-os", "import openai\n---\nreturn str(openai._os)"),
    body("openai-private-os-getattr", "import openai\n---\nreturn str(getattr(openai, '_os'))"),
    body(
        "rapidfuzz-fuzz-os",
        "import rapidfuzz.fuzz\n---\nreturn str(rapidfuzz.fuzz.os)",
        mentions=("'os'",),
    ),
    body(
        "rapidfuzz-process-os",
        "from rapidfuzz.process import os\n---\nreturn 1",
        mentions=("'os'",),
    ),
    body(
        "pymorphy3-utils-os",
        "import pymorphy3\n---\nreturn str(pymorphy3.utils.os)",
        mentions=("'os'",),
    ),
    body(
        "pymorphy3-analyzer-threading",
        "import pymorphy3\n---\nreturn str(pymorphy3.analyzer.threading)",
        mentions=("threading",),
    ),
    body(
        "json-loader-reads-files",
        "import json\n---\nreturn getattr(json, '__loader__').get_data('/etc/passwd')",
    ),
    body("re-copyreg", "import re\n---\nreturn str(re.copyreg)", mentions=("copyreg",)),
    body("datetime-sys", "import datetime\n---\nreturn str(datetime.sys)", mentions=("'sys'",)),
    body("collections-private-sys", "import collections\n---\nreturn str(collections._sys)"),
    body(
        "functools-rlock-thread",
        "import functools\n---\nreturn str(functools.RLock())",
        mentions=("_thread",),
    ),
    body("random-private-os", "import random\n---\nreturn str(getattr(random, '_os'))"),
    body("csv-module-builtins", "import csv\n---\nreturn str(getattr(csv, '__builtins__'))"),
    body("io-open", "import io\n---\nreturn str(io.open)", mentions=("io.open",)),
    body("io-open-code", "import io\n---\nreturn str(io.open_code)", mentions=("open_code",)),
    body("typing-sys", "import typing\n---\nreturn str(typing.sys.modules)", mentions=("'sys'",)),
    body("enum-bltns", "import enum\n---\nreturn str(enum.bltns)", mentions=("builtins",)),
    body(
        "dataclasses-builtins",
        "import dataclasses\n---\nreturn str(dataclasses.builtins)",
        mentions=("builtins",),
    ),
    body(
        "dataclasses-inspect",
        "import dataclasses\n---\nreturn str(dataclasses.inspect)",
        mentions=("inspect",),
    ),
    body("uuid-os", "import uuid\n---\nreturn str(uuid.os.environ)", mentions=("'os'",)),
    body(
        "statistics-sys", "import statistics\n---\nreturn str(statistics.sys)", mentions=("'sys'",)
    ),
    body(
        "pandas-io-common-os-environ",
        "import pandas as pd\n---\nreturn dict(pd.io.common.os.environ)",
        mentions=("'os'",),
    ),
    body(
        "pandas-eval-frame-globals",
        "import pandas as pd\n---\nreturn str(pd.eval('os', engine='python'))",
        "policy_violation",
        "script_error",
        kind="UndefinedVariableError",  # the expression sees the frame's columns only
    ),
    body(
        "pandas-eval-sys-modules",
        "import pandas as pd\n---\nreturn sorted(pd.eval('sys.modules', engine='python'))[:3]",
        "policy_violation",
        "script_error",
        kind="UndefinedVariableError",
    ),
    body(
        "nltk-senna-environ",
        "import nltk\n---\nreturn sorted(nltk.classify.senna.environ)",
    ),
    body(
        "numpy-ctypeslib-load-library",
        """
        import numpy as np
        ---
        libc = np.ctypeslib.load_library(ctx["libc_name"], ctx["libc_dir"])
        return libc.getpid()
        """,
    ),
]

BUILTINS = [
    body("function-globals-attribute", "return str(execute.__globals__)"),
    body("function-globals-getattr", "return str(getattr(execute, '__globals__'))"),
    body("function-globals-dunder-builtins", "return execute.__globals__['__builtins__']"),
    body("builtins-name", "return str(__builtins__)"),
    body("globals-get", "return str(globals().get('_getattr_'))", mentions=("globals",)),
    body("vars-of-module", "import json\n---\nreturn str(vars(json))", mentions=("vars",)),
    body("builtin-self-is-builtins", "return str(getattr(len, '__self__'))"),
    body("print-self-is-builtins", "return str(getattr(print, '__self__'))"),
    body("dir-then-getattr", "return [str(getattr(execute, n)) for n in dir(execute)]"),
    body("hook-name-getattr", "return str(_getattr_)"),
    body("help", "help()\nreturn 1", mentions=("help",)),
    body("breakpoint", "breakpoint()\nreturn 1", mentions=("breakpoint",)),
    body("input", "return input()", mentions=("input",)),
    body(
        "setattr-on-module",
        "import json\n---\nsetattr(json, 'dumps', len)\nreturn 1",
        mentions=("json",),
    ),
    body("delattr", "import json\n---\ndelattr(json, 'dumps')\nreturn 1", mentions=("delattr",)),
]

SUBCLASSES = [
    body("getattr-chain-bases", "return str(getattr(getattr((), '__class__'), '__bases__'))"),
    body("mro-then-subclasses", "return str(type(()).mro()[-1].__subclasses__())"),
    body(
        "mro-then-getattr-subclasses", "return str(getattr(type(1).mro()[-1], '__subclasses__')())"
    ),
    body(
        "map-getattr-subclasses",
        "return str(list(map(getattr, [type(1).mro()[-1]], ['__subclasses__'])))",
    ),
    body(
        "type-of-type-subclasses",
        "t = type(type(1))\nreturn str(getattr(t, '__subclasses__')(object))",
    ),
    body("object-subclasses", "return str(object.__subclasses__())"),
    body("base-attribute", "return str(getattr(int, '__base__'))"),
    body("class-dict", "return str(getattr(type(1), '__dict__'))"),
]

FORMAT_STRINGS = [
    body(
        "str-format-unbound", "return str.format('{0.__class__.__mro__}', 1)", mentions=("format",)
    ),
    body(
        "str-format-getattr", "return getattr('{0.__class__}', 'format')(1)", mentions=("format",)
    ),
    body(
        "str-format-map-unbound",
        "return str.format_map('{x.__class__}', {'x': 1})",
        mentions=("format_map",),
    ),
    body(
        "map-str-format",
        "return list(map(str.format, ['{0.__class__}'], [1]))",
        mentions=("format",),
    ),
    body(
        "str-subclass-format",
        "class S(str):\n    pass\n---\nreturn S('{0.__class__}').format(1)",
        mentions=("format",),
    ),
    body(
        "userstring-format-map",
        "import collections\n---\nreturn collections.UserString('{0.__class__}').format_map({})",
        mentions=("format_map",),
    ),
    body(
        "string-formatter",
        "import string\n---\nreturn string.Formatter().format('{0.__class__}', 1)",
        mentions=("Formatter",),
    ),
    body(
        "string-formatter-vformat",
        "import string\n---\nreturn string.Formatter().vformat('{0.__class__}', (1,), {})",
        mentions=("Formatter",),
    ),
    body(
        "operator-methodcaller-format",
        "import operator\n---\nreturn operator.methodcaller('format', 1)('{0.__class__}')",
        mentions=("methodcaller",),
    ),
    body("fstring-attribute-walk", "return f'{execute.__globals__}'"),
    body(
        "string-template-is-harmless",
        "import string\n---\nreturn string.Template('$who').substitute(who='${x.__class__}')",
        "ok",
    ),
    body(
        "format-spec-is-no-walk",
        "return format(1, '{0.__class__}')",
        "script_error",
        kind="ValueError",
    ),
    body("percent-format-is-no-walk", "return '%(a)s' % {'a': 1}", "ok"),
]

FRAMES = [
    body("generator-gi-code", "g = (i for i in range(3))\nreturn str(g.gi_code)"),
    body(
        "generator-gi-code-getattr", "g = (i for i in range(3))\nreturn str(getattr(g, 'gi_code'))"
    ),
    body(
        "generator-gi-frame-while-suspended",
        "def gen():\n    yield 1\n---\ng = gen()\nnext(g)\nreturn str(getattr(g, 'gi_frame'))",
    ),
    body(
        "generator-yieldfrom",
        "def inner():\n    yield 1\ndef outer():\n    yield from inner()\n---\n"
        "g = outer()\nnext(g)\nreturn str(getattr(g, 'gi_yieldfrom'))",
    ),
    attack(
        "coroutine-cr-frame",
        """
        async def coro():
            return 1

        def execute(ctx):
            c = coro()
            return str(c.cr_frame)
        """,
    ),
    body(
        "traceback-dunder",
        "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    return str(e.__traceback__)",
    ),
    body(
        "traceback-getattr",
        "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
        "    return str(getattr(e, '__traceback__'))",
    ),
    body(
        "traceback-sys-exc-info",
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    import sys\n"
        "    return str(sys.exc_info())",
    ),
    body(
        "traceback-through-exit",
        """
        box = []
        klass = type(type(1))(
            "C", (object,), {"__enter__": lambda self: self,
                             "__exit__": lambda self, *a: box.extend(a) or True}
        )
        with klass():
            1 / 0
        return str(getattr(getattr(box[2], "tb_frame"), "f_globals"))
        """,
    ),
    body(
        "traceback-through-exit-tb-next",
        """
        box = []
        klass = type(type(1))(
            "C", (object,), {"__enter__": lambda self: self,
                             "__exit__": lambda self, *a: box.extend(a) or True}
        )
        with klass():
            1 / 0
        return str(getattr(box[2], "tb_next"))
        """,
    ),
    body(
        "pandas-scope-frame-walk",
        """
        import pandas as pd
        ---
        scope = pd.core.computation.scope.Scope(1).scope
        return str(scope.get("sys").modules.get("os"))
        """,
    ),
]

FILE_READS = [
    body(
        "pandas-read-csv",
        "import pandas as pd\n---\nreturn pd.read_csv(ctx['secret']).to_dict()",
        mentions=("read_csv",),
    ),
    body(
        "pandas-read-json",
        "import pandas as pd\n---\nreturn pd.read_json(ctx['secret']).to_dict()",
        mentions=("read_json",),
    ),
    body(
        "pandas-read-excel",
        "import pandas as pd\n---\nreturn pd.read_excel(ctx['secret']).to_dict()",
        mentions=("read_excel",),
    ),
    body(
        "pandas-read-table",
        "import pandas as pd\n---\nreturn pd.read_table(ctx['secret']).to_dict()",
        mentions=("read_table",),
    ),
    body(
        "pandas-read-fwf",
        "import pandas as pd\n---\nreturn pd.read_fwf(ctx['secret']).to_dict()",
        mentions=("read_fwf",),
    ),
    body(
        "pandas-excel-file",
        "import pandas as pd\n---\nreturn str(pd.ExcelFile(ctx['secret']))",
        mentions=("ExcelFile",),
    ),
    body(
        "pandas-read-json-etc-passwd",
        "import pandas as pd\n---\nreturn pd.read_json('/etc/passwd', lines=True).to_dict()",
        mentions=("read_json",),
    ),
    body(
        "pandas-read-csv-bytes-path",
        "import pandas as pd\n---\nreturn pd.read_csv(ctx['secret'].encode()).to_dict()",
        mentions=("read_csv",),
    ),
    body(
        "pandas-read-csv-keyword",
        "import pandas as pd\n---\nreturn pd.read_csv(filepath_or_buffer=ctx['secret']).to_dict()",
        mentions=("read_csv",),
    ),
    body(
        "pandas-read-csv-dotdot",
        "import pandas as pd\n---\nreturn pd.read_csv('../' * 12 + ctx['secret']).to_dict()",
        mentions=("read_csv",),
    ),
    body(
        "pandas-read-csv-file-url",
        "import pandas as pd\n---\nreturn pd.read_csv('file://' + ctx['secret']).to_dict()",
        mentions=("file: URL",),
    ),
    body(
        "pandas-read-csv-file-url-upper-secret",
        "import pandas as pd\n---\nreturn pd.read_csv('FILE://' + ctx['secret']).to_dict()",
        "policy_violation",
        "script_error",
        kind="URLError",
    ),
    body(
        "numpy-load",
        "import numpy as np\n---\nreturn str(np.load(ctx['secret']))",
        mentions=("load",),
    ),
    body(
        "numpy-loadtxt",
        "import numpy as np\n---\nreturn str(np.loadtxt(ctx['secret'], dtype=str))",
        mentions=("loadtxt",),
    ),
    body(
        "numpy-loadtxt-etc-passwd",
        "import numpy as np\n---\n"
        "return np.loadtxt('/etc/passwd', dtype=str, delimiter=':').tolist()",
        mentions=("loadtxt",),
    ),
    body(
        "numpy-genfromtxt",
        "import numpy as np\n---\nreturn str(np.genfromtxt(ctx['secret'], dtype=str))",
        mentions=("genfromtxt",),
    ),
    body(
        "numpy-fromfile",
        "import numpy as np\n---\nreturn np.fromfile(ctx['secret'], dtype='u1').tolist()",
        mentions=("fromfile",),
    ),
    body(
        "openpyxl-load-workbook",
        "import openpyxl\n---\nreturn str(openpyxl.load_workbook(ctx['secret']))",
        mentions=("load_workbook",),
    ),
    body(
        "io-open-read",
        "import io\n---\nreturn io.open(ctx['secret']).read()",
        mentions=("io.open",),
    ),
    body(
        "io-fileio-read",
        "import io\n---\nreturn io.FileIO(ctx['secret']).read().decode()",
        mentions=("FileIO",),
    ),
    body("open-read", "return open(ctx['secret']).read()", mentions=("open",)),
    body(
        "csv-reader-over-io-open",
        "import csv\nimport io\n---\nreturn list(csv.reader(io.open(ctx['secret'])))",
        mentions=("io.open",),
    ),
    # Not doors: the policy does not know these, the OS layer (Landlock) or nltk itself refuses.
    body(
        "nltk-data-load-file-url",
        "import nltk\n---\nreturn str(nltk.data.load('file:' + ctx['secret'], format='raw'))",
        "policy_violation",
        "script_error",
        kind="PermissionError",
    ),
    body(
        "pandas-text-file-reader-secret",
        "import pandas as pd\n---\n"
        "return pd.io.parsers.TextFileReader(ctx['secret'], header=None).read().to_dict()",
        "policy_violation",
        "script_error",
        kind="PermissionError",
    ),
    body(
        "openpyxl-zipfile-secret",
        "import openpyxl\n---\nreturn str(openpyxl.reader.excel.ZipFile(ctx['secret']).namelist())",
        "policy_violation",
        "script_error",
        kind="PermissionError",
    ),
    body(
        "pandas-text-file-reader-proc-environ",
        "import pandas as pd\n---\nreader = pd.io.parsers.TextFileReader("
        "'/proc/self/environ', sep='\\x01', header=None)\nreturn reader.read().to_string()",
    ),
    body(
        "pandas-read-csv-upper-file-url-proc-environ",
        "import pandas as pd\n---\n"
        "return pd.read_csv('FILE:///proc/self/environ', sep='\\x01', header=None).to_string()",
    ),
]

_FRAME = "import pandas as pd\nimport numpy as np\nimport openpyxl\nimport io\n---\n"
_DF = "df = pd.DataFrame({'a': [1, 2]})\n"
FILE_WRITES = [
    body(
        "pandas-to-excel",
        _FRAME + _DF + "df.to_excel(ctx['canary'])\nreturn 1",
        mentions=("to_excel",),
    ),
    body(
        "pandas-to-json",
        _FRAME + _DF + "df.to_json(ctx['canary'])\nreturn 1",
        mentions=("to_json",),
    ),
    body(
        "pandas-to-csv-keyword",
        _FRAME + _DF + "df.to_csv(path_or_buf=ctx['canary'])\nreturn 1",
        mentions=("to_csv",),
    ),
    body(
        "pandas-to-csv-unbound",
        _FRAME + _DF + "pd.DataFrame.to_csv(df, ctx['canary'])\nreturn 1",
        mentions=("to_csv",),
    ),
    body(
        "pandas-series-to-csv",
        _FRAME + "pd.Series([1]).to_csv(ctx['canary'])\nreturn 1",
        mentions=("to_csv",),
    ),
    body(
        "pandas-to-html",
        _FRAME + _DF + "df.to_html(ctx['canary'])\nreturn 1",
        mentions=("to_html",),
    ),
    body(
        "pandas-to-string",
        _FRAME + _DF + "df.to_string(ctx['canary'])\nreturn 1",
        mentions=("to_string",),
    ),
    body(
        "pandas-to-pickle",
        _FRAME + _DF + "df.to_pickle(ctx['canary'])\nreturn 1",
        mentions=("to_pickle",),
    ),
    body(
        "pandas-excel-writer",
        _FRAME + _DF + "with pd.ExcelWriter(ctx['canary']) as w:\n    df.to_excel(w)\nreturn 1",
        mentions=("ExcelWriter",),
    ),
    body(
        "pandas-to-csv-dotdot",
        _FRAME + _DF + "df.to_csv('../' * 12 + ctx['canary'])\nreturn 1",
        mentions=("to_csv",),
    ),
    body(
        "numpy-save", _FRAME + "np.save(ctx['canary'], np.arange(3))\nreturn 1", mentions=("save",)
    ),
    body(
        "numpy-savetxt",
        _FRAME + "np.savetxt(ctx['canary'], np.arange(3))\nreturn 1",
        mentions=("savetxt",),
    ),
    body(
        "numpy-savez",
        _FRAME + "np.savez(ctx['canary'], a=np.arange(3))\nreturn 1",
        mentions=("savez",),
    ),
    body(
        "numpy-tofile",
        _FRAME + "np.arange(3).tofile(ctx['canary'])\nreturn 1",
        mentions=("tofile",),
    ),
    body("numpy-dump", _FRAME + "np.arange(3).dump(ctx['canary'])\nreturn 1", mentions=("dump",)),
    body(
        "openpyxl-workbook-save",
        _FRAME + "openpyxl.Workbook().save(ctx['canary'])\nreturn 1",
        mentions=("save",),
    ),
    body(
        "openpyxl-save-workbook",
        _FRAME
        + "openpyxl.writer.excel.save_workbook(openpyxl.Workbook(), ctx['canary'])\nreturn 1",
        mentions=("save_workbook",),
    ),
    body(
        "io-open-write",
        _FRAME + "io.open(ctx['canary'], 'w').write('x')\nreturn 1",
        mentions=("io.open",),
    ),
    body("open-write", "open(ctx['canary'], 'w').write('x')\nreturn 1", mentions=("open",)),
    # Not a door: Landlock refuses the write.
    body(
        "pandas-excel-formatter",
        "import pandas as pd\nimport pandas.io.formats.excel as excel\n---\n"
        "excel.ExcelFormatter(pd.DataFrame({'a': [1]})).write(ctx['canary'] + '.xlsx')\nreturn 1",
        "policy_violation",
        "script_error",
        kind="PermissionError",
    ),
]

IN_MEMORY_AND_SCRATCH = [
    body(
        "pandas-csv-stringio",
        "import io\nimport pandas as pd\n---\nbuf = io.StringIO()\n"
        "pd.DataFrame({'a': [1, 2]}).to_csv(buf, index=False)\nbuf.seek(0)\n"
        "return pd.read_csv(buf)['a'].tolist()",
        "ok",
    ),
    body(
        "pandas-excel-bytesio",
        "import io\nimport pandas as pd\n---\nbuf = io.BytesIO()\n"
        "pd.DataFrame({'a': [1, 2]}).to_excel(buf, index=False)\nbuf.seek(0)\n"
        "return pd.read_excel(buf)['a'].tolist()",
        "ok",
    ),
    body(
        "pandas-json-stringio",
        "import io\nimport pandas as pd\n---\n"
        "return pd.read_json(io.StringIO('[{\"a\": 1}, {\"a\": 2}]'))['a'].tolist()",
        "ok",
    ),
    body(
        "numpy-savez-bytesio",
        "import io\nimport numpy as np\n---\nbuf = io.BytesIO()\nnp.savez(buf, a=np.arange(3))\n"
        "buf.seek(0)\nreturn np.load(buf)['a'].tolist()",
        "ok",
    ),
    body(
        "numpy-loadtxt-stringio",
        "import io\nimport numpy as np\n---\nreturn np.loadtxt(io.StringIO('1 2\\n3 4')).tolist()",
        "ok",
    ),
    body(
        "scratch-pandas-csv",
        "import pandas as pd\n---\npd.DataFrame({'a': [1, 2]}).to_csv('out.csv', index=False)\n"
        "return pd.read_csv('out.csv')['a'].tolist()",
        "ok",
    ),
    body(
        "scratch-pandas-excel",
        "import pandas as pd\n---\npd.DataFrame({'a': [1, 2]}).to_excel('out.xlsx', index=False)\n"
        "return pd.read_excel('./out.xlsx')['a'].tolist()",
        "ok",
    ),
    body(
        "scratch-numpy-npy",
        "import numpy as np\n---\nnp.save('a.npy', np.arange(3))\nreturn np.load('a.npy').tolist()",
        "ok",
    ),
    body(
        "scratch-numpy-txt",
        "import numpy as np\n---\nnp.savetxt('a.txt', np.arange(3))\n"
        "return np.loadtxt('a.txt').tolist()",
        "ok",
    ),
    body(
        "scratch-openpyxl",
        "import openpyxl\n---\nwb = openpyxl.Workbook()\nwb.active['A1'] = 7\nwb.save('w.xlsx')\n"
        "return openpyxl.load_workbook('w.xlsx').active['A1'].value",
        "ok",
    ),
]

PICKLE_AND_EVAL = [
    body(
        "numpy-load-allow-pickle-positional",
        "import io\nimport numpy as np\n---\n"
        "return str(np.load(io.BytesIO(b'cos\\ngetpid\\n(tR.'), None, True))",
        mentions=("pickle",),
    ),
    body(
        "pandas-read-pickle",
        "import io\nimport pandas as pd\n---\n"
        "return str(pd.read_pickle(io.BytesIO(b'cos\\ngetpid\\n(tR.')))",
        mentions=("read_pickle",),
    ),
    body(
        "pandas-io-pickle-read-pickle",
        "import io\nimport pandas as pd\n---\n"
        "return str(pd.io.pickle.read_pickle(io.BytesIO(b'cos\\ngetpid\\n(tR.')))",
        mentions=("pickle",),
    ),
    body(
        "copy-dispatch-table-pickle-hook",
        "import copy\n---\nreturn str(copy.dispatch_table.get(complex)(1j))",
        "policy_violation",
        "ok",
    ),
    body(
        "typing-forwardref",
        "import typing\n---\nreturn str(typing.ForwardRef('int'))",
        mentions=("ForwardRef",),
    ),
    body(
        "typing-get-type-hints-on-class",
        "import typing\nclass C:\n    x: 'int'\n---\nreturn str(typing.get_type_hints(C))",
        mentions=("get_type_hints",),
    ),
    body(
        "pandas-query-private-name",
        "import pandas as pd\n---\nreturn str(pd.DataFrame({'a': [1]}).query('a.__class__ == 1'))",
        mentions=("query",),
    ),
    body(
        "pandas-eval-local-dict",
        "import pandas as pd\n---\nreturn str(pd.eval('x', local_dict={'x': 1}))",
        mentions=("local_dict",),
    ),
    body(
        "pandas-pickle-compat-unpickler",
        "import io\nimport pandas as pd\n---\n"
        "unpickler = pd.compat.pickle_compat.Unpickler(io.BytesIO(b'cos\\ngetpid\\n(tR.'))\n"
        "return unpickler.load()",
    ),
    body(
        "pandas-pickle-compat-loads",
        "import pandas as pd\n---\nreturn pd.compat.pickle_compat.loads(b'cos\\ngetpid\\n(tR.')",
    ),
    body(
        "openai-model-string-annotation",
        """
        import openai
        ---
        import pandas as pd
        leak = []
        class Model(openai.BaseModel):
            x: "leak.append(sorted(pd.io.common.os.environ)) or int"
        Model(x=1)
        return leak
        """,
    ),
    body(
        "singledispatch-string-annotation",
        """
        import functools
        import pandas as pd
        leak = []
        @functools.singledispatch
        def show(x):
            return 0
        def show_int(x: "leak.append(sorted(pd.io.common.os.environ)) or int"):
            return 1
        ---
        show.register(show_int)
        return leak
        """,
    ),
]

PROCESSES = [
    body(
        "os-system-via-pandas",
        "import pandas as pd\n---\nreturn pd.io.common.os.system('true')",
        mentions=("'os'",),
    ),
    body(
        "os-popen-via-requests",
        "import requests\n---\nreturn requests.utils.os.popen('id').read()",
        mentions=("'os'",),
    ),
    body(
        "subprocess-via-nltk",
        "import nltk\n---\nreturn str(nltk.internals.subprocess.run(['true']))",
        mentions=("subprocess",),
    ),
    body(
        "posix-fork-via-sys-modules",
        "import typing\n---\nreturn typing.sys.modules['posix'].fork()",
        mentions=("'sys'",),
    ),
    body(
        "multiprocessing-via-import",
        "import multiprocessing\n---\nreturn multiprocessing.Process(target=len).start()",
        mentions=("multiprocessing",),
    ),
    # Library code that starts a process by itself: seccomp refuses the fork (EPERM).
    body(
        "nltk-java-launcher",
        "import nltk\n---\nreturn str(nltk.internals.java(['Main']))",
        "policy_violation",
        "script_error",
        kind="PermissionError",
    ),
    body(
        "pandas-clipboard-xclip",
        "import pandas.io.clipboard as clipboard\n---\n"
        "copy, paste = clipboard.init_xclip_clipboard()\nreturn paste()",
        "policy_violation",
        "script_error",
        kind="PermissionError",
    ),
    body(
        "os-fork-via-pandas-eval",
        "import pandas as pd\n---\nreturn pd.eval('os.fork()', engine='python')",
        "policy_violation",
        "script_error",
        kind="UndefinedVariableError",
    ),
    body(
        "os-system-via-openai-annotation",
        """
        import openai
        ---
        import pandas as pd
        leak = []
        class Model(openai.BaseModel):
            x: "leak.append(pd.io.common.os.system('true')) or int"
        Model(x=1)
        return leak
        """,
    ),
]

# Loopback and private destinations on ports the default configuration allows (80, 443):
# refused in Python before any connect, and named by their range.
ADDRESS_RULES = [
    ("http://127.0.0.1/", ("own host", "loopback")),
    ("https://127.0.0.1/", ("own host", "loopback")),
    ("http://localhost/", ("own host", "loopback")),
    ("http://127.1/", ("own host", "loopback")),
    ("http://2130706433/", ("own host", "loopback")),
    ("http://[::1]/", ("own host", "loopback")),
    ("http://[::ffff:127.0.0.1]/", ("own host", "loopback")),
    ("http://0.0.0.0/", ("private", "unspecified")),
    (METADATA, ("link-local",)),
    ("http://[fe80::1]/", ("link-local",)),
    ("http://10.0.0.1/", ("private",)),
    ("http://192.168.1.1/", ("private",)),
    ("http://172.16.0.1/", ("private",)),
    ("http://[fc00::1]/", ("private",)),
    ("http://100.64.0.1/", ("shared",)),
]

TEST_LISTENER = [
    body("requests-get", "import requests\n---\nreturn requests.get(ctx['url'], timeout=1).text"),
    body(
        "requests-post",
        "import requests\n---\nreturn requests.post(ctx['url'], data='x', timeout=1).text",
    ),
    body(
        "requests-session",
        "import requests\n---\nreturn requests.Session().get(ctx['url'], timeout=1).text",
    ),
    body(
        "requests-localhost-name",
        "import requests\n---\n"
        "return requests.get(f\"http://localhost:{ctx['port']}/\", timeout=1).text",
    ),
    body(
        "requests-ipv4-mapped-ipv6",
        "import requests\n---\n"
        "return requests.get(f\"http://[::ffff:127.0.0.1]:{ctx['port']}/\", timeout=1).text",
    ),
    body(
        "pandas-read-csv-url",
        "import pandas as pd\n---\nreturn pd.read_csv(ctx['url']).to_dict()",
    ),
    body(
        "pandas-read-json-url",
        "import pandas as pd\n---\nreturn pd.read_json(ctx['url']).to_dict()",
    ),
    body(
        "sockets-through-requests-module",
        "import requests\n---\n"
        "return str(requests.adapters.socket.create_connection(('127.0.0.1', ctx['port'])))",
    ),
]

RESOURCES = [
    body("memory-string", "return len('a' * 10 ** 10)", "memory_limit"),
    body("memory-list", "return len([0] * 10 ** 10)", "memory_limit"),
    body(
        "memory-numpy-2d",
        "import numpy as np\n---\nreturn float(np.zeros((10 ** 5, 10 ** 5)).sum())",
        "memory_limit",
    ),
    body(
        "memory-pandas",
        "import numpy as np\nimport pandas as pd\n---\n"
        "return float(pd.DataFrame(np.ones((10 ** 5, 10 ** 4))).sum().sum())",
        "memory_limit",
    ),
    body("stdout-flood-loop", "while True:\n    print('x' * 1000)", "output_limit"),
    body("stdout-flood-one-write", "print('x' * 10 ** 7)\nreturn 1", "output_limit"),
    body("result-huge-string", "return 'x' * 2_000_000", "output_limit"),
    body("result-huge-list", "return list(range(10 ** 6))", "output_limit"),
    body(
        "result-huge-dataframe",
        "import pandas as pd\n---\nreturn pd.DataFrame({'a': ['x' * 100] * 20000})",
        "output_limit",
    ),
    body(
        "result-deeply-nested",
        "x = []\nfor i in range(100000):\n    x = [x]\nreturn x",
        "result_not_serializable",
    ),
    body(
        "recursion",
        "def f(n):\n    return f(n + 1)\n---\nreturn f(0)",
        "script_error",
        kind="RecursionError",
    ),
    body(
        "recursion-mutual",
        "def a(n):\n    return b(n + 1)\ndef b(n):\n    return a(n + 1)\n---\nreturn a(0)",
        "script_error",
        kind="RecursionError",
    ),
    body("str-of-huge-int", "return str(10 ** 5000)", "script_error", kind="ValueError"),
    body("huge-power", "return len(str(10 ** 10 ** 8))", "timeout", "script_error"),
    body(
        "scratch-file-over-limit",
        "import pandas as pd\n---\n"
        "pd.DataFrame({'a': ['x' * 1000] * 100000}).to_csv('big.csv')\nreturn 1",
        "script_error",
        kind="OSError",
    ),
]

TIMEOUTS = [
    body(
        "busy-loop-swallowing-the-soft-stop",
        """
        while True:
            try:
                while True:
                    pass
            except BaseException:
                pass
        """,
    ),
    body("busy-loop-in-c", "return sum(range(10 ** 12))"),
    body("regex-backtracking", "import re\n---\nreturn bool(re.match('(a+)+$', 'a' * 40 + 'b'))"),
    body("sleep", "import time\n---\ntime.sleep(100)"),
    body(
        "busy-loop-in-finally",
        """
        try:
            while True:
                pass
        finally:
            while True:
                pass
        """,
    ),
]


# -- the world outside the run: a secret, a canary, a listener, the process tree ------------------


@dataclass
class Listener:
    """A TCP listener that counts accepted connections and answers each with a tiny HTTP reply.

    ``/redirect`` answers 302 to the cloud metadata address; anything else 200 ``reached``.
    """

    host: str
    port: int = 0
    accepted: int = 0
    sock: socket.socket = field(init=False)
    thread: threading.Thread = field(init=False)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((self.host, self.port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def count(self) -> int:
        with self.lock:
            return self.accepted

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            with conn:
                self._answer(conn)

    @staticmethod
    def _answer(conn: socket.socket) -> None:
        conn.settimeout(2)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            if data.split(b" ", 2)[1:2] == [b"/redirect"]:
                head = f"HTTP/1.1 302 Found\r\nLocation: {METADATA}\r\nContent-Length: 0\r\n"
                conn.sendall(head.encode() + b"Connection: close\r\n\r\n")
            else:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nreached"
                )
        except OSError:
            return

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    session: int
    uid: int
    state: str
    cmdline: str


def process_table() -> dict[int, Proc]:
    """Every process this host shows in /proc (those that vanish while read are skipped)."""
    table: dict[int, Proc] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        base = Path("/proc", name)
        try:
            stat = (base / "stat").read_text()
            status = (base / "status").read_text()
            cmdline = (base / "cmdline").read_bytes()
        except OSError:
            continue
        # After the command name: state, ppid, process group, session, ...
        fields = stat.rsplit(")", 1)[1].split()
        uid_line = next((line for line in status.splitlines() if line.startswith("Uid:")), "")
        if len(fields) < 4 or not uid_line:
            continue
        table[int(name)] = Proc(
            pid=int(name),
            ppid=int(fields[1]),
            session=int(fields[3]),
            uid=int(uid_line.split()[1]),
            state=fields[0],
            cmdline=cmdline.replace(b"\0", b" ").decode(errors="replace"),
        )
    return table


@dataclass
class Tree:
    """The replica's warm parents (one per tier) and their children, as /proc shows them now."""

    warm_parents: list[Proc]
    children: list[Proc]
    grandchildren: list[Proc]

    @property
    def warm_parent(self) -> list[Proc] | None:
        """The warm parents, or None while none (or not every tier's) is there."""
        return self.warm_parents if len(self.warm_parents) == TIERS else None

    def describe(self) -> str:
        rows = [f"warm parent {parent}" for parent in self.warm_parents]
        rows += [f"  child {c}" for c in self.children]
        rows += [f"    grandchild {g}" for g in self.grandchildren]
        return "\n".join(rows)


@dataclass(frozen=True)
class Snapshot:
    """Taken just before an attack is sent."""

    runners: frozenset[int]
    """The warm children waiting now: the attack runs in one of them (each is a session)."""
    strays: frozenset[int]


class Watch:
    """What the process tree of one replica looks like at rest, and checks against it.

    Robust to other test sessions on the same host: it looks at this replica's tree, at the
    sessions of the children that may run the attack, and at processes of the sandbox user
    that run something other than the warm parent's code; zombies (dead, and left unreaped by
    some inits) and processes in the middle of exiting (no command line) are not counted.
    """

    def __init__(self, replica: ReplicaProcess, caller: Caller) -> None:
        self.replica = replica
        self.caller = caller
        self.steady = self._measure_steady()
        tree = self.tree(process_table())
        uids = {child.uid for child in tree.children}
        self.sandbox_uid = uids.pop() if len(uids) == 1 else None

    def tree(self, table: dict[int, Proc]) -> Tree:
        parents = [
            p
            for p in table.values()
            if p.ppid == self.replica.process.pid and ZYGOTE_MARK in p.cmdline
        ]
        warm = {parent.pid for parent in parents}
        children = [p for p in table.values() if p.ppid in warm]
        pids = {c.pid for c in children}
        grandchildren = [p for p in table.values() if p.ppid in pids and p.state != "Z"]
        return Tree(parents, children, grandchildren)

    def _measure_steady(self) -> int:
        assert_still_serving(self.caller)
        counts: list[int] = []
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            tree = self.tree(process_table())
            live = [c for c in tree.children if c.state != "Z"]
            if tree.warm_parent is not None and len(live) == len(tree.children) > 0:
                counts.append(len(live))
                if len(counts) >= 5 and len(set(counts[-5:])) == 1:
                    return counts[-1]
            else:
                counts.clear()
            time.sleep(0.1)
        raise AssertionError("the replica's warm parent never settled")

    def strays(self) -> frozenset[int]:
        """Live processes of the sandbox user running anything but the warm parent's code.

        Only meaningful when runs have a user of their own (the service runs as root).
        """
        if self.sandbox_uid is None or self.sandbox_uid == os.getuid():
            return frozenset()
        return frozenset(
            proc.pid
            for proc in process_table().values()
            if proc.uid == self.sandbox_uid
            and proc.state != "Z"
            and proc.cmdline
            and ZYGOTE_MARK not in proc.cmdline
        )

    def snapshot(self) -> Snapshot:
        children = self.tree(process_table()).children
        return Snapshot(frozenset(c.pid for c in children), self.strays())

    def assert_settled(self, before: Snapshot) -> None:
        """Back to the steady children, none with a child, nothing left of the run's session."""
        deadline = time.monotonic() + SETTLE_SECONDS
        tree = self.tree(process_table())
        while time.monotonic() < deadline:
            tree = self.tree(process_table())
            live = [c for c in tree.children if c.state != "Z"]
            if (
                tree.warm_parent is not None
                and len(live) == len(tree.children) == self.steady
                and not tree.grandchildren
            ):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"process tree did not return to rest:\n{tree.describe()}")
        left = [
            proc
            for proc in process_table().values()
            if proc.state != "Z"
            and proc.pid not in before.runners
            and (proc.session in before.runners or proc.ppid in before.runners)
        ]
        assert not left, f"processes left behind by the run: {left}"
        new = self.strays() - before.strays
        if new:
            time.sleep(0.5)  # only what is still there counts
            new &= self.strays()
        assert not new, f"processes of the sandbox user left behind: {new}"


@dataclass
class Outside:
    """The files a run must not touch: a secret with random content and a canary path."""

    folder: Path
    secret: Path
    secret_text: str
    canary: Path

    def files(self) -> set[str]:
        return {p.name for p in self.folder.iterdir()}


def find_libc() -> Path:
    """The C library this interpreter has mapped (for the numpy.ctypeslib payload)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/libc.so" in path or "/libc-" in path:
            return Path(path)
    return Path("/lib/libc.so.6")


LIBC = find_libc()


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Outside:
    """A folder outside any scratch folder, open to every user, with a secret file in it."""
    folder = tmp_path / "outside"
    folder.mkdir()
    # Only the sandbox's own layers should keep a run out, not file permissions.
    tmp_path.chmod(0o755)
    folder.chmod(0o777)
    text = "secret-" + secrets.token_hex(16)
    secret = folder / "secret.csv"
    secret.write_text(f"a,b\n{text},1\n")
    secret.chmod(0o644)
    return Outside(folder, secret, text, folder / "canary.out")


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    """A listener on 127.0.0.1 that no run may reach (except through EXECUTOR_NET_ALLOW)."""
    server = Listener("127.0.0.1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def side_listener(listener: Listener) -> Iterator[Listener]:
    """A listener on 127.0.0.2 with the same port: allowed by Landlock, refused by the rules."""
    server = Listener("127.0.0.2", listener.port)
    yield server
    server.close()


@pytest.fixture(scope="module")
def watch(replica: ReplicaProcess, caller: Caller) -> Watch:
    """The shared replica's process tree at rest."""
    return Watch(replica, caller)


@dataclass
class Target:
    caller: Caller
    watch: Watch


@pytest.fixture(scope="module")
def allowing(nats_server: NatsServer, listener: Listener) -> Iterator[Target]:
    """A replica with EXECUTOR_NET_ALLOW naming the test listener (127.0.0.1:<port>)."""
    proc = start_replica(
        nats_server.url, "attacks_allow", EXECUTOR_NET_ALLOW=f"127.0.0.1:{listener.port}"
    )
    try:
        target_caller = Caller(nats_server.url, proc.prefix)
        yield Target(target_caller, Watch(proc, target_caller))
    finally:
        proc.stop()


@pytest.fixture
def shared(caller: Caller, watch: Watch) -> Target:
    """The shared replica with its watch."""
    return Target(caller, watch)


# -- running an attack ----------------------------------------------------------------------------


def send(caller: Caller, source: str, ctx: dict[str, Any], timeout: float) -> RawReply:
    """Send one script as it is and return the reply with its raw bytes."""
    data = json.dumps({"code": source, "ctx": ctx, "timeout": timeout}).encode()
    return caller.raw("code", data, timeout=timeout + 15)


def assert_still_serving(caller: Caller) -> None:
    reply = caller.code("def execute(ctx):\n    return ctx['n'] * 2\n", {"n": 21}, timeout=10)
    assert reply.status == "ok", reply.error
    assert reply.result == 42


def context(outside: Outside, listener: Listener, **extra: Any) -> dict[str, Any]:
    return {
        "secret": str(outside.secret),
        "canary": str(outside.canary),
        "url": listener.url,
        "host": listener.host,
        "port": listener.port,
        "libc_dir": str(LIBC.parent),
        "libc_name": LIBC.name,
        **extra,
    }


@dataclass(frozen=True)
class Attempt:
    raw: RawReply
    seconds: float
    """From sending the request to its reply."""

    @property
    def reply(self) -> Reply:
        return self.raw.reply


def run_attack(
    target: Target,
    payload: Payload,
    outside: Outside,
    listener: Listener,
    *,
    watched: tuple[Listener, ...] | None = None,
    timeout: float = 10.0,
    **extra: Any,
) -> Attempt:
    """Run ``payload``; check that nothing happened outside, then that the outcome is right.

    ``listener`` is the one the script is told about; ``watched`` (by default that one) must
    see no connection.
    """
    listeners = (listener,) if watched is None else watched
    files = outside.files()
    connections = [server.count() for server in listeners]
    before = target.watch.snapshot()
    started = time.monotonic()
    raw = send(target.caller, payload.source, context(outside, listener, **extra), timeout)
    attempt = Attempt(raw, time.monotonic() - started)

    assert not outside.canary.exists(), "the run wrote the canary file"
    assert outside.files() == files, "the run created files outside its scratch folder"
    assert outside.secret_text.encode() not in raw.data, "the secret file's content came back"
    assert [server.count() for server in listeners] == connections, "a connection got through"
    assert_still_serving(target.caller)
    target.watch.assert_settled(before)

    reply = raw.reply
    expected = payload.codes
    if "script_error" in expected:
        # A route an OS layer stops may now be refused earlier, by the policy: stronger still.
        expected = (*expected, "policy_violation")
    if reply.status == "ok":
        assert "ok" in expected, f"the run succeeded: {reply.result!r:.500} {reply.stdout!r:.200}"
        return attempt
    assert reply.error is not None, reply
    assert reply.error.code in expected, reply.error
    if payload.mentions and reply.error.code == "policy_violation":
        # The refusal names the target, or a module on the way that is refused as a whole.
        names = (*payload.mentions, *(f"'{module}" for module in FORBIDDEN_SUBMODULES))
        assert any(m in reply.error.message for m in names), reply.error.message
    if payload.kind and reply.error.code == "script_error":
        assert reply.error.type == payload.kind, reply.error
    return attempt


def check(target: Target, payload: Payload, outside: Outside, listener: Listener) -> None:
    run_attack(target, payload, outside, listener)


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", IMPORTS)
def test_import_routes_are_refused(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """Importing a forbidden module, however spelled, ends policy_violation."""
    check(shared, payload, outside, listener)


@pytest.mark.parametrize("payload", LIBRARY_ATTRIBUTES)
def test_forbidden_modules_through_allowed_libraries_are_refused(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """A forbidden module held as an attribute of an allowed library is refused."""
    check(shared, payload, outside, listener)


@pytest.mark.parametrize("payload", BUILTINS)
def test_builtins_and_globals_are_out_of_reach(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """The real builtins, a function's globals and the guard hooks are refused."""
    check(shared, payload, outside, listener)


@pytest.mark.parametrize("payload", SUBCLASSES)
def test_subclass_walks_are_refused(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """Walking from a literal to object.__subclasses__() is refused at every step."""
    check(shared, payload, outside, listener)


def test_mro_hands_out_classes_only(shared: Target, outside: Outside, listener: Listener) -> None:
    """type(x).mro() is allowed and gives classes, which lead nowhere without dunders."""
    payload = Payload("def execute(ctx):\n    return str(type(1).mro())\n", ("ok",))
    attempt = run_attack(shared, payload, outside, listener)
    assert attempt.reply.result == "[<class 'int'>, <class 'object'>]"


@pytest.mark.parametrize("payload", FORMAT_STRINGS)
def test_format_string_walks_are_refused(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """str.format and its relatives are refused; harmless formatting still works."""
    check(shared, payload, outside, listener)


@pytest.mark.parametrize("payload", FRAMES)
def test_frame_walks_are_refused(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """Frames through generators, coroutines and tracebacks are out of reach."""
    check(shared, payload, outside, listener)


@pytest.mark.parametrize("payload", FILE_READS)
def test_file_reads_outside_scratch_are_refused(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """No library reads a file outside the run's scratch folder back to the caller."""
    attempt = run_attack(shared, payload, outside, listener)
    assert b"root:x:0:0" not in attempt.raw.data


@pytest.mark.parametrize("payload", FILE_WRITES)
def test_file_writes_outside_scratch_are_refused(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """No library writes a file outside the run's scratch folder."""
    check(shared, payload, outside, listener)


@pytest.mark.parametrize("payload", IN_MEMORY_AND_SCRATCH)
def test_in_memory_and_scratch_files_still_work(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """io.BytesIO/io.StringIO and relative paths in the scratch folder work."""
    attempt = run_attack(shared, payload, outside, listener)
    assert attempt.reply.result in ([1, 2], [0, 1, 2], [0.0, 1.0, 2.0], [[1.0, 2.0], [3.0, 4.0]], 7)


@pytest.mark.parametrize("payload", PICKLE_AND_EVAL)
def test_unpickling_and_string_evaluation_are_refused(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """Pickles are not loaded and strings are not evaluated outside the guards."""
    check(shared, payload, outside, listener)


@pytest.mark.parametrize("payload", PROCESSES)
def test_no_process_is_started(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """No route starts a process: refused by the policy, or by seccomp (EPERM)."""
    check(shared, payload, outside, listener)


@pytest.mark.parametrize("payload", TEST_LISTENER)
def test_requests_to_the_loopback_listener_never_arrive(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """HTTP and sockets to a listener on 127.0.0.1 are refused; it sees no connection."""
    check(shared, payload, outside, listener)


@pytest.mark.parametrize(("url", "ranges"), ADDRESS_RULES, ids=[url for url, _ in ADDRESS_RULES])
def test_loopback_link_local_and_private_addresses_are_refused(
    shared: Target, url: str, ranges: tuple[str, ...], outside: Outside, listener: Listener
) -> None:
    """Requests to loopback, metadata, private and shared ranges are refused, naming the range."""
    source = (
        "import requests\ndef execute(ctx):\n"
        "    return requests.get(ctx['to'], timeout=1, allow_redirects=False).status_code\n"
    )
    payload = Payload(source, ("policy_violation",), ranges)
    attempt = run_attack(shared, payload, outside, listener, to=url)
    assert attempt.reply.error is not None
    assert "network access" in attempt.reply.error.message


def test_allowed_destination_is_reached_positive_control(
    allowing: Target, outside: Outside, listener: Listener
) -> None:
    """With EXECUTOR_NET_ALLOW=127.0.0.1:<port> the same request reaches the listener."""
    before = listener.count()
    source = (
        "import requests\ndef execute(ctx):\n    return requests.get(ctx['url'], timeout=5).text\n"
    )
    attempt = run_attack(allowing, Payload(source, ("ok",)), outside, listener, watched=())
    assert attempt.reply.result == "reached"
    assert listener.count() == before + 1


@pytest.mark.parametrize(
    "payload",
    [
        body(
            "redirect-to-metadata",
            "import requests\n---\nreturn requests.get(ctx['url'] + 'redirect', timeout=1).text",
            mentions=("link-local",),
        ),
        body(
            "other-loopback-address-same-port",
            "import requests\n---\nreturn requests.get(ctx['side_url'], timeout=1).text",
        ),
        body(
            "raw-socket-after-pandas-eval",
            """
            import pandas as pd
            ---
            out = []
            code = ("import _socket\\ns = _socket.socket()\\ns.settimeout(1)\\n"
                    "s.connect((host, port))\\ns.close()\\nout.append('connected')")
            names = {"host": "127.0.0.2", "port": ctx["port"], "out": out}
            pd.eval("builtins", engine="python").exec(code, names)
            return out
            """,
            "policy_violation",
            "script_error",
            kind="UndefinedVariableError",  # pd.eval no longer sees the caller's frame
        ),
    ],
)
def test_allow_list_opens_only_what_it_names(
    allowing: Target,
    payload: Payload,
    outside: Outside,
    listener: Listener,
    side_listener: Listener,
) -> None:
    """An allowed 127.0.0.1:<port> opens neither redirects elsewhere nor other loopback hosts."""
    before = listener.count()
    run_attack(
        allowing, payload, outside, listener, watched=(side_listener,), side_url=side_listener.url
    )
    assert listener.count() - before <= 1


@pytest.mark.parametrize(
    "payload",
    [
        body(
            "nltk-senna-environ",
            "import nltk\n---\nreturn dict(nltk.classify.senna.environ)",
            "ok",
            "policy_violation",
        ),
        body(
            "pandas-eval-os-environ",
            "import pandas as pd\n---\nreturn dict(pd.eval('os.environ', engine='python'))",
            "ok",
            "script_error",
        ),
        body(
            "proc-self-environ",
            "import pandas as pd\n---\nreturn pd.io.parsers.TextFileReader("
            "'/proc/self/environ', sep='\\x01', header=None).read().to_string()",
            "ok",
            "script_error",
        ),
        body("os-environ-via-uuid", "import uuid\n---\nreturn dict(uuid.os.environ)"),
    ],
)
def test_environment_has_no_executor_settings(
    shared: Target,
    payload: Payload,
    outside: Outside,
    listener: Listener,
    nats_server: NatsServer,
) -> None:
    """Whatever route reads the run's environment, it holds no EXECUTOR_*, no NATS_URL, no key."""
    attempt = run_attack(shared, payload, outside, listener)
    for leaked in (SECRET, OLD_SECRET, nats_server.url, "EXECUTOR_", "NATS_URL"):
        assert leaked.encode() not in attempt.raw.data, leaked
    if attempt.reply.status == "ok" and isinstance(attempt.reply.result, dict):
        assert "PATH" in attempt.reply.result
        assert not [k for k in attempt.reply.result if k.startswith(("EXECUTOR_", "NATS_"))]


@pytest.mark.parametrize("payload", RESOURCES)
def test_resource_exhaustion_ends_with_its_code(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """Memory, output, result size, recursion and huge numbers end with their own code."""
    attempt = run_attack(shared, payload, outside, listener, timeout=5)
    reply = attempt.reply
    assert reply.error is not None
    if reply.error.code == "output_limit":
        assert len(attempt.raw.data) < 1024 * 1024


@pytest.mark.parametrize("payload", TIMEOUTS)
def test_cpu_and_waiting_end_in_timeout(
    shared: Target, payload: Payload, outside: Outside, listener: Listener
) -> None:
    """A run that never returns, even one that swallows the soft stop, ends timeout in time."""
    timeout = 2.0
    timed = Payload(payload.source, ("timeout",))
    attempt = run_attack(shared, timed, outside, listener, timeout=timeout)
    assert attempt.reply.status == "timeout"
    assert attempt.seconds < timeout + 1
