"""Child-wide hooks: what libraries do on a script's behalf (unpickle, compile strings).

The policy guards what a script reaches; some libraries, given harmless-looking input,
unpickle bytes or compile strings themselves (``typing`` and pydantic evaluate string
annotations, ``functools.singledispatch`` reads them, pandas' pickle compatibility module
unpickles). For the rest of the run, after the warm parent has imported everything:

- ``pickle.load``/``loads``/``Unpickler`` (C and Python versions) refuse;
- ``compile``, ``eval`` and ``exec`` called with a string by anything but a trusted code
  generator compile it under the same RestrictedPython rules as a script, so attribute access
  goes through the guards, and evaluation supplies the guards when the namespace lacks them.
"""

from __future__ import annotations

import ast
import builtins
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

from RestrictedPython.compile import compile_restricted

from sandbox.compiler import Transformer

Refuse = Callable[[str], NoReturn]

# Modules whose own generated code (from identifiers they validated) is compiled as it is, and
# the import system, RestrictedPython and the sandbox itself, which compile trusted code.
TRUSTED_CODE_GENERATORS = frozenset(
    {"dataclasses", "collections", "importlib", "RestrictedPython", "sandbox"}
)
_GUARD = "_getattr_"


def install(refuse: Refuse, guards: Callable[[], dict[str, Any]]) -> None:
    """Patch pickle and the compile/eval/exec builtins for the rest of this process."""
    _refuse_unpickling(refuse)
    real_compile = builtins.compile
    real_eval = builtins.eval
    real_exec = builtins.exec
    restricted: dict[int, Any] = {}  # id -> code object compiled under the rules (kept alive)

    def trusted(depth: int) -> bool:
        frame: FrameType | None = sys._getframe(depth)
        assert frame is not None
        caller = frame.f_globals.get("__name__", "")
        if str(caller).split(".")[0] in TRUSTED_CODE_GENERATORS:
            return True
        # Code a library runs while it is being imported is the library's own, not a script's.
        while frame is not None:
            if frame.f_globals.get("__name__") == "importlib._bootstrap":
                return True
            frame = frame.f_back
        return False

    def restricted_compile(source: Any, filename: str, mode: str) -> Any:
        if isinstance(source, bytes):
            source = source.decode("utf-8", "replace")
        try:
            code = compile_restricted(source, filename, mode, policy=Transformer)  # type: ignore[arg-type]
        except SyntaxError as exc:
            refuse(f"compiling a string that breaks the sandbox rules: {exc}")
        restricted[id(code)] = code
        return code

    def checked_compile(source: Any, filename: Any, mode: Any, flags: int = 0, *args: Any,
                        **kwargs: Any) -> Any:  # fmt: skip
        if flags & ast.PyCF_ONLY_AST or not isinstance(source, str | bytes | ast.Module):
            return real_compile(source, filename, mode, flags, *args, **kwargs)
        if trusted(2):
            return real_compile(source, filename, mode, flags, *args, **kwargs)
        return restricted_compile(source, str(filename), str(mode))

    def evaluate(real: Callable[..., Any], mode: str, source: Any, *args: Any) -> Any:
        if isinstance(source, str | bytes) and not trusted(3):
            source = restricted_compile(source, "<string>", mode)
        if id(source) in restricted and args and isinstance(args[0], dict):
            namespace = args[0]
            if _GUARD not in namespace:
                # A library's namespace: lend it the guards the code was compiled against.
                args = ({**namespace, **guards()}, *args[1:])
        return real(source, *args)

    def checked_eval(source: Any, *args: Any) -> Any:
        return evaluate(real_eval, "eval", source, *args)

    def checked_exec(source: Any, *args: Any, **kwargs: Any) -> Any:
        return evaluate(lambda *a: real_exec(*a, **kwargs), "exec", source, *args)

    builtins.compile = checked_compile
    builtins.eval = checked_eval
    builtins.exec = checked_exec


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
