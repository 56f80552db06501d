"""What a script sees and gets back, through a real replica over NATS (contract: reply, sandbox)."""

from __future__ import annotations

import datetime as dt
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest

from consumer.protocol import Reply
from sandbox.config import FORBIDDEN_SUBMODULES
from tests.conftest import Caller

STDOUT_LIMIT = 200  # EXECUTOR_STDOUT_LIMIT of the shared replica


def run(caller: Caller, source: str, timeout: float = 10.0, **ctx: object) -> Reply:
    """Send a script (indented freely) to the shared replica and return its reply."""
    return caller.code(dedent(source), dict(ctx), timeout=timeout)


def assert_ok(reply: Reply) -> None:
    assert reply.status == "ok", reply.error
    assert reply.error is None


def assert_refused(reply: Reply, *mentions: str) -> None:
    """The run ended with policy_violation and the message names what was refused."""
    assert reply.status == "error", reply
    assert reply.error is not None
    assert reply.error.code == "policy_violation", reply.error
    for mention in mentions:
        assert mention in reply.error.message, reply.error.message


def assert_still_serving(caller: Caller) -> None:
    reply = run(caller, "def execute(ctx):\n    return ctx['n'] * 2", n=21)
    assert_ok(reply)
    assert reply.result == 42


# -- results, errors, output ----------------------------------------------------------------------


def test_returned_value_comes_back_as_result(caller: Caller) -> None:
    """execute(ctx) receives ctx and its return value is the reply's result."""
    reply = run(
        caller,
        """
        def execute(ctx):
            return {"sum": sum(ctx["xs"]), "name": ctx["name"].upper(), "none": None}
        """,
        xs=[1, 2, 3],
        name="abc",
    )
    assert_ok(reply)
    assert reply.result == {"sum": 6, "name": "ABC", "none": None}


def test_syntax_error_names_the_line(caller: Caller) -> None:
    """A script that does not parse ends error/syntax_error and the message names the line."""
    reply = run(caller, "def execute(ctx):\n    x = 1\n    return x +\n")
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "syntax_error"
    assert reply.error.type == "SyntaxError"
    assert "line 3" in reply.error.message


def test_exception_two_frames_deep_gives_script_traceback_only(caller: Caller) -> None:
    """An exception raised in a nested call is script_error with only <script> frames shown."""
    reply = run(
        caller,
        """
        def inner(d):
            return d["missing"]

        def outer(d):
            return inner(d)

        def execute(ctx):
            return outer(ctx)
        """,
    )
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "script_error"
    assert reply.error.type == "KeyError"
    trace = reply.error.traceback
    assert trace is not None
    file_lines = [line for line in trace.splitlines() if line.strip().startswith("File ")]
    assert len(file_lines) == 3
    assert all('File "<script>"' in line for line in file_lines)
    assert [line.split(" in ")[-1] for line in file_lines] == ["execute", "outer", "inner"]
    assert 'return d["missing"]' in trace
    for leak in ("site-packages", "sandbox/", "/work/", ".py", "runner", "consumer"):
        assert leak not in trace


def test_policy_violation_traceback_names_no_executor_module(caller: Caller) -> None:
    """A refusal's traceback shows the script's lines, not the executor's module names."""
    reply = run(caller, "def execute(ctx):\n    import os\n    return 1\n")
    assert_refused(reply)
    assert reply.error is not None
    assert reply.error.traceback is not None
    assert 'File "<script>", line 2' in reply.error.traceback
    assert "sandbox" not in reply.error.traceback


@pytest.mark.parametrize(
    "source",
    [
        "def execute(ctx):\n    while True:\n        pass\n",
        # Swallowing the soft stop does not help: the child is killed after a grace period.
        dedent(
            """
            def execute(ctx):
                while True:
                    try:
                        while True:
                            pass
                    except BaseException:
                        pass
            """
        ),
        # A long computation inside C code does not see the soft stop at all.
        "def execute(ctx):\n    return sum(range(10 ** 13))\n",
    ],
    ids=["loop", "loop-catching-the-stop", "long-c-call"],
)
def test_endless_script_answers_timeout_within_timeout_plus_one_second(
    caller: Caller, source: str
) -> None:
    """A script that never ends is answered timeout/timeout within timeout + 1 s."""
    started = time.monotonic()
    reply = caller.code(source, {}, timeout=1)
    elapsed = time.monotonic() - started
    assert reply.status == "timeout"
    assert reply.error is not None
    assert reply.error.code == "timeout"
    assert elapsed < 1 + 1
    assert_still_serving(caller)


def test_printed_output_comes_back_in_stdout(caller: Caller) -> None:
    """What the script prints is returned in stdout next to its result."""
    reply = run(
        caller,
        """
        def execute(ctx):
            print("hello", 42)
            print("second", "line", sep="-")
            return "done"
        """,
    )
    assert_ok(reply)
    assert reply.result == "done"
    assert reply.stdout == "hello 42\nsecond-line\n"


def test_output_over_the_limit_is_cut_and_marked(caller: Caller) -> None:
    """Printed output past the stdout limit is cut, the cut is marked, the run still succeeds."""
    reply = run(
        caller,
        """
        def execute(ctx):
            for _ in range(10):
                print("x" * 100)
            return len("y" * 1000)
        """,
    )
    assert_ok(reply)
    assert reply.result == 1000
    printed = ("x" * 100 + "\n") * 10
    assert reply.stdout.startswith(printed[:STDOUT_LIMIT])
    assert not reply.stdout.startswith(printed[: STDOUT_LIMIT + 1])
    assert "cut" in reply.stdout[STDOUT_LIMIT:]
    assert len(reply.stdout) < STDOUT_LIMIT + 100


# -- result conversions --------------------------------------------------------------------------

CONVERSIONS: list[tuple[str, str, object]] = [
    ("import datetime", "datetime.datetime(2024, 5, 6, 7, 8, 9)", "2024-05-06T07:08:09"),
    (
        "import datetime",
        "datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)",
        "2024-05-06T07:08:09+00:00",
    ),
    ("import datetime", "datetime.date(2024, 5, 6)", "2024-05-06"),
    ("import datetime", "datetime.time(7, 8, 9)", "07:08:09"),
    ("import decimal", "decimal.Decimal('12.50')", "12.50"),
    (
        "import uuid",
        "uuid.UUID('12345678-1234-5678-1234-567812345678')",
        "12345678-1234-5678-1234-567812345678",
    ),
    ("", "(1, 'a', (2, 3))", [1, "a", [2, 3]]),
    ("", "float('nan')", None),
    ("", "[1.5, float('nan'), float('inf')]", [1.5, None, None]),
    ("import numpy as np", "np.int64(7)", 7),
    ("import numpy as np", "np.float32(1.5)", 1.5),
    ("import numpy as np", "np.bool_(True)", True),
    ("import numpy as np", "np.array([[1, 2], [3, 4]])", [[1, 2], [3, 4]]),
    ("import numpy as np", "np.array([1.0, np.nan])", [1.0, None]),
    ("import pandas as pd", "pd.Series([1, 2, 3])", [1, 2, 3]),
    ("import pandas as pd", "pd.Series([1.0, None])", [1.0, None]),
    (
        "import pandas as pd",
        "pd.DataFrame({'a': [1, 2], 'b': ['x', None], 'c': [0.5, float('nan')]})",
        [{"a": 1, "b": "x", "c": 0.5}, {"a": 2, "b": None, "c": None}],
    ),
    ("", "{'nested': {'t': (1,), 's': {5}}}", {"nested": {"t": [1], "s": [5]}}),
]


@pytest.mark.parametrize(("imports", "expression", "expected"), CONVERSIONS)
def test_result_values_are_converted_to_json(
    caller: Caller, imports: str, expression: str, expected: object
) -> None:
    """datetime/date/time, Decimal, UUID, tuples, numpy, pandas and NaN get their JSON form."""
    reply = run(caller, f"{imports}\ndef execute(ctx):\n    return {expression}\n")
    assert_ok(reply)
    assert reply.result == expected


def test_set_result_becomes_a_list(caller: Caller) -> None:
    """A set comes back as a list of its members."""
    reply = run(caller, "def execute(ctx):\n    return {3, 1, 2}\n")
    assert_ok(reply)
    assert isinstance(reply.result, list)
    assert sorted(reply.result) == [1, 2, 3]


def test_timestamp_result_round_trips_as_iso_8601(caller: Caller) -> None:
    """A pandas Timestamp in a DataFrame comes back as an ISO-8601 string."""
    reply = run(
        caller,
        """
        import pandas as pd
        def execute(ctx):
            return pd.DataFrame({"at": pd.to_datetime(["2024-01-02 03:04:05"])})
        """,
    )
    assert_ok(reply)
    assert dt.datetime.fromisoformat(reply.result[0]["at"]) == dt.datetime(2024, 1, 2, 3, 4, 5)


def test_str_and_number_subclasses_come_back_as_plain_values(caller: Caller) -> None:
    """Library values that subclass str or int (a pymorphy3 tag, an IntEnum) are returned as
    the plain string or number; regression: a str subclass took the worker down (worker_lost)."""
    reply = run(
        caller,
        """
        import enum
        import pymorphy3
        class Level(enum.IntEnum):
            HIGH = 3
        def execute(ctx):
            tag = pymorphy3.MorphAnalyzer().parse("мама")[0].tag
            return {"pos": tag.POS, "level": Level.HIGH, "keyed": {tag.POS: 1}}
        """,
    )
    assert_ok(reply)
    assert reply.result == {"pos": "NOUN", "level": 3, "keyed": {"NOUN": 1}}


@pytest.mark.parametrize(
    "expression",
    ["object()", "execute", "b'raw bytes'", "{'inside': [object()]}"],
    ids=["object", "function", "bytes", "nested-object"],
)
def test_unconvertible_result_is_result_not_serializable(caller: Caller, expression: str) -> None:
    """A result with no JSON form ends error/result_not_serializable."""
    reply = run(caller, f"def execute(ctx):\n    return {expression}\n")
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "result_not_serializable"
    assert reply.result is None


# -- the sandbox: imports, attributes, builtins ---------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "mention"),
    [
        ("import os", "'os'"),
        ("import subprocess", "'subprocess'"),
        ("from os import path", "'os'"),
        ("import os.path", "'os.path'"),
        ("import sys", "'sys'"),
        # Names starting with '_' are refused when the script is compiled, so the refusal
        # names __import__ itself rather than the module it was asked for.
        ("__import__('os')", "__import__"),
    ],
)
def test_forbidden_import_is_policy_violation(caller: Caller, statement: str, mention: str) -> None:
    """Importing os, subprocess or sys, however spelled, is refused and the refusal says what."""
    reply = run(caller, f"def execute(ctx):\n    {statement}\n    return 1\n")
    assert_refused(reply, mention)
    assert reply.result is None


@pytest.mark.parametrize(
    "source",
    [
        "import pandas as pd\ndef execute(ctx):\n    return str(pd.io.common.os)\n",
        "from pandas.io.common import os\ndef execute(ctx):\n    return 1\n",
        "import requests\ndef execute(ctx):\n    return str(requests.utils.os)\n",
        "from nltk.data import os\ndef execute(ctx):\n    return 1\n",
        "import pandas as pd\ndef execute(ctx):\n    return str(getattr(pd.io.common, 'os'))\n",
        "import uuid\ndef execute(ctx):\n    return str(uuid.os)\n",
        "import openpyxl\ndef execute(ctx):\n    return str(openpyxl.xml.os)\n",
        "import uuid\ndef execute(ctx):\n    return str(getattr(uuid, 'os'))\n",
    ],
    ids=[
        "pandas-attribute",
        "pandas-from-import",
        "requests-attribute",
        "nltk-from-import",
        "getattr",
        "uuid-attribute",
        "openpyxl-attribute",
        "uuid-getattr",
    ],
)
def test_os_through_an_allowed_module_is_policy_violation(caller: Caller, source: str) -> None:
    """Reaching os as an attribute of an allowed library is refused and names what was refused:
    os itself, or a library module on the way that is refused as a whole (pandas.io.common)."""
    reply = run(caller, source)
    assert reply.error is not None
    refused = ("'os'", *(f"'{module}'" for module in FORBIDDEN_SUBMODULES))
    assert any(name in reply.error.message for name in refused), reply.error.message
    assert_refused(reply, "refused")


@pytest.mark.parametrize(
    "body",
    [
        "return ().__class__.__bases__[0].__subclasses__()",
        "return str(getattr(1, '__class__'))",
        "return '{0.__class__}'.format(1)",
        "return '{x.__class__}'.format_map({'x': 1})",
        "g = (i for i in range(3))\n    return str(getattr(g, 'gi_frame'))",
        "return eval('1 + 1')",
        "exec('x = 1')\n    return 1",
        "return compile('1', 's', 'eval')",
        "return open('/etc/passwd').read()",
        "return str(globals())",
        "return str(vars())",
        "return str(locals())",
        "exit()",
    ],
    ids=[
        "subclasses",
        "getattr-dunder",
        "format-walk",
        "format-map-walk",
        "gi_frame",
        "eval",
        "exec",
        "compile",
        "open",
        "globals",
        "vars",
        "locals",
        "exit",
    ],
)
def test_reaching_interpreter_internals_is_policy_violation(caller: Caller, body: str) -> None:
    """Dunders, format-string walks, frames, eval/exec, open and namespace builtins are refused."""
    reply = run(caller, f"def execute(ctx):\n    {body}\n")
    assert_refused(reply)
    assert reply.result is None


def test_caught_refusal_still_ends_policy_violation(caller: Caller) -> None:
    """A script that catches its refusal and returns normally still ends policy_violation."""
    reply = run(
        caller,
        """
        def execute(ctx):
            try:
                import os
            except Exception:
                pass
            return "got away"
        """,
    )
    assert_refused(reply, "'os'")
    assert reply.result is None


def test_setting_an_attribute_on_a_module_is_refused(caller: Caller) -> None:
    """A script may not change a module's attributes."""
    reply = run(caller, "import json\ndef execute(ctx):\n    json.my_marker = 1\n    return 1\n")
    assert_refused(reply, "json")


# -- the sandbox: gaps found while testing (each reaches what the contract refuses) --------------


def test_os_through_pandas_eval_is_policy_violation(caller: Caller) -> None:
    """pandas' expression evaluator does not hand out os."""
    reply = run(
        caller,
        """
        import pandas as pd
        def execute(ctx):
            df = pd.DataFrame({"a": [1]})
            return int(df.eval("@pd.io.common.os.getpid()"))
        """,
    )
    assert_refused(reply)


def test_os_through_string_annotations_is_policy_violation(caller: Caller) -> None:
    """typing.get_type_hints does not evaluate a script's annotation outside the guards."""
    reply = run(
        caller,
        """
        import typing

        def f(x: "[c for c in ().__class__.__base__.__subclasses__() "
                 "if c.__name__ == '_wrap_close'][0].__init__.__globals__['getpid']()"):
            pass

        def execute(ctx):
            return typing.get_type_hints(f)["x"]
        """,
    )
    assert_refused(reply)


def test_os_through_numpy_unpickling_is_policy_violation(caller: Caller) -> None:
    """numpy.load does not unpickle (pickle is on the refused list, whatever the route)."""
    reply = run(
        caller,
        """
        import io
        import numpy as np
        def execute(ctx):
            return np.load(io.BytesIO(b"cos\\ngetpid\\n(tR."), allow_pickle=True)
        """,
    )
    assert_refused(reply)


def test_format_string_walk_through_userstring_is_policy_violation(caller: Caller) -> None:
    """A format string cannot walk attributes through a str look-alike either."""
    reply = run(
        caller,
        """
        import collections
        def execute(ctx):
            return collections.UserString("{0.__class__.__mro__}").format(1)
        """,
    )
    assert_refused(reply)


def test_reading_a_file_outside_the_scratch_directory_fails(caller: Caller) -> None:
    """A script cannot read the executor host's files (here /etc/passwd) through pandas."""
    reply = run(
        caller,
        """
        import pandas as pd
        def execute(ctx):
            return pd.read_csv("/etc/passwd", sep="\\x01", header=None)[0].tolist()
        """,
    )
    assert "root:" not in str(reply.result)
    assert reply.status == "error"


@pytest.mark.parametrize(
    "writer",
    [
        "pd.DataFrame({'a': [1]}).to_csv(ctx['path'])",
        "z = openpyxl.writer.excel.ZipFile(ctx['path'], 'w')\n    z.writestr('a', 'b')\n"
        "    z.close()",
    ],
    ids=["pandas-to-csv", "openpyxl-zipfile"],
)
def test_writing_a_file_outside_the_scratch_directory_fails(
    caller: Caller, tmp_path: Path, writer: str
) -> None:
    """A script cannot create files on the executor host outside its scratch directory."""
    target = tmp_path / "written-by-script"
    source = (
        f"import pandas as pd\nimport openpyxl\ndef execute(ctx):\n    {writer}\n    return 1\n"
    )
    reply = caller.code(source, {"path": str(target)}, timeout=10)
    assert not target.exists()
    assert reply.status == "error"


@pytest.fixture
def loopback_http() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 that answers 'reached' and records the paths asked for."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = b"reached"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/secret", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_request_to_loopback_is_refused(
    caller: Caller, loopback_http: tuple[str, list[str]]
) -> None:
    """A script's HTTP call to the executor's loopback is refused and never arrives."""
    url, seen = loopback_http
    reply = run(
        caller,
        """
        import requests
        def execute(ctx):
            return requests.get(ctx["url"], timeout=3).text
        """,
        url=url,
    )
    assert seen == []
    assert reply.result != "reached"
    assert reply.status == "error"


# -- the libraries work from a script ------------------------------------------------------------


def test_pandas_groupby(caller: Caller) -> None:
    """pandas groups and sums a DataFrame built from ctx."""
    reply = run(
        caller,
        """
        import pandas as pd
        def execute(ctx):
            df = pd.DataFrame(ctx["rows"])
            return df.groupby("k")["v"].sum().to_dict()
        """,
        rows=[{"k": "a", "v": 1}, {"k": "b", "v": 2}, {"k": "a", "v": 3}],
    )
    assert_ok(reply)
    assert reply.result == {"a": 4, "b": 2}


def test_openpyxl_workbook_round_trip_in_memory(caller: Caller) -> None:
    """openpyxl writes a workbook to io.BytesIO and reads it back."""
    reply = run(
        caller,
        """
        import io
        import openpyxl
        def execute(ctx):
            wb = openpyxl.Workbook()
            ws = wb.active
            ws.title = "Stock"
            ws.append(["name", "qty"])
            ws.append(["apple", 3])
            ws["C2"] = "=B2*2"
            buf = io.BytesIO()
            wb.save(buf)
            buf.seek(0)
            back = openpyxl.load_workbook(buf)
            sheet = back["Stock"]
            return [list(row) for row in sheet.iter_rows(values_only=True)]
        """,
    )
    assert_ok(reply)
    assert reply.result == [["name", "qty", None], ["apple", 3, "=B2*2"]]


def test_sqlglot_transpiles_and_parses(caller: Caller) -> None:
    """sqlglot transpiles MySQL to Postgres and parses a query into its parts."""
    reply = run(
        caller,
        """
        import sqlglot
        from sqlglot import exp
        def execute(ctx):
            out = sqlglot.transpile("SELECT IFNULL(a, 1) FROM t", read="mysql", write="postgres")
            tree = sqlglot.parse_one("SELECT a, b FROM t JOIN u ON t.id = u.id WHERE c > 1")
            tables = sorted(table.name for table in tree.find_all(exp.Table))
            return {"sql": out, "tables": tables}
        """,
    )
    assert_ok(reply)
    assert reply.result == {"sql": ["SELECT COALESCE(a, 1) FROM t"], "tables": ["t", "u"]}


def test_rapidfuzz_extract_one(caller: Caller) -> None:
    """rapidfuzz finds the closest choice."""
    reply = run(
        caller,
        """
        from rapidfuzz import process
        def execute(ctx):
            return process.extractOne(ctx["query"], ctx["choices"])
        """,
        query="appel",
        choices=["banana", "apple", "cherry"],
    )
    assert_ok(reply)
    match, score, index = reply.result
    assert (match, index) == ("apple", 1)
    assert 0 < score <= 100


def test_pymorphy3_normal_form_of_a_russian_word(caller: Caller) -> None:
    """pymorphy3 loads its Russian dictionary and lemmatizes a word."""
    reply = run(
        caller,
        """
        import pymorphy3
        def execute(ctx):
            morph = pymorphy3.MorphAnalyzer()
            return sorted({parse.normal_form for parse in morph.parse(ctx["word"])})
        """,
        word="стали",
    )
    assert_ok(reply)
    assert {"сталь", "стать"} & set(reply.result)


def test_nltk_tokenizers_without_downloaded_data(caller: Caller) -> None:
    """nltk's data-free tokenizers split text."""
    reply = run(
        caller,
        r"""
        from nltk.tokenize import RegexpTokenizer, TweetTokenizer, wordpunct_tokenize
        def execute(ctx):
            return {
                "wordpunct": wordpunct_tokenize("Hello, world!"),
                "tweet": TweetTokenizer().tokenize("@bob this is fun :-) #nlp"),
                "regexp": RegexpTokenizer(r"\w+").tokenize("well-known it's"),
            }
        """,
    )
    assert_ok(reply)
    assert reply.result == {
        "wordpunct": ["Hello", ",", "world", "!"],
        "tweet": ["@bob", "this", "is", "fun", ":-)", "#nlp"],
        "regexp": ["well", "known", "it", "s"],
    }


# -- limits and isolation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "def execute(ctx):\n    return len(bytearray(64 * 1024 ** 3))\n",
        dedent(
            """
            def execute(ctx):
                chunks = []
                while True:
                    chunks.append(bytearray(64 * 1024 ** 2))
            """
        ),
        "import numpy as np\ndef execute(ctx):\n    return float(np.ones(10 ** 11).sum())\n",
    ],
    ids=["one-huge-block", "growing-list", "numpy-array"],
)
def test_allocating_beyond_the_memory_limit_is_memory_limit(caller: Caller, source: str) -> None:
    """Allocating far past EXECUTOR_MEMORY_MB ends memory_limit; the replica serves on."""
    reply = caller.code(source, {}, timeout=10)
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "memory_limit"
    assert_still_serving(caller)


def test_library_state_does_not_leak_between_runs(caller: Caller) -> None:
    """State a script leaves in library modules is gone for the next one (a process per run)."""
    mutate = run(
        caller,
        """
        import csv
        import json
        import pandas as pd
        def execute(ctx):
            csv.register_dialect("leaked", delimiter=";")
            json.decoder.BACKSLASH["leaked"] = "x"
            pd.set_option("display.max_rows", 7)
            return ["leaked" in csv.list_dialects(), "leaked" in json.decoder.BACKSLASH,
                    pd.get_option("display.max_rows")]
        """,
    )
    assert_ok(mutate)
    assert mutate.result == [True, True, 7]
    for _ in range(3):
        look = run(
            caller,
            """
            import csv
            import json
            import pandas as pd
            def execute(ctx):
                return ["leaked" in csv.list_dialects(), "leaked" in json.decoder.BACKSLASH,
                        pd.get_option("display.max_rows")]
            """,
        )
        assert_ok(look)
        assert look.result[:2] == [False, False]
        assert look.result[2] != 7
