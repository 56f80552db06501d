"""Library code that reads its caller's frame sees the script, never the sandbox.

Some functions of the allowed libraries look at the frame that called them: ``numpy.bmat`` and
``numpy.r_["..."]`` evaluate names in the caller's globals and locals, ``namedtuple``, ``Enum``
and ``typing.NamedTuple`` name a class after the caller's module. Were that caller one of the
sandbox's guards, the script would be handed the sandbox's own module globals (its classes, the
real builtins) through a matrix or a class name. Calls, subscripts and decorators therefore run
in the script's own frame (``sandbox.compiler.Transformer``), and where the sandbox calls for a
script it does so from a namespace that holds nothing.

The inventory below lists every such reader in the allowed libraries (at the locked versions),
with why it is harmless or how it is met. A release that adds a reader makes
``test_every_frame_reader_is_reviewed`` fail until it is looked at.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import PoolConfig
from sandbox.config import DEFAULT_ALLOWED_MODULES
from tests.pools import LivePool, live, ok_result

READS_FRAMES = re.compile(
    r"_getframe|currentframe\(|\.f_back\b|\.f_locals\b|\.f_globals\b|getouterframes"
    r"|inspect\.stack\(|\.tb_frame\b|_getframemodulename"
)
# Parts of the packages scripts cannot import (refused as modules) or that are not code.
UNREACHABLE = re.compile(r"(^|/)(tests?|testing|_testing|distutils|f2py|conftest\.py)(/|$)")
# openai's models are pydantic models: a script's subclass runs pydantic's metaclass.
ALSO_SCANNED = ("pydantic",)

REVIEWED: dict[str, str] = {
    "collections/__init__.py": "namedtuple names its class after the caller's module; the "
    "names door passes module= (test_classes_made_for_a_script_say_they_are_the_scripts)",
    "typing.py": "NamedTuple and TypedDict read only the caller's __name__, and are called "
    "from the script's frame",
    "enum.py": "the functional API reads only the caller's __name__; sandbox.hooks passes module=",
    "pandas/util/_exceptions.py": "find_stack_level reads file names only (warning levels)",
    "pandas/core/common.py": "chained-assignment checks compare opcodes and identities; the "
    "module is refused to scripts as a whole",
    "pandas/core/computation/scope.py": "DataFrame.eval/query scopes; the module is refused, "
    "and the expression doors pass empty local_dict and global_dict and refuse '@'",
    "numpy/_utils/_inspect.py": "a private module (getargvalues of a frame given to it)",
    "numpy/matrixlib/defmatrix.py": "bmat('names') evaluates names in the caller's frame: "
    "called from the script's frame, it sees the script's names "
    "(test_numpy_name_lookups_see_the_script_only)",
    "numpy/lib/_index_tricks_impl.py": "r_['names'] and c_['names'] call bmat with the "
    "subscripting frame: subscripts stay in the script's frame",
    "pydantic/main.py": "model_rebuild's parent namespace: a pydantic method (refused by its "
    "module) or the metaclass run by the script's own class statement",
    "pydantic/type_adapter.py": "TypeAdapter's parent namespace: pydantic is not for scripts",
    "pydantic/_internal/_typing_extra.py": "parent_frame_namespace, used by the two above",
    "pydantic/_internal/_generics.py": "generic model names read the caller's module name",
    "pydantic/_internal/_docs_extraction.py": "field docstrings read from the class source",
    "pydantic/_internal/_namespace_utils.py": "mentions f_locals in its documentation only",
    "pydantic/v1/generics.py": "pydantic v1's generic model names (not used by openai)",
}


@pytest.fixture(scope="module")
def pool(scratch_base: Path) -> Iterator[LivePool]:
    with live(PoolConfig(workers=1, warm_children=1, scratch_dir=str(scratch_base))) as running:
        yield running


def _sources(name: str) -> Iterator[tuple[str, str]]:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return
    if spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            parent = os.path.dirname(root)
            for folder, _, files in os.walk(root):
                for file in files:
                    path = os.path.join(folder, file)
                    relative = os.path.relpath(path, parent)
                    if file.endswith(".py") and not UNREACHABLE.search(relative):
                        yield relative, path
    else:
        yield os.path.basename(spec.origin), spec.origin


def frame_readers() -> set[str]:
    found = set()
    for name in (*DEFAULT_ALLOWED_MODULES, *ALSO_SCANNED):
        for relative, path in _sources(name):
            with open(path, encoding="utf-8", errors="replace") as source:
                for line in source:
                    if READS_FRAMES.search(line) and not line.lstrip().startswith("#"):
                        found.add(relative)
                        break
    return found


def test_every_frame_reader_is_reviewed() -> None:
    """The files of the allowed libraries that read frames are exactly the reviewed ones."""
    found = frame_readers()
    assert found - REVIEWED.keys() == set(), "new frame readers: review them and list them"
    assert REVIEWED.keys() - found == set(), "listed readers no longer read frames: unlist"


@pytest.mark.parametrize(
    "expression",
    [
        'np.bmat("Policy")',  # the policy class, in the guards' module
        'np.bmat("self")',  # the policy itself, in a guard's locals
        'np.r_["Policy"]',
        'np.c_["builtins"]',
        'plain("Policy")',  # a builtin's name bound to bmat: called through the sandbox
    ],
)
def test_numpy_name_lookups_see_the_script_only(pool: LivePool, expression: str) -> None:
    """bmat and r_ with names find the script's own names and nothing of the sandbox."""
    source = f"""
        import numpy as np
        mine = np.matrix([[1, 2]])
        def execute(ctx):
            len = np.bmat
            plain = len
            found = np.bmat("mine").tolist(), np.r_["mine"].tolist()
            try:
                {expression}
            except NameError as exc:
                return [found, "NameError", str(exc)]
            return [found, "found"]
        """
    assert ok_result(pool.run(source))[:2] == [[[[1, 2]], [[1, 2]]], "NameError"]


def test_classes_made_for_a_script_say_they_are_the_scripts(pool: LivePool) -> None:
    """namedtuple, typing.NamedTuple, TypedDict and the Enum functional API name the class
    after the script's module, not after the sandbox code that passed the call on."""
    source = """
        import collections, enum, typing
        def execute(ctx):
            made = [
                collections.namedtuple("P", "x y"),
                typing.NamedTuple("T", [("x", int)]),
                typing.TypedDict("D", {"x": int}),
                enum.Enum("E", "A B"),
                enum.IntEnum("I", "A B"),
            ]
            return [str(kind) for kind in made]
        """
    assert ok_result(pool.run(source)) == [
        "<class 'script.P'>",
        "<class 'script.T'>",
        "<class 'script.D'>",
        "<enum 'E'>",
        "<enum 'I'>",
    ]
