"""The policy layer, one class of bypass at a time: each payload is a shape of the class, run
with every layer on, and must end policy_violation (or, where the library itself refuses, an
error that shows nothing was reached).

The classes are those of the attack suite that found 17 bypasses: names that are not exact
``str``; code libraries generate from strings a script controls; dangerous classes bound inside
libraries at import time; expression evaluators that walk attributes themselves; values that
arrive through calls and iteration; the compile hook; writes to modules through library
helpers; and library file doors. That a bypass still gains nothing below the interpreter is
shown, with the policy off, in ``test_network_isolation``, ``test_run_separation``,
``test_quota`` and ``test_layers``.
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent
from typing import Any, NoReturn

import pytest

from sandbox.api import Outcome
from sandbox.config import PoolConfig
from sandbox.doors import Doors
from sandbox.errors import PolicyViolation
from sandbox.policy import Policy
from tests.pools import LivePool, live, ok_result


@pytest.fixture(scope="module")
def pool(scratch_base: Path) -> Iterator[LivePool]:
    with live(PoolConfig(workers=2, warm_children=2, scratch_dir=str(scratch_base))) as running:
        yield running


def refused(outcome: Outcome, *mentions: str) -> None:
    assert outcome.status == "error", outcome
    assert outcome.error is not None
    assert outcome.error.code == "policy_violation", outcome.error
    for mention in mentions:
        assert mention in outcome.error.message, outcome.error.message


def case(name: str, source: str, *mentions: str) -> Any:
    return pytest.param(dedent(source).lstrip("\n"), mentions, id=name)


NAMES = [
    case(
        "getattr-startswith-lies",
        """
        class Name(str):
            def startswith(self, prefix, *args):
                return False
        def execute(ctx):
            return str(getattr((), Name("__class__")))
        """,
        "__class__",
    ),
    case(
        "getattr-eq-lies",
        """
        class Name(str):
            def __eq__(self, other):
                return False
        def gen():
            yield 1
        def execute(ctx):
            return str(getattr(gen(), Name("gi_frame")))
        """,
        "gi_frame",
    ),
    case(
        "hasattr-subclass-name",
        """
        class Name(str):
            def startswith(self, prefix, *args):
                return False
        def execute(ctx):
            return hasattr(len, Name("__self__"))
        """,
        "__self__",
    ),
    case(
        "setattr-subclass-name",
        """
        class Name(str):
            def startswith(self, prefix, *args):
                return False
        class Box:
            pass
        def execute(ctx):
            setattr(Box, Name("__init__"), print)
            return 1
        """,
        "__init__",
    ),
]

GENERATED = [
    case(
        "make-dataclass-lying-identifier",
        """
        import dataclasses
        class Name(str):
            def isidentifier(self):
                return True
        def execute(ctx):
            field = Name("a=__import__('os').system('true'),b")
            dataclasses.make_dataclass("C", [(field, int)])
            return "made"
        """,
    ),
    case(
        "dataclass-string-default-through-namespace",
        """
        import dataclasses
        def execute(ctx):
            C = dataclasses.make_dataclass(
                "C", [("x", int)], namespace={"__post_init__": lambda self: self.__class__}
            )
            return str(type(C(1).__post_init__()))
        """,
    ),
    case(
        "singledispatch-evaluates-an-annotation",
        """
        import functools
        @functools.singledispatch
        def f(x):
            return 0
        def g(x: "__import__('os').getcwd()"):
            return 1
        def execute(ctx):
            f.register(g)
            return 1
        """,
        "__import__",
    ),
    case(
        "openpyxl-metaclass",
        """
        import openpyxl
        def execute(ctx):
            meta = openpyxl.descriptors.MetaStrict
            return str(meta("Evil", (str,), {"startswith": lambda *a: False}))
        """,
        "metaclass",
    ),
    case(
        "enum-metaclass",
        """
        import enum
        def execute(ctx):
            return str(enum.EnumType)
        """,
        "metaclass",
    ),
]

CLASSES = [
    case(
        "nltk-warning-unpickler",
        """
        import io
        import nltk
        def execute(ctx):
            payload = b"cos\\ngetcwd\\n(tR."
            return nltk.picklesec.WarningUnpickler(io.BytesIO(payload)).load()
        """,
    ),
    case(
        "nltk-pathsec-zipfile",
        """
        import nltk
        def execute(ctx):
            return nltk.pathsec.ZipFile("/etc/passwd").namelist()
        """,
    ),
    case(
        "pandas-pickle-compat-unpickler",
        """
        import pandas as pd
        def execute(ctx):
            return str(pd.compat.pickle_compat.Unpickler)
        """,
    ),
]

EXPRESSIONS = [
    case(
        "query-single-underscore",
        """
        import pandas as pd
        def execute(ctx):
            return str(pd.DataFrame({"a": [1]}).query("a._mgr == 1"))
        """,
        "_mgr",
    ),
    case(
        "eval-ctypes-through-values",
        """
        import pandas as pd
        def execute(ctx):
            return str(pd.DataFrame({"a": [1]}).eval("a.values.ctypes.data"))
        """,
        "in an expression",
    ),
    case(
        "eval-format-on-data",
        """
        import pandas as pd
        def execute(ctx):
            return str(pd.eval("'{0.__class__}'.format(1)"))
        """,
        "format",
    ),
    case(
        "query-local-variable",
        """
        import pandas as pd
        def execute(ctx):
            secret = 1
            return str(pd.DataFrame({"a": [1]}).query("a == @secret"))
        """,
        "@",
    ),
    case(
        "query-lambda",
        """
        import pandas as pd
        def execute(ctx):
            return str(pd.DataFrame({"a": [1]}).query("(lambda: 1)() == a"))
        """,
        "expression",
    ),
]

CALLS = [
    case(
        "cython-func-globals",
        """
        import pandas as pd
        def execute(ctx):
            g = pd.api.types.is_scalar.func_globals
            return str(g.get("sys"))
        """,
        "func_globals",
    ),
    case(
        "numpy-ctypes",
        """
        import numpy as np
        def execute(ctx):
            return np.arange(3).ctypes.data
        """,
        "ctypes",
    ),
    case(
        "module-handed-to-update-wrapper",
        """
        import functools, json
        def f():
            pass
        def execute(ctx):
            functools.update_wrapper(json, f)
            return 1
        """,
        "passing module 'json'",
    ),
    case(
        "dataclass-on-a-module",
        """
        import dataclasses, json
        def execute(ctx):
            dataclasses.dataclass(json)
            return 1
        """,
        "passing module 'json'",
    ),
    case(
        "accessor-registered-on-a-module",
        """
        import pandas as pd, json
        def execute(ctx):
            pd.api.extensions.register_dataframe_accessor("x")(json)
            return 1
        """,
        "passing module",
    ),
]

# Found by an independent attack pass on the first version of these guards; each was a
# complete policy bypass (or, for the last two, one the OS layers still held).
REGRESSIONS = [
    case(
        "eval-backtick-inside-a-string-hides-code",
        """
        import pandas as pd
        B = "Timestamp.fromordinal.__globals__['__builtins__']"
        def execute(ctx):
            return str(pd.eval("'`' + " + B + ".__import__('os').getcwd() + '`'"))
        """,
        "backtick inside a string",
    ),
    case(
        "make-dataclass-namespace-module-builtins",
        """
        import dataclasses
        def execute(ctx):
            C = dataclasses.make_dataclass("C", [("x", int)], namespace={"__module__": "builtins"})
            return repr(C(1))
        """,
        "__module__",
    ),
    case(
        "update-wrapper-copies-globals",
        """
        import functools
        def target():
            pass
        def execute(ctx):
            functools.update_wrapper(target, getattr, assigned=(), updated=("__globals__",))
            return 1
        """,
        "only on the script's own",
    ),
    case(
        "numpy-as-strided-memory",
        """
        from numpy.lib.stride_tricks import as_strided
        def execute(ctx):
            return 1
        """,
        "as_strided",
    ),
    case(
        "private-module-import",
        """
        import numpy._core.overrides as ov
        def execute(ctx):
            return len(ov.ARRAY_FUNCTIONS)
        """,
        "numpy._core.overrides",
    ),
    case(
        "refused-function-through-map",
        """
        import numpy as np
        found = []
        def use(f):
            return f("/etc/hosts", dtype="uint8")
        def execute(ctx):
            funcs = [np.fromfile]
            return str(list(map(use, funcs)))
        """,
        "fromfile",
    ),
    case(
        "module-written-through-map",
        """
        import functools, json
        class Source:
            pass
        def execute(ctx):
            source = Source()
            source.dumps = print
            list(map(functools.update_wrapper, [json], [source], [("dumps",)], [()]))
            return json.dumps(1)
        """,
        "only on the script's own",
    ),
    case(
        "enum-functional-api-dunder-member",
        """
        import enum
        def execute(ctx):
            E = enum.Enum("E", [("__fspath__", 1)])
            return str(E)
        """,
        "__fspath__",
    ),
    # A second attack pass.
    case(
        "nltk-getinfo-hands-out-globals",
        """
        from nltk import decorators
        def execute(ctx):
            return str(decorators.getinfo(getattr)["globals"])[:100]
        """,
        "nltk.decorators",
    ),
    case(
        "nltk-update-wrapper-writes-dunders",
        """
        import nltk
        def target():
            pass
        def execute(ctx):
            info = {"dict": {"__array_interface__": {}}, "name": "t", "doc": "", "module": "m",
                    "defaults": None, "kwonlydefaults": None}
            nltk.decorators.update_wrapper(target, target, info)
            return 1
        """,
        "nltk.decorators",
    ),
    case(
        "pandas-temp-setattr-sets-dunders",
        """
        import pandas as pd
        class C:
            pass
        def execute(ctx):
            with pd.core.common.temp_setattr(C, "__getattr__", print):
                return 1
        """,
        "pandas.core.common",
    ),
    case(
        "ewm-agg-looks-up-a-dunder-by-name",
        """
        import pandas as pd
        def execute(ctx):
            return str(pd.Series([1.0, 2.0]).ewm(com=1).agg("__getstate__"))
        """,
        "__getstate__",
    ),
    case(
        "groupby-rolling-apply-by-dunder-name",
        """
        import pandas as pd
        def execute(ctx):
            frame = pd.DataFrame({"k": [1, 1], "v": [1.0, 2.0]})
            return str(frame.groupby("k").rolling(1).agg("__reduce__"))
        """,
        "__reduce__",
    ),
    case(
        "builtin-name-bound-to-a-library-function-gets-a-module",
        """
        import numpy, math
        def execute(ctx):
            len = numpy.asarray
            return str(len(math))
        """,
        "module 'math'",
    ),
    case(
        "starred-arguments-of-a-builtin-are-checked",
        """
        import json
        def execute(ctx):
            return str(max(*[json, json]))
        """,
        "module 'json'",
    ),
    case(
        "decorator-returns-what-a-script-may-not-hold",
        """
        import functools, json
        def execute(ctx):
            @functools.partial(lambda module, function: module, json)
            def hidden():
                pass
            return str(hidden)
        """,
        "module 'json'",
    ),
    # A third attack pass.
    case(
        "update-wrapper-points-wrapped-at-a-library-function",
        """
        import functools
        import numpy as np
        def target(x: "int"):
            return x
        def execute(ctx):
            functools.update_wrapper(target, np.bmat, assigned=(), updated=())
            functools.singledispatch(len).register(target)
            return 1
        """,
        "only on the script's own",
    ),
    case(
        "generated-code-names-the-builtins",
        """
        import functools
        def target(x: "[__builtins__][0] and int"):
            return x
        def execute(ctx):
            functools.singledispatch(len).register(target)
            return 1
        """,
        "__builtins__",
    ),
    case(
        "a-pydantic-annotation-executes-under-the-rules",
        """
        import openai
        class M(openai.BaseModel):
            x: "[exec][0]('import os', {}) and int"
        def execute(ctx):
            return str(M(x=1))
        """,
        "exec",
    ),
]

DOORS = [
    case(
        "read-csv-url-with-leading-spaces",
        """
        import pandas as pd
        def execute(ctx):
            return pd.read_csv("  \\tfile:///etc/passwd").to_dict()
        """,
        "file: URL",
    ),
    case(
        "read-csv-other-scheme",
        """
        import pandas as pd
        def execute(ctx):
            return pd.read_csv("s3://bucket/key.csv").to_dict()
        """,
        "s3: URL",
    ),
    case(
        "numpy-fromregex",
        """
        import numpy as np
        def execute(ctx):
            return np.fromregex("/etc/passwd", r"(\\w+)", [("x", "U20")]).tolist()
        """,
        "/etc/passwd",
    ),
    case(
        "pandas-json-writer",
        """
        import pandas as pd
        def execute(ctx):
            pd.io.json.to_json("/tmp/pyexec-canary.json", pd.DataFrame({"a": [1]}))
            return 1
        """,
        "/tmp/pyexec-canary.json",
    ),
    case(
        "openpyxl-xmlfile",
        """
        import openpyxl
        def execute(ctx):
            with openpyxl.xml.functions.xmlfile("/tmp/pyexec-canary.xml") as xf:
                pass
            return 1
        """,
        "/tmp/pyexec-canary.xml",
    ),
    case(
        "pandas-get-handle",
        """
        import pandas as pd
        def execute(ctx):
            return str(pd.io.formats.csvs.get_handle("/etc/passwd", "r"))
        """,
        "get_handle",
    ),
    case(
        "file-descriptor-as-path",
        """
        import pandas as pd
        def execute(ctx):
            return pd.read_csv(3).to_dict()
        """,
        "file descriptor",
    ),
    case(
        "nltk-corpus-reader-root",
        """
        import nltk
        def execute(ctx):
            reader = nltk.corpus.reader.PlaintextCorpusReader("/etc", ["passwd"])
            return reader.raw()
        """,
        "/etc",
    ),
    case(
        "relative-path-out-of-scratch",
        """
        import pandas as pd
        def execute(ctx):
            return pd.read_csv("../../../../../../etc/passwd").to_dict()
        """,
        "etc/passwd",
    ),
]


@pytest.mark.parametrize(("source", "mentions"), NAMES + GENERATED + CLASSES)
def test_names_generated_code_and_dangerous_classes(
    pool: LivePool, source: str, mentions: tuple[str, ...]
) -> None:
    """Names that are not exact str, code libraries generate from a script's strings, and
    classes bound at import time that unpickle or open paths: all refused."""
    refused(pool.run(source), *mentions)


@pytest.mark.parametrize(("source", "mentions"), EXPRESSIONS + CALLS)
def test_evaluators_calls_and_module_writes(
    pool: LivePool, source: str, mentions: tuple[str, ...]
) -> None:
    """pandas' evaluators, values through calls, and modules handed to library helpers."""
    refused(pool.run(source), *mentions)


@pytest.mark.parametrize(("source", "mentions"), REGRESSIONS)
def test_regressions_of_an_attack_pass(
    pool: LivePool, source: str, mentions: tuple[str, ...]
) -> None:
    """Shapes an independent attack pass found, each refused where it arises."""
    refused(pool.run(source), *mentions)


@pytest.mark.parametrize(("source", "mentions"), DOORS)
def test_library_doors(pool: LivePool, source: str, mentions: tuple[str, ...]) -> None:
    """Library readers and writers given paths outside the scratch folder or odd URLs."""
    refused(pool.run(source), *mentions)
    assert not Path("/tmp/pyexec-canary.json").exists()
    assert not Path("/tmp/pyexec-canary.xml").exists()


def test_a_path_like_is_asked_once(tmp_path: Path) -> None:
    """A path-like that names a scratch file first and /etc/passwd the second time is passed on
    as the scratch file it first named (scripts cannot make one with the policy on; this is the
    door itself, for a bypass that could)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    refusals: list[str] = []

    def refuse(what: str) -> NoReturn:
        refusals.append(what)
        raise PolicyViolation(what)

    answers = iter([str(scratch / "mine.csv"), "/etc/passwd", "/etc/passwd"])

    class Shifty:
        def __fspath__(self) -> str:
            return next(answers)

    checked = Doors(refuse, str(scratch)).checked_path(Shifty(), "pandas.read_csv")
    assert checked == Path(scratch / "mine.csv")
    assert os.fspath(checked) == os.fspath(checked) == str(scratch / "mine.csv")
    assert refusals == []


def test_an_object_claiming_to_be_a_bool_is_not_taken_for_one(tmp_path: Path) -> None:
    """The door decides by type(), so an object whose __class__ says bool is still a path."""
    refusals: list[str] = []

    def refuse(what: str) -> NoReturn:
        refusals.append(what)
        raise PolicyViolation(what)

    class Liar:
        @property  # type: ignore[misc]
        def __class__(self) -> type:
            return bool

        def __fspath__(self) -> str:
            return "/etc/hosts"

    assert isinstance(Liar(), bool)
    with pytest.raises(PolicyViolation):
        Doors(refuse, str(tmp_path)).checked_path(Liar(), "pandas.read_csv")
    (refusal,) = refusals
    assert "/etc/hosts" in refusal


def test_an_expression_is_evaluated_as_the_text_that_was_checked(pool: LivePool) -> None:
    """A str subclass whose splitlines() answers another expression is evaluated as the text
    it holds, the one that was checked (regression: pandas used to call its splitlines)."""
    source = """
        import pandas as pd
        class Expression(str):
            def splitlines(self, *args):
                return ["Timestamp.fromordinal.__globals__"]
        def execute(ctx):
            return str(pd.eval(Expression("1+1")))
        """
    assert ok_result(pool.run(source)) == "2"


def test_what_the_evaluators_are_for_still_works(pool: LivePool) -> None:
    """Columns, operators, math functions and the .str accessor pass the expression check."""
    source = """
        import pandas as pd
        def execute(ctx):
            df = pd.DataFrame({"a": [1, 4, 9], "name": ["ab", "cd", "ae"]})
            df = df.eval("b = sqrt(a) + 1")
            picked = df.query("b > 2 and name.str.startswith('a')", engine="python")
            return picked["b"].tolist()
        """
    assert ok_result(pool.run(source)) == [4.0]


def test_dataclasses_and_namedtuples_of_scripts_still_work(pool: LivePool) -> None:
    """Code the standard library generates for a script's own classes runs under the rules."""
    source = """
        import collections, dataclasses
        @dataclasses.dataclass(frozen=True, order=True)
        class Point:
            x: int
            y: int = 0
        Pair = collections.namedtuple("Pair", "left right")
        def execute(ctx):
            p = Point(1, 2)
            q = dataclasses.replace(p, y=3)
            return [repr(p), p < q, hash(p) == hash(Point(1, 2)), list(Pair(1, 2)), Pair(1, 2).left]
        """
    assert ok_result(pool.run(source)) == ["Point(x=1, y=2)", True, True, [1, 2], 1]


# Run in a fresh interpreter: the audit hook, once added, stays for the life of the process.
TRUST_PROBE = """
import builtins, functools, operator, sys, types
from sandbox import audit, hooks
from sandbox.errors import PolicyViolation
from sandbox.policy import Policy

policy = Policy(("math",))
ours = hooks.install(policy.refuse, policy.lend, policy.is_script_namespace)
policy.refuse_builtins_as_they_are()
code = (lambda: 1).__code__
audit.install(policy.refuse, ours)
out = {}

class Planted:
    # Not a method: iter() calls it with no arguments, from the guard's own frame.
    __iter__ = functools.partial(next, map(operator.call, [types.FunctionType], [code], [{}]))

try:
    policy.guarded_iter(Planted())
    out["function made under a guard"] = "made"
except PolicyViolation as exc:
    out["function made under a guard"] = str(exc)
for name in ("exec", "eval", "compile"):
    try:
        policy.check(getattr(builtins, name), name)
        out[name] = "held"
    except PolicyViolation:
        out[name] = "refused"
try:
    leaked = eval(compile("secret", "<probe>", "eval"), {}, {"secret": sys})
    out["locals"] = "leaked" if leaked is sys else repr(leaked)
except NameError:
    out["locals"] = "lent"
lent = policy.lend(dict(vars(builtins)))
out["lent"] = sorted(
    name
    for name in ("exec", "eval", "compile")
    for where in (lent, lent["__builtins__"])
    if where.get(name) is getattr(builtins, name)
)
print(out)
"""


def test_the_sandboxs_own_frames_lend_no_trust_to_what_they_call() -> None:
    """A C function a guard calls for the script (iter() of a planted __iter__) that makes a
    function is refused: a guard's frame is sandbox code but no trusted compiler. The hooked
    compile, eval and exec are refused by identity, and a lent namespace holds none of them."""
    completed = subprocess.run(
        [sys.executable, "-c", TRUST_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert completed.returncode == 0, completed.stderr
    found = ast.literal_eval(completed.stdout.strip().splitlines()[-1])
    assert "making a function" in found["function made under a guard"], found
    assert [found[name] for name in ("exec", "eval", "compile")] == ["refused"] * 3
    assert found["lent"] == []
    assert found["locals"] == "lent", found  # a locals mapping is lent like the globals


@pytest.mark.parametrize(
    "wrapper",
    [
        lambda: functools.partial(os.system, "true"),
        lambda: functools.partial(print, os.system),  # a refused argument it would pass
        lambda: property(os.getcwd),
        lambda: staticmethod(os.system),
        lambda: classmethod(os.system),
        lambda: functools.lru_cache(os.getcwd),
        lambda: os.environ.get,  # a harmless method of a refused object
        lambda: functools.partial(functools.partial(os.system)),
    ],
    ids=[
        "partial",
        "partial-argument",
        "property",
        "staticmethod",
        "classmethod",
        "lru-cache",
        "bound-method",
        "nested-partial",
    ],
)
def test_a_wrapper_is_refused_with_what_it_calls(wrapper: Any) -> None:
    """A callable that calls another (or is bound to an object) is refused with it: a refused
    function inside a partial or a cached wrapper is as refused as on its own."""
    policy = Policy(("functools",))
    with pytest.raises(PolicyViolation):
        policy.check(wrapper(), "value")
    assert policy.check(functools.partial(print, "fine"), "value") is not None
