"""Child-wide hooks: what libraries do on a script's behalf (unpickle, compile strings).

The policy guards what a script reaches; some libraries, given harmless-looking input,
unpickle bytes or compile strings themselves (``typing`` and pydantic evaluate string
annotations, ``dataclasses`` and ``namedtuple`` generate methods from field names,
``functools.singledispatch`` reads annotations, pandas' pickle compatibility module unpickles).
For the rest of the run, after the warm parent has imported everything:

- ``pickle.load``/``loads``/``Unpickler`` (C and Python versions) refuse (and the audit hook,
  ``sandbox.audit``, refuses every unpickler's global lookups, bound before this or not);
- ``compile``, ``eval`` and ``exec`` given a string, bytes or an AST compile it under the
  sandbox's rules unless the sandbox or the import system asked (``sandbox.trust``):
  :class:`~sandbox.compiler.GeneratedCode`, the script rules with the generators' own private
  names allowed, so attribute access, calls and loops go through the guards. The code runs in a
  script's own namespace as it is and in any other (a module's globals, a fresh dict) as the
  policy lends it: a copy without what a script may not hold, with the guards added. No module
  is trusted for what it generates: a field name or an annotation may be a string the script
  chose;
- ``eval``/``exec`` of a code object made since then, other than this way, cannot happen (the
  audit hook refuses making code objects any other way), and a script never runs one itself.
"""

from __future__ import annotations

import ast
import builtins
import sys
from collections.abc import Callable, Mapping
from types import CodeType
from typing import Any, NoReturn

from sandbox.compiler import GeneratedCode, restricted
from sandbox.doors import private_name
from sandbox.trust import SANDBOXED, is_script_frame, trusted, trusted_code

Refuse = Callable[[str], NoReturn]
Ours = dict[int, CodeType]
"""Code compiled under the rules since the hooks went in, by id (kept alive: code objects
compare by value, so a set would let one equal object stand for another)."""

_AST_TYPES = frozenset(
    value for value in vars(ast).values() if isinstance(value, type) and issubclass(value, ast.AST)
)
_TREE_LEAVES = frozenset({str, bytes, int, float, complex, bool, type(None), type(...)})


def install(
    refuse: Refuse,
    lend: Callable[[Mapping[str, Any]], dict[str, Any]],
    is_script_namespace: Callable[[dict[str, Any]], bool],
) -> Ours:
    """Patch pickle and the compile/eval/exec builtins for the rest of this process; return the
    code objects compiled under the rules (filled as they are made).

    ``lend`` turns a library's namespace into one generated code may run in (what the policy
    refuses taken out, the guards added); a script's own namespace has the guards already.
    """
    _refuse_unpickling(refuse)
    hooks = CompileHooks(refuse, lend, is_script_namespace)
    builtins.compile = hooks.compile
    builtins.eval = hooks.eval
    builtins.exec = hooks.exec
    _guard_enum_functional_api(refuse)
    return hooks.ours


class CompileHooks:
    """``compile``, ``eval`` and ``exec`` as the rest of the run has them.

    The methods run on what a script passed: they look at it only through exact built-in
    types (``type(x) is str``, never ``isinstance`` or ``str(x)``, which could run a script's
    own methods or a C function it planted there) before anything else happens; as the frames
    that compile for real they are trusted code (``sandbox.trust``).
    """

    def __init__(
        self,
        refuse: Refuse,
        lend: Callable[[Mapping[str, Any]], dict[str, Any]],
        is_script_namespace: Callable[[dict[str, Any]], bool],
    ) -> None:
        self.refuse = refuse
        self.lend = lend
        self.is_script_namespace = is_script_namespace
        # The names lend() adds: they are not copied back into a library's namespace.
        self.guard_names = frozenset(lend({}))
        self.real_compile = builtins.compile
        self.real_eval = builtins.eval
        self.real_exec = builtins.exec
        self.ours: Ours = {}

    @trusted_code
    def restricted_compile(self, source: Any, filename: str, mode: str) -> CodeType:
        """``source`` (plain already) compiled under the rules for generated code."""
        refuse = self.refuse
        try:
            tree = source if type(source) in _AST_TYPES else ast.parse(source, filename, mode)
            code, errors = restricted(tree, f"{SANDBOXED}{filename}>", mode, GeneratedCode)
        except (SyntaxError, TypeError, ValueError, RecursionError) as exc:
            refuse(f"compiling a string that breaks the sandbox rules: {_first_line(exc)}")
        if code is None:
            refuse(f"compiling a string that breaks the sandbox rules: {'; '.join(errors)}")
        self.ours[id(code)] = code
        return code

    @trusted_code
    def compile(self, source: Any, filename: Any, mode: Any, flags: Any = 0, *args: Any,
                **kwargs: Any) -> Any:  # fmt: skip
        if trusted(sys._getframe(1), loading=True):
            code = self.real_compile(source, filename, mode, flags, *args, **kwargs)
            if type(code) is CodeType:
                self.ours[id(code)] = code
            return code
        source = _plain_source(source, self.refuse)
        name = _plain_text(filename, "<string>")
        mode = _mode(mode, self.refuse)
        if type(flags) is not int:
            self.refuse("compiling with flags that are not an int")
        if flags & ast.PyCF_ONLY_AST:
            # A syntax tree only: nothing runs, and compiling the tree is checked in turn.
            if type(source) in _AST_TYPES:
                return source
            return self.real_compile(source, name, mode, ast.PyCF_ONLY_AST, dont_inherit=True)
        return self.restricted_compile(source, name, mode)

    @trusted_code
    def eval(self, source: Any, *args: Any) -> Any:
        return self._evaluate(self.real_eval, "eval", source, *args)

    @trusted_code
    def exec(self, source: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            self.refuse("exec with keyword arguments")
        return self._evaluate(self.real_exec, "exec", source, *args)

    @trusted_code
    def _evaluate(self, real: Callable[..., Any], mode: str, source: Any, *args: Any) -> Any:
        refuse = self.refuse
        frame = sys._getframe(2)
        if type(source) is not CodeType:
            if trusted(frame):
                if not args and frame is not None:
                    args = (frame.f_globals, frame.f_locals)  # the caller's, as unhooked
                return real(source, *args)
            source = self.restricted_compile(_plain_source(source, refuse), "<string>", mode)
        elif self.ours.get(id(source)) is not source:
            # Code made before these hooks: a library's own (an annotation it compiled when it
            # was imported). No code can be made since but through them (the audit hook refuses
            # code.__new__, marshal and compiling below them), and a script never runs it.
            if frame is None or is_script_frame(frame):
                refuse("running a code object from a script")
            return real(source, *args)
        if not args:
            refuse("running code without a namespace of its own")
        if len(args) > 2:
            refuse("running code with more than a globals and a locals namespace")
        if type(args[0]) is not dict:
            refuse("running code with globals that are not a plain dict")
        # Each namespace but a script's own (a module's globals, builtins' own, a fresh dict,
        # pydantic's mapping of a class's names) is lent: a plain dict copy without what the
        # policy refuses, with the guards added. The locals too: names resolve there first
        # (typing passes a module's globals as locals).
        lent = tuple(
            namespace
            if type(namespace) is dict and self.is_script_namespace(namespace)
            else self.lend(namespace)
            for namespace in args
        )
        if len(args) == 2 and args[1] is args[0]:
            lent = (lent[0], lent[0])
        result = real(source, *lent)
        if mode == "exec" and len(args) == 2 and type(args[1]) is dict and _scratch_locals(args):
            # What the code defined in a fresh locals dict, where the library reads it back
            # (dataclasses' __create_fn__): new names only, never into a module's namespace.
            _copy_back(lent[1], args[1], self.guard_names)
        return result


def _scratch_locals(args: tuple[Any, ...]) -> bool:
    """Locals of their own, not the globals and not a module's namespace."""
    return args[1] is not args[0] and "__name__" not in args[1]


def _copy_back(lent: dict[str, Any], original: dict[str, Any], guards: frozenset[str]) -> None:
    for key, value in lent.items():
        if key not in original and key not in guards:
            original[key] = value


def _plain_source(source: Any, refuse: Refuse) -> Any:
    """What a script's compile may be given, as exact built-in values: text, bytes, or a
    syntax tree made only of the ``ast`` module's own nodes and plain values."""
    kind = type(source)
    if kind is str or kind is bytes:
        return source
    if issubclass(kind, str):
        return str.__str__(source)
    if issubclass(kind, bytes | bytearray | memoryview):
        return memoryview(source).tobytes()  # the buffer itself, no method of the object
    if kind not in _AST_TYPES:
        refuse(f"compiling a {kind.__name__}")
    _check_tree(source, refuse)
    return source


def _check_tree(node: Any, refuse: Refuse, depth: int = 0) -> None:
    if depth > 500:
        refuse("compiling a syntax tree nested too deeply")
    kind = type(node)
    if kind in _TREE_LEAVES:
        return
    if kind is list or kind is tuple or kind is frozenset:
        for item in node:
            _check_tree(item, refuse, depth + 1)
        return
    if kind not in _AST_TYPES:
        refuse(f"compiling a syntax tree holding a {kind.__name__}")
    values = object.__getattribute__(node, "__dict__")
    if type(values) is not dict:
        refuse("compiling a syntax tree with a namespace of its own")
    for value in values.values():
        _check_tree(value, refuse, depth + 1)


def _plain_text(value: Any, default: str) -> str:
    if issubclass(type(value), str):
        return str.__str__(value)
    return default


def _mode(mode: Any, refuse: Refuse) -> str:
    text = _plain_text(mode, "")
    if text not in ("exec", "eval", "single"):
        refuse("compiling in a mode other than exec, eval or single")
    return text


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


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
        if names is not None:
            # Enum names the class after its caller's module, which would be this hook's.
            kwargs["module"] = _module_of(sys._getframe(1))
        if names is None and not args:
            return real_call(cls, value, **kwargs)
        return real_call(cls, value, names, *args, **kwargs)

    metaclass.__call__ = call


def _module_of(frame: Any) -> str:
    name = frame.f_globals.get("__name__") if frame is not None else None
    return name if type(name) is str else "script"


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
