"""The whitelist layer: which builtins, modules and attributes a script may reach."""

from __future__ import annotations

import _pickle
import builtins
import functools
import io
import operator
import pickle
import sys
import types
import zipfile
from collections import UserString
from collections.abc import Callable, Iterable, Mapping
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
from typing import Any, NoReturn

from RestrictedPython.Guards import (
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safe_builtins,
)
from RestrictedPython.transformer import INSPECT_ATTRIBUTES

from sandbox.compiler import PLAIN_CALLEES, TEMPLATE_ATTRIBUTES
from sandbox.config import FORBIDDEN_MODULES, FORBIDDEN_OWNERS, FORBIDDEN_SUBMODULES
from sandbox.doors import Doors
from sandbox.errors import PolicyViolation

# Builtins a script gets on top of RestrictedPython's ``safe_builtins``. Functions that
# iterate in C (sum, sorted, map, ...) are safe here because iteration itself is not guarded:
# what is guarded is reaching objects, and that happens through attributes, items and imports.
_EXTRA_BUILTINS: tuple[str, ...] = (
    "all", "any", "ascii", "bin", "bytearray", "bytes", "classmethod", "dict", "dir",
    "enumerate", "filter", "format", "frozenset", "iter", "list", "map", "max", "memoryview",
    "min", "next", "object", "property", "reversed", "set", "sorted", "staticmethod", "sum",
    "super", "tuple", "zip", "NotImplemented",
)  # fmt: skip

# Builtins that are refused with a policy violation when a script calls them.
REFUSED_BUILTINS: tuple[str, ...] = (
    "eval", "exec", "compile", "open", "input", "breakpoint", "globals", "locals", "vars",
    "exit", "quit", "help", "delattr", "setattr", "getattr", "hasattr", "type", "__import__",
)  # fmt: skip

_INPLACE_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
    "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow,
    "<<=": operator.ilshift, ">>=": operator.irshift, "&=": operator.iand,
    "^=": operator.ixor, "|=": operator.ior, "@=": operator.imatmul,
}  # fmt: skip

_MISSING = object()

# Attribute names no script may read, on anything: interpreter internals RestrictedPython does
# not list (Cython functions expose their globals and code under these names), and numpy's
# door to raw memory.
REFUSED_ATTRIBUTES = INSPECT_ATTRIBUTES | frozenset({
    "func_globals", "func_code", "func_closure", "func_dict", "ctypes",
})  # fmt: skip
# Classes no script may hold, nor their subclasses or instances, wherever a library bound them
# (nltk.picklesec's unpicklers subclass the C Unpickler at import time; nltk.pathsec's ZipFile
# opens paths): they unpickle or open files by path.
_REFUSED_BASES: tuple[type, ...] = (
    _pickle.Unpickler,
    pickle._Unpickler,
    _pickle.Pickler,
    pickle._Pickler,
    io.FileIO,
    zipfile.ZipFile,
)
# Instances of the types module's own types that typing syntax makes (int | None, list[int]).
_HARMLESS_TYPES = frozenset({types.UnionType, types.GenericAlias, types.NoneType,
                             types.EllipsisType, types.NotImplementedType})  # fmt: skip
# Values a script may hold without a look: nothing in them leads anywhere.
_PLAIN = frozenset({str, int, float, bool, type(None), bytes, complex, list, tuple, dict, set,
                    frozenset, range, slice, bytearray})  # fmt: skip
_PLAIN_ITEMS = frozenset({str, bytes, bytearray, range})


def exact(name: object, what: str = "attribute name") -> str:
    """``name`` as an exact ``str``: a subclass is copied, never asked (its ``startswith``,
    ``__eq__`` or ``__hash__`` could answer anything)."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, not {type(name).__name__}")
    return str.__str__(name)


def _describe(obj: object) -> str:
    if isinstance(obj, ModuleType):
        return obj.__name__
    if isinstance(obj, type):
        return obj.__qualname__
    return type(obj).__qualname__


class Policy:
    """The guards one run uses; it remembers every refusal, caught or not."""

    def __init__(
        self,
        allowed_modules: Iterable[str],
        scratch: str | None = None,
        extra_builtins: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.allowed_modules = frozenset(allowed_modules) - FORBIDDEN_MODULES
        self._extra_builtins = dict(extra_builtins or {})
        self.violations: list[str] = []
        # By id, with the objects kept alive here so that no id is ever another object's.
        self._refused: dict[int, object] = {}
        self.refuse_builtins_as_they_are()
        self.doors = Doors(self.refuse, scratch)
        self._kinds: dict[type, object] = {}
        self._stand_ins: dict[int, str] = {}
        self._table = self._builtins()
        self._guards = self._guard_table()
        # What a script is given to call: called as it is (_fn_), never a metaclass.
        given = [*self._table.values(), *self._guards.values()]
        self._builtin_ids = frozenset(id(value) for value in given if value is not type)
        self._plain_callees = frozenset(
            id(self._table[name]) for name in PLAIN_CALLEES if name in self._table
        )
        self._script_namespaces: dict[int, dict[str, Any]] = {}

    def refuse_builtins_as_they_are(self) -> None:
        """Refuse the builtins a script may not call by identity, wherever they are reached:
        the ones there are now (the compile hooks replace compile, eval and exec) as well as
        the ones refused before, and ``str.format`` (it walks attributes) in every form."""
        refused = [getattr(builtins, name) for name in REFUSED_BUILTINS if hasattr(builtins, name)]
        refused += [str.format, str.format_map, UserString.format, UserString.format_map]
        for value in refused:
            self._refused[id(value)] = value

    # -- refusing ---------------------------------------------------------------------------

    def refuse(self, what: str) -> NoReturn:
        """Record a refusal and raise it into the script."""
        self.violations.append(what)
        raise PolicyViolation(what)

    def module_allowed(self, name: str) -> bool:
        """True if a module of this dotted name is on the allow list."""
        parts = name.split(".")
        if parts[0] in FORBIDDEN_MODULES or _within(name, FORBIDDEN_SUBMODULES):
            return False
        if any(part.startswith("_") for part in parts):
            return False  # a private module, as a private attribute would be
        return parts[0] in self.allowed_modules

    def check(self, value: Any, where: Where) -> Any:
        """Return ``value`` if a script may hold it (a door in its guarded form), refuse it
        otherwise. ``where`` names how it was reached (a string, or (object, attribute))."""
        kind = type(value)
        if kind in _PLAIN:
            return value
        if kind is BuiltinFunctionType and type(value.__self__) in _PLAIN:
            # A method of a plain value ("x".upper, [].append): never a door but these two.
            if value.__name__ in _FORMATTERS and isinstance(value.__self__, str):
                self.refuse(f"'{_where(where)}' (it can walk attributes; use an f-string)")
            return value
        if id(value) in self._refused:
            self.refuse(f"'{_where(where)}' is not available to scripts")
        if self._kinds.get(kind) is _KIND_OK:
            return value  # an instance of a class already found harmless, and no door
        reason = self.refusal(value, where)
        if reason is not None:
            self.refuse(reason)
        return self.doors.guard(value, _where(where))

    def lend(self, namespace: Mapping[str, Any]) -> dict[str, Any]:
        """A library's namespace as generated code may use it: a plain dict copy without what
        a script may not hold, doors in their guarded form, and the guards added."""
        lent: dict[str, Any] = {}
        items = dict.items(namespace) if type(namespace) is dict else namespace.items()
        for key, value in items:
            if type(key) is not str:
                continue  # names only
            if type(value) in _PLAIN:
                lent[key] = value
                continue
            door = self.doors.door(value)
            if self.refusal(value, str(key)) is None and (door is None or door.kind != "refused"):
                lent[key] = self.doors.guard(value, str(key))
        lent.update(self._guards)
        lent["__builtins__"] = dict(self._table)
        lent["_print_"] = _no_print_at_all
        return lent

    def refusal(self, value: Any, where: Where, depth: int = 0) -> str | None:
        """Why a script may not hold ``value`` (None if it may, doors aside).

        Decided by ``type(value)``, never ``isinstance``: an object's ``__class__`` may claim
        anything. The sandbox's own objects (its guards, classes and module globals) are never
        a script's, but for the guards it was given and the doors it was handed. A callable
        that calls another (a partial, a bound method, a property, a cached or static
        function) is refused with what it calls, and with the object a method is bound to."""
        if depth > _WRAPPING_LIMIT:
            return f"'{_where(where)}' wraps callables too deeply to be checked"
        kind = type(value)
        if self._kinds.get(kind) is _KIND_OK:
            return None
        if id(value) in self._builtin_ids:
            return None  # what the script was given: its builtins (stand-ins too) and guards
        if issubclass(kind, ModuleType):
            if not self.module_allowed(value.__name__):
                return f"module '{value.__name__}' (reached through {_where(where)})"
            return None
        if id(value) in self._refused or id(value) in _REFUSED_TYPE_IDS:
            return f"'{_where(where)}' is not available to scripts"
        if issubclass(kind, types.FrameType):
            return f"'{_where(where)}' is a frame"
        if issubclass(kind, _REFUSED_BASES) or (
            issubclass(kind, type) and issubclass(value, _REFUSED_BASES)
        ):
            return f"'{_where(where)}' unpickles or opens files by path ({_describe(value)})"
        if issubclass(kind, BuiltinFunctionType):
            owner = value.__self__
            if type(owner) is ModuleType:
                if not self._owner_allowed(owner.__name__):
                    return f"'{_where(where)}' belongs to module '{owner.__name__}'"
                return None
            if owner is None or type(owner) in _PLAIN:
                return None
            return self.refusal(owner, where, depth + 1)  # a method of what it is bound to
        if issubclass(kind, MethodType):
            function = value.__func__
            if _sandbox_owned(function):
                return f"'{_where(where)}' is the sandbox's own"
            return self.refusal(function, where, depth + 1) or self.refusal(
                value.__self__, where, depth + 1
            )
        if issubclass(kind, FunctionType | type):
            owner_name = value.__module__
            if isinstance(owner_name, str) and owner_name.startswith("sandbox."):
                if value in self.doors.wrappers:
                    return None
                return f"'{_where(where)}' is the sandbox's own"
            if (
                isinstance(owner_name, str)
                and not self._owner_allowed(owner_name)
                and not _made_for_a_script(value, owner_name)
            ):
                return f"'{_where(where)}' belongs to module '{owner_name}'"
            if issubclass(kind, type) and issubclass(value, type):
                # A metaclass builds classes from any namespace: dunders and all.
                return f"'{_where(where)}' is a metaclass"
            return None
        # An object whose class belongs to a forbidden module (os.environ, a thread, a socket,
        # a logger handler), or to the sandbox, is refused like the module itself; so is a
        # wrapped function (functools.lru_cache) of such a module.
        owner_name = getattr(kind, "__module__", "builtins")
        if (
            isinstance(owner_name, str)
            and kind not in _HARMLESS_TYPES
            and (not self._owner_allowed(owner_name) or owner_name.startswith("sandbox."))
            and not _made_for_a_script(kind, owner_name)
        ):
            return f"'{_where(where)}' is a {kind.__name__} of module '{owner_name}'"
        inner = _called_by(value, kind)
        if inner:
            for called in inner:
                reason = None if type(called) in _PLAIN else self.refusal(called, where, depth + 1)
                if reason is not None:
                    return reason
        if callable(value):
            wrapped = _wrapped_module(value)
            if wrapped is not None and (
                not self._owner_allowed(wrapped) or wrapped.startswith("sandbox.")
            ):
                return f"'{_where(where)}' belongs to module '{wrapped}'"
        elif not inner and self.doors.door(value) is None:
            self._kinds[kind] = _KIND_OK  # what holds for one such instance holds for all
        return None

    @staticmethod
    def _owner_allowed(module_name: str) -> bool:
        # Builtin types and functions are everywhere; the dangerous ones are refused by identity.
        if module_name == "builtins":
            return True
        if _within(module_name, FORBIDDEN_OWNERS):
            return False
        # The top-level package decides: openai.types and pandas.api.types are those
        # libraries' own, not the standard library's types (a library's dangerous parts are
        # listed in FORBIDDEN_SUBMODULES and FORBIDDEN_OWNERS).
        return module_name.split(".", 1)[0] not in FORBIDDEN_MODULES

    # -- guards RestrictedPython calls --------------------------------------------------------

    def guarded_getattr(self, obj: Any, name: Any, default: Any = _MISSING) -> Any:
        """``obj.name`` as a script sees it: no private names, no interpreter internals."""
        name = exact(name)
        if name.startswith("_"):
            self.refuse(f"attribute '{_where((obj, name))}' (names starting with '_' are private)")
        return self._attribute(obj, name, default)

    def template_getattr(self, obj: Any, name: Any) -> Any:
        """Attribute access in code a library generated at run time: its template's dunders
        (``self.__class__.__qualname__``) as well as public names, nothing else."""
        name = exact(name)
        if name.startswith("_") and name not in TEMPLATE_ATTRIBUTES:
            self.refuse(f"attribute '{_where((obj, name))}' in generated code")
        return self._attribute(obj, name, _MISSING)

    def _attribute(self, obj: Any, name: str, default: Any) -> Any:
        if name in REFUSED_ATTRIBUTES:
            self.refuse(f"attribute '{_where((obj, name))}' (interpreter internals)")
        if name in _FORMATTERS and (
            isinstance(obj, str | UserString)
            or (isinstance(obj, type) and issubclass(obj, str | UserString))
        ):
            self.refuse(f"'{_where((obj, name))}' (it can walk attributes; use an f-string)")
        if type(obj) not in _PLAIN:
            # Nothing is read off what a script may not hold itself (a forbidden module that
            # reached it inside a container, a refused function, a metaclass).
            self.check(obj, (obj, ""))
        value = getattr(obj, name) if default is _MISSING else getattr(obj, name, default)
        return self.check(value, (obj, name))

    def guarded_hasattr(self, obj: Any, name: Any) -> bool:
        """``hasattr`` that answers through the same guard as attribute access."""
        try:
            self.guarded_getattr(obj, name)
        except AttributeError:
            return False
        return True

    def guarded_getitem(self, obj: Any, key: Any) -> Any:
        """``obj[key]``, refusing what an item may not hand out (a module, a refused function)."""
        return self.check(obj[key], f"{_describe(obj)}[...]")

    def guarded_write(self, obj: Any) -> Any:
        """The target of an attribute or item assignment: anything but a module."""
        if isinstance(obj, ModuleType):
            self.refuse(f"changing module '{obj.__name__}'")
        return obj

    def guarded_setattr(self, obj: Any, name: Any, value: Any) -> None:
        """``setattr`` with the rules of ``obj.name = value``."""
        name = exact(name)
        if name.startswith("_"):
            self.refuse(f"setting attribute '{name}' (names starting with '_' are private)")
        setattr(self.guarded_write(obj), name, value)

    def guarded_import(
        self,
        name: str,
        globals: dict[str, Any] | None = None,  # noqa: A002 - the signature of __import__
        locals: dict[str, Any] | None = None,  # noqa: A002
        fromlist: Iterable[str] | None = (),
        level: int = 0,
    ) -> ModuleType:
        """``__import__`` that admits only allowed modules and checks each imported name."""
        if type(fromlist) is list:
            return self._library_import(name, fromlist)
        if level != 0:
            self.refuse("relative import")
        name = exact(name, "module name")
        if not self.module_allowed(name):
            self.refuse(f"import of module '{name}' (not on the allowed list)")
        fromlist = tuple(exact(item, "imported name") for item in fromlist or ())
        module: ModuleType = __import__(name, globals, locals, fromlist, 0)
        if fromlist:
            leaf = sys.modules[name]
            for item in fromlist:
                if item == "*":
                    self.refuse(f"'from {name} import *'")
                if item.startswith("_"):
                    self.refuse(f"importing private name '{item}' from '{name}'")
                value = getattr(leaf, item, _MISSING)
                if value is _MISSING:
                    # Let the import machinery try a submodule import and raise ImportError.
                    module = __import__(name, globals, locals, (item,), 0)
                    value = getattr(sys.modules[name], item, None)
                self.check(value, f"{name}.{item}")
        return module

    def _library_import(self, name: Any, fromlist: list[Any]) -> ModuleType:
        """An import a C extension makes for itself (``PyImport_Import``, which passes a list
        as ``fromlist``; an ``import`` statement never does) while a script's frame is the
        current one, and so with the script's ``__import__``: numpy importing its own
        ``numpy._core.arrayprint`` on first use. What it imports goes to the extension, not to
        the script; still, nothing outside the allowed libraries and private helpers of the
        standard library is imported for the first time this way."""
        name = exact(name, "module name")
        if fromlist:
            self.refuse("an import with a list of names")
        top = name.partition(".")[0]
        if name not in sys.modules and (
            top in FORBIDDEN_MODULES
            or (top not in self.allowed_modules and not top.startswith("_"))
        ):
            self.refuse(f"import of module '{name}' (not on the allowed list)")
        module: ModuleType = __import__(name, None, None, (), 0)
        return module

    # -- calls (see compiler.Transformer.visit_Call) -------------------------------------------

    def guarded_callee(self, function: Any) -> Any:
        """``_fn_``: what a script calls, checked like a value it reads."""
        if id(function) in self._builtin_ids:
            name = self._stand_ins.get(id(function))
            if name is not None:
                self.refuse(f"builtin '{name}()'")  # before its arguments are looked at
            return function
        return self.check(function, (function, ""))

    def guarded_argument(self, value: Any) -> Any:
        """``_arg_``: an argument of a call, checked; no module is handed to library code."""
        if type(value) in _PLAIN:
            return value
        if issubclass(type(value), ModuleType):
            self.refuse(
                f"passing module '{value.__name__}' as an argument (a module is never handed "
                "to library code)"
            )
        return self.check(value, (value, ""))

    def guarded_plain_callee(self, function: Any) -> Any:
        """``_pfn_``: a call by the name of a builtin that takes anything (``len``, ``print``,
        ``isinstance``), whose arguments the compiler left as they are. The builtin itself is
        called as it is; anything else bound to that name checks its arguments first."""
        if id(function) in self._plain_callees:
            return function
        return functools.partial(
            _call_checked, self.guarded_callee(function), self.guarded_argument
        )

    def guarded_arguments(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """``*_args_((*b,))``: ``b`` was unpacked in the script's frame; each item checked."""
        argument = self.guarded_argument
        return tuple([argument(value) for value in values])

    def guarded_keywords(self, mapping: dict[Any, Any]) -> dict[str, Any]:
        """``**_kwargs_({**d})``: ``d`` was copied in the script's frame; keys as exact
        strings, values checked."""
        argument = self.guarded_argument
        return {exact(key, "keyword"): argument(value) for key, value in mapping.items()}

    def guarded_result(self, value: Any) -> Any:
        """``_ret_``: what a call gave back."""
        if type(value) in _PLAIN:
            return value
        return self.check(value, "the result of a call")

    def guarded_item(self, value: Any) -> Any:
        """``_item_(a[k])``: what a subscript gave back."""
        if type(value) in _PLAIN:
            return value
        return self.check(value, "an item")

    def guarded_decorated(self, value: Any) -> Any:
        """``f = _deco_(f)`` right after ``@d def f``: what the decorators made."""
        if type(value) in _PLAIN:
            return value
        return self.check(value, "what a decorator returned")

    def guarded_iter(self, iterable: Any) -> Any:
        """``for`` loops, comprehensions and unpacking: each item is checked as it comes.

        The items are taken by ``map`` (C), so a library's generator runs with the script's
        frame as its caller, as it would without the sandbox."""
        iterator = iter(iterable)
        if type(iterable) in _PLAIN_ITEMS:
            return iterator
        return map(functools.partial(self._checked_item, _describe(iterable)), iterator)

    def _checked_item(self, where: str, item: Any) -> Any:
        return item if type(item) in _PLAIN else self.check(item, f"an item of {where}")

    def check_value(self, value: Any) -> Any:
        """A value bound by ``with ... as``: checked like an attribute."""
        return value if type(value) in _PLAIN else self.check(value, "a context manager")

    def augmented_attribute(self, obj: Any, name: str, op: str, value: Any) -> None:
        """``obj.name op= value`` (the compiler checked ``name`` and wrapped ``obj``)."""
        current = self.guarded_getattr(obj, name)
        setattr(self.guarded_write(obj), name, _inplacevar(op, current, value))

    def augmented_item(self, obj: Any, key: Any, op: str, value: Any) -> None:
        """``obj[key] op= value``."""
        current = self.guarded_getitem(obj, key)
        self.guarded_write(obj)[key] = _inplacevar(op, current, value)

    def guarded_type(self, obj: Any) -> type:
        """``type(obj)`` with one argument; creating classes goes through ``class``.

        The class of a class (a metaclass) and the types that build functions, code and
        modules from raw parts are refused: they would make objects the compiler never saw.
        """
        kind = type(obj)
        if isinstance(obj, type) or id(kind) in _REFUSED_TYPE_IDS:
            self.refuse(f"type() of a {kind.__name__}")
        return kind

    def refusing(self, name: str) -> Callable[..., NoReturn]:
        """A stand-in for a refused builtin that raises a policy violation when called."""

        def refused(*_args: Any, **_kwargs: Any) -> NoReturn:
            self.refuse(f"builtin '{name}()'")

        refused.__name__ = name
        self._stand_ins[id(refused)] = name
        return refused

    # -- the script's namespace ---------------------------------------------------------------

    def _builtins(self) -> dict[str, Any]:
        """The ``__builtins__`` a script runs with (made once; each namespace gets a copy)."""
        table: dict[str, Any] = dict(safe_builtins)
        for name in _EXTRA_BUILTINS:
            table[name] = getattr(builtins, name)
        for name, value in vars(builtins).items():
            if isinstance(value, type) and issubclass(value, BaseException):
                table[name] = value
        for name in REFUSED_BUILTINS:
            table[name] = self.refusing(name)
        table["range"] = range
        table["getattr"] = self.guarded_getattr
        table["hasattr"] = self.guarded_hasattr
        table["setattr"] = self.guarded_setattr
        table["type"] = self.guarded_type
        table["__import__"] = self.guarded_import
        table["_getattr_"] = self.guarded_getattr
        table["open"] = self.doors.guarded_open
        table.update(self._extra_builtins)
        return table

    def namespace(self, print_factory: Callable[..., Any]) -> dict[str, Any]:
        """Globals for one script: builtins plus the hooks RestrictedPython compiles in."""
        namespace = {"__builtins__": dict(self._table), **self._guards, "_print_": print_factory}
        self._script_namespaces[id(namespace)] = namespace
        return namespace

    def is_script_namespace(self, namespace: dict[str, Any]) -> bool:
        """Whether ``namespace`` is one :meth:`namespace` made (a script's globals)."""
        return self._script_namespaces.get(id(namespace)) is namespace

    def _guard_table(self) -> dict[str, Any]:
        """The guards RestrictedPython and :class:`~sandbox.compiler.Transformer` compile in,
        made once: the same objects in every namespace, so they are known by identity."""
        return {
            "__name__": "script",
            "__metaclass__": type,
            "_getattr_": self.guarded_getattr,
            "_gen_getattr_": self.template_getattr,
            "_getitem_": self.guarded_getitem,
            "_getiter_": self.guarded_iter,
            "_fn_": self.guarded_callee,
            "_arg_": self.guarded_argument,
            "_args_": self.guarded_arguments,
            "_kwargs_": self.guarded_keywords,
            "_pfn_": self.guarded_plain_callee,
            "_ret_": self.guarded_result,
            "_item_": self.guarded_item,
            "_deco_": self.guarded_decorated,
            "_check_": self.check_value,
            "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
            "_unpack_sequence_": guarded_unpack_sequence,
            "_write_": self.guarded_write,
            "_inplacevar_": _inplacevar,
            "_aug_attr_": self.augmented_attribute,
            "_aug_item_": self.augmented_item,
            "_apply_": _apply,
        }


Where = str | tuple[Any, str]
_KIND_OK = object()
_FORMATTERS = frozenset({"format", "format_map"})


def _where(where: Where) -> str:
    """How a value was reached, as messages say it (built only when one is needed)."""
    if isinstance(where, tuple):
        owner, name = where
        return f"{_describe(owner)}.{name}" if name else _describe(owner)
    return where


def _sandbox_owned(function: Any) -> bool:
    owner = getattr(function, "__module__", None)
    return isinstance(owner, str) and owner.startswith("sandbox.")


_WRAPPING_LIMIT = 16
# Read through the base classes' own descriptors: a subclass could answer anything.
_PARTIAL_PARTS = (functools.partial.func, functools.partial.args, functools.partial.keywords)
_PROPERTY_PARTS: tuple[Any, ...] = (property.fget, property.fset, property.fdel)
_FUNC_OF: Any = staticmethod.__func__
_CLASSMETHOD_FUNC: Any = classmethod.__func__


def _called_by(value: Any, kind: type) -> list[Any]:
    """What a wrapper calls when it is called (or read, for a property): its function, and
    for a partial the arguments it adds."""
    if issubclass(kind, functools.partial):
        func, args, keywords = (part.__get__(value) for part in _PARTIAL_PARTS)
        return [func, *args, *dict.values(keywords)]
    if issubclass(kind, functools.partialmethod):
        return [value.__dict__.get("func")]
    if issubclass(kind, property):
        return [part.__get__(value) for part in _PROPERTY_PARTS]
    if issubclass(kind, staticmethod):
        return [_FUNC_OF.__get__(value)]
    if issubclass(kind, classmethod):
        return [_CLASSMETHOD_FUNC.__get__(value)]
    if callable(value) and not issubclass(kind, FunctionType | type):
        try:
            attributes = object.__getattribute__(value, "__dict__")
        except AttributeError:
            return []
        if type(attributes) is dict and "__wrapped__" in attributes:
            return [dict.__getitem__(attributes, "__wrapped__")]  # functools.lru_cache, wraps
    return []


def _wrapped_module(value: Any) -> str | None:
    """The module a callable wrapper (``functools.lru_cache``, ``partial``) says it wraps."""
    if not callable(value):
        return None
    try:
        attributes = object.__getattribute__(value, "__dict__")
    except AttributeError:
        return None
    owner = attributes.get("__module__") if isinstance(attributes, dict) else None
    return owner if type(owner) is str else None


def _made_for_a_script(value: Any, owner: str) -> bool:
    """A class ``types.new_class`` made at a script's request (``dataclasses.make_dataclass``
    does in 3.11) says it belongs to ``types`` but is not one of that module's classes."""
    if owner != "types" or not isinstance(value, type):
        return False
    return getattr(types, value.__qualname__, None) is not value


def _no_print_at_all(_getattr_: Any = None) -> Any:
    """``print`` in generated code that runs with a lent namespace: nowhere to go."""
    raise PolicyViolation("print in generated code")


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


# Types that make functions, code, frames, cells or modules out of raw parts.
_REFUSED_TYPES = (
    types.FunctionType, types.CodeType, types.CellType, types.ModuleType, types.MethodType,
    types.FrameType, types.TracebackType, types.GeneratorType, types.CoroutineType,
    types.AsyncGeneratorType, types.MappingProxyType, types.SimpleNamespace,
)  # fmt: skip
_REFUSED_TYPE_IDS = frozenset(id(kind) for kind in _REFUSED_TYPES)


# Where the sandbox itself calls what a script chose, the call is made from a namespace that
# holds nothing: a library function that reads its caller's frame (numpy.bmat looks names up
# in it) finds only the callee and the arguments the script holds already, never this module.
_NEUTRAL: dict[str, Any] = {"__builtins__": {}}
exec(  # noqa: S102 - a constant source, run once when the warm parent imports this module
    "def call_checked(function, argument, /, *args, **kwargs):\n"
    "    return function(*[argument(value) for value in args],\n"
    "                    **{key: argument(value) for key, value in kwargs.items()})\n",
    _NEUTRAL,
)
_call_checked: Callable[..., Any] = _NEUTRAL["call_checked"]


def _inplacevar(op: str, target: Any, value: Any) -> Any:
    return _INPLACE_OPERATORS[op](target, value)


def _apply(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return function(*args, **kwargs)
