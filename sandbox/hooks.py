"""Child-wide hooks: what libraries do on a script's behalf (unpickle, compile strings).

The policy guards what a script reaches; some libraries, given harmless-looking input,
unpickle bytes or compile strings themselves (``typing`` and pydantic evaluate string
annotations, ``dataclasses`` and ``namedtuple`` generate methods from field names,
``functools.singledispatch`` reads annotations, pandas' pickle compatibility module unpickles).
For the rest of the run, after the warm parent has imported everything:

- ``pickle.load``/``loads``/``Unpickler`` (C and Python versions) refuse (and the audit hook,
  ``sandbox.audit``, refuses every unpickler's global lookups, bound before this or not);
- ``compile``, ``eval`` and ``exec`` given a string, bytes or an AST by anything but the import
  system (with no script code on the way) or the sandbox itself compile it under the sandbox's
  rules: :class:`~sandbox.compiler.GeneratedCode`, the script rules with the generators' own
  private names allowed, so attribute access, calls and loops go through the guards, which are
  lent when the namespace lacks them. No module is trusted for what it generates: a field name
  or an annotation may be a string the script chose;
- ``eval``/``exec`` of a code object made since then, other than this way, cannot happen (the
  audit hook refuses making code objects any other way).
"""

from __future__ import annotations

import ast
import builtins
import os
import sys
import weakref
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, NoReturn

import RestrictedPython

from sandbox.compiler import GeneratedCode, restricted
from sandbox.doors import private_name

Refuse = Callable[[str], NoReturn]

# Code whose compiles are the sandbox's own: its compiler and RestrictedPython under it, by the
# files their code comes from (a frame's globals can be rewritten by a script; its code cannot).
TRUSTED_FOLDERS = tuple(
    {
        os.path.dirname(spelling) + os.sep
        for path in (__file__, RestrictedPython.__file__ or "")
        for spelling in (os.path.abspath(path), os.path.realpath(path))
    }
)
IMPORT_SYSTEM = "<frozen importlib._bootstrap"
SCRIPT_FILENAME = "<script>"
SANDBOXED = "<sandboxed "
_GUARD = "_getattr_"
_STACK_LIMIT = 200


def code_file(frame: FrameType | None) -> str:
    """The file the code of ``frame`` was compiled from, or '' where there is no frame."""
    return "" if frame is None else frame.f_code.co_filename


def is_script_frame(frame: FrameType) -> bool:
    """Code a script wrote, or code compiled under the sandbox rules at run time."""
    filename = frame.f_code.co_filename
    return filename == SCRIPT_FILENAME or filename.startswith(SANDBOXED)


def is_import_system(frame: FrameType | None) -> bool:
    return code_file(frame).startswith(IMPORT_SYSTEM)


def is_sandbox(frame: FrameType | None) -> bool:
    return code_file(frame).startswith(TRUSTED_FOLDERS)


def trusted(frame: FrameType | None) -> bool:
    """Whether a compile or exec made from ``frame`` is the sandbox's or the import system's.

    Decided by where the code comes from, never by a frame's globals. The import system's
    counts only when no script frame lies between it and the call (a script's code that runs
    during an import is still a script's)."""
    if frame is None:
        return False
    if is_sandbox(frame):
        return True
    depth = 0
    while frame is not None and depth < _STACK_LIMIT:
        if is_script_frame(frame):
            return False
        if is_import_system(frame):
            return True
        frame = frame.f_back
        depth += 1
    return False


def install(
    refuse: Refuse,
    guards: Callable[[], dict[str, Any]],
    lend: Callable[[dict[str, Any]], dict[str, Any]],
) -> weakref.WeakSet[CodeType]:
    """Patch pickle and the compile/eval/exec builtins for the rest of this process; return the
    set of code objects compiled under the rules.

    ``guards`` makes the guards a script namespace has; ``lend`` turns a library's namespace
    into one generated code may run in (what the policy refuses taken out, the guards added).
    """
    _refuse_unpickling(refuse)
    real_compile = builtins.compile
    real_eval = builtins.eval
    real_exec = builtins.exec
    ours: weakref.WeakSet[CodeType] = weakref.WeakSet()

    def restricted_compile(source: Any, filename: str, mode: Any) -> CodeType:
        if isinstance(source, bytes | bytearray | memoryview):
            source = bytes(source).decode("utf-8", "replace")
        elif isinstance(source, str):
            source = str.__str__(source)
        elif not isinstance(source, ast.AST):
            refuse(f"compiling a {type(source).__name__}")
        if mode not in ("exec", "eval", "single"):
            refuse(f"compiling in mode {str(mode)[:20]!r}")
        try:
            tree = source if isinstance(source, ast.AST) else ast.parse(source, filename, mode)
            code, errors = restricted(tree, f"{SANDBOXED}{filename}>", mode, GeneratedCode)
        except (SyntaxError, TypeError, ValueError) as exc:
            refuse(f"compiling a string that breaks the sandbox rules: {exc}")
        if code is None:
            refuse(f"compiling a string that breaks the sandbox rules: {'; '.join(errors)}")
        ours.add(code)
        return code

    def checked_compile(source: Any, filename: Any, mode: Any, flags: int = 0, *args: Any,
                        **kwargs: Any) -> Any:  # fmt: skip
        if trusted(sys._getframe(1)):
            code = real_compile(source, filename, mode, flags, *args, **kwargs)
            if isinstance(code, CodeType):
                ours.add(code)
            return code
        if flags & ast.PyCF_ONLY_AST and isinstance(source, str | bytes):
            # A syntax tree only: nothing runs, and compiling the tree is checked in turn.
            return real_compile(source, filename, mode, flags, *args, **kwargs)
        return restricted_compile(source, str(filename), str(mode))

    def evaluate(real: Callable[..., Any], mode: str, source: Any, *args: Any) -> Any:
        frame = sys._getframe(2)
        if not isinstance(source, CodeType):
            if trusted(frame):
                return real(source, *args)
            source = restricted_compile(source, "<string>", mode)
        elif source not in ours:
            # Code made before these hooks: a library's own (an annotation it compiled when it
            # was imported). No code can be made since but through them (the audit hook refuses
            # code.__new__, marshal and compiling below them), and a script never runs it.
            if frame is None or is_script_frame(frame):
                refuse("running a code object from a script")
            return real(source, *args)
        if args and isinstance(args[0], dict) and _GUARD not in args[0] and not trusted(frame):
            # A library's namespace (a module's globals, builtins' own): what the policy refuses
            # is taken out of a copy, and the guards the code was compiled against are lent.
            args = (lend(args[0]), *args[1:])
        return real(source, *args)

    def checked_eval(source: Any, *args: Any) -> Any:
        return evaluate(real_eval, "eval", source, *args)

    def checked_exec(source: Any, *args: Any, **kwargs: Any) -> Any:
        return evaluate(lambda *a: real_exec(*a, **kwargs), "exec", source, *args)

    builtins.compile = checked_compile
    builtins.eval = checked_eval
    builtins.exec = checked_exec
    _guard_enum_functional_api(refuse)
    return ours


def _guard_enum_functional_api(refuse: Refuse) -> None:
    """``Enum("Name", names)`` makes a class whose members are those names: a dunder among them
    becomes a method of the class (``__str__``, ``__fspath__``); ``module=`` and
    ``qualname=`` say where it was made. Neither is for scripts, whichever Enum subclass."""
    import enum  # noqa: PLC0415 - imported by the warm parent already

    metaclass: Any = enum.EnumType
    real_call = metaclass.__call__

    def call(cls: Any, value: Any, names: Any = None, *args: Any, **kwargs: Any) -> Any:
        if names is not None:
            private = private_name(names)
            if private is not None:
                refuse(f"an enum member named '{private[:60]}'")
        for forged in ("module", "qualname"):
            if kwargs.get(forged) is not None:
                refuse(f"an enum made with {forged}=")
        if names is None and not args:
            return real_call(cls, value, **kwargs)
        return real_call(cls, value, names, *args, **kwargs)

    metaclass.__call__ = call


def _refuse_unpickling(refuse: Refuse) -> None:
    """Functions become refusals; the unpickler classes stay classes (libraries subclass them
    at import time) but can neither load nor look up anything."""
    import pickle  # noqa: PLC0415 - patched here, never used by a script directly

    def refused(what: str) -> Callable[..., NoReturn]:
        def stop(*_args: Any, **_kwargs: Any) -> NoReturn:
            refuse(f"{what} (nothing is unpickled inside the sandbox)")

        return stop

    class Unpickler(pickle.Unpickler):
        load = refused("pickle.Unpickler.load")
        find_class = refused("pickle.Unpickler.find_class")

    python_unpickler: Any = getattr(pickle, "_Unpickler", None)
    if python_unpickler is not None:
        python_unpickler.load = refused("pickle.Unpickler.load")
        python_unpickler.find_class = refused("pickle.Unpickler.find_class")
    modules: tuple[Any, ...] = (pickle, sys.modules.get("_pickle"))
    for module in modules:
        if module is None:
            continue
        for name in ("load", "loads", "_load", "_loads"):
            if hasattr(module, name):
                setattr(module, name, refused(f"pickle.{name.lstrip('_')}"))
        module.Unpickler = Unpickler
