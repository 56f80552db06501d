"""The whitelist layer: which builtins, modules and attributes a script may reach."""

from __future__ import annotations

import _pickle
import builtins
import io
import operator
import pickle
import sys
import types
import zipfile
from collections import UserString
from collections.abc import Callable, Iterable
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
from typing import Any, NoReturn

from RestrictedPython.Guards import (
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safe_builtins,
)
from RestrictedPython.transformer import INSPECT_ATTRIBUTES

from sandbox.compiler import TEMPLATE_ATTRIBUTES
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
    _pickle.Unpickler, pickle._Unpickler, _pickle.Pickler, pickle._Pickler,
    io.FileIO, zipfile.ZipFile,
)
# Instances of the types module's own types that typing syntax makes (int | None, list[int]).
_HARMLESS_TYPES = frozenset({types.UnionType, types.GenericAlias, types.NoneType,
                             types.EllipsisType, types.NotImplementedType})  # fmt: skip
# Values a script may hold without a look: nothing in them leads anywhere.
_PLAIN = frozenset({str, int, float, bool, type(None), bytes, complex, list, tuple, dict, set,
                    frozenset, range, slice, bytearray})  # fmt: skip
_PLAIN_ITEMS = (str, bytes, bytearray, range)


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

    def __init__(self, allowed_modules: Iterable[str], scratch: str | None = None) -> None:
        self.allowed_modules = frozenset(allowed_modules) - FORBIDDEN_MODULES
        self.violations: list[str] = []
        self._refused_builtins = frozenset(
            id(getattr(builtins, name)) for name in REFUSED_BUILTINS if hasattr(builtins, name)
        )
        self.doors = Doors(self.refuse, scratch)
        self._builtin_ids: frozenset[int] = frozenset()

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

    def check(self, value: Any, where: str) -> Any:
        """Return ``value`` if a script may hold it (a door in its guarded form), refuse it
        otherwise."""
        if type(value) in _PLAIN:
            return value
        reason = self.refusal(value, where)
        if reason is not None:
            self.refuse(reason)
        return self.doors.guard(value, where)

    def lend(self, namespace: dict[str, Any]) -> dict[str, Any]:
        """A library's namespace as generated code may use it: a copy without what a script
        may not hold, doors in their guarded form, and the guards added."""
        lent: dict[str, Any] = {}
        for key, value in namespace.items():
            if type(value) in _PLAIN:
                lent[key] = value
                continue
            door = self.doors.door(value)
            if self.refusal(value, str(key)) is None and (door is None or door.kind != "refused"):
                lent[key] = self.doors.guard(value, str(key))
        lent.update(self.namespace(_no_print_at_all))
        return lent

    def refusal(self, value: Any, where: str) -> str | None:
        """Why a script may not hold ``value`` (None if it may, doors aside).

        Decided by ``type(value)``, never ``isinstance``: an object's ``__class__`` may claim
        anything."""
        kind = type(value)
        if issubclass(kind, ModuleType):
            if not self.module_allowed(value.__name__):
                return f"module '{value.__name__}' (reached through {where})"
            return None
        if id(value) in self._refused_builtins or id(value) in _REFUSED_TYPE_IDS:
            return f"'{where}' is not available to scripts"
        if issubclass(kind, types.FrameType):
            return f"'{where}' is a frame"
        if issubclass(kind, _REFUSED_BASES) or (
            issubclass(kind, type) and issubclass(value, _REFUSED_BASES)
        ):
            return f"'{where}' unpickles or opens files by path ({_describe(value)})"
        if issubclass(kind, BuiltinFunctionType):
            owner = value.__self__
            if type(owner) is ModuleType and not self._owner_allowed(owner.__name__):
                return f"'{where}' belongs to module '{owner.__name__}'"
            return None
        if issubclass(kind, FunctionType | type):
            owner_name = value.__module__
            if (
                isinstance(owner_name, str)
                and not self._owner_allowed(owner_name)
                and not _made_for_a_script(value, owner_name)
            ):
                return f"'{where}' belongs to module '{owner_name}'"
            if issubclass(kind, type) and issubclass(value, type):
                # A metaclass builds classes from any namespace: dunders and all.
                return f"'{where}' is a metaclass"
            return None
        # An object whose class belongs to a forbidden module (os.environ, a thread, a socket,
        # a logger handler) is refused like the module itself; so is a wrapped function
        # (functools.lru_cache) of such a module.
        owner_name = getattr(kind, "__module__", "builtins")
        if (
            isinstance(owner_name, str)
            and kind not in _HARMLESS_TYPES
            and not self._owner_allowed(owner_name)
            and not _made_for_a_script(kind, owner_name)
        ):
            return f"'{where}' is a {kind.__name__} of module '{owner_name}'"
        wrapped = _wrapped_module(value)
        if wrapped is not None and not self._owner_allowed(wrapped):
            return f"'{where}' belongs to module '{wrapped}'"
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
        where = f"{_describe(obj)}.{name}"
        if name.startswith("_"):
            self.refuse(f"attribute '{where}' (names starting with '_' are private)")
        return self._attribute(obj, name, where, default)

    def template_getattr(self, obj: Any, name: Any) -> Any:
        """Attribute access in code a library generated at run time: its template's dunders
        (``self.__class__.__qualname__``) as well as public names, nothing else."""
        name = exact(name)
        where = f"{_describe(obj)}.{name}"
        if name.startswith("_") and name not in TEMPLATE_ATTRIBUTES:
            self.refuse(f"attribute '{where}' in generated code")
        return self._attribute(obj, name, where, _MISSING)

    def _attribute(self, obj: Any, name: str, where: str, default: Any) -> Any:
        if name in REFUSED_ATTRIBUTES:
            self.refuse(f"attribute '{where}' (interpreter internals)")
        if name in ("format", "format_map") and (
            isinstance(obj, str | UserString)
            or (isinstance(obj, type) and issubclass(obj, str | UserString))
        ):
            self.refuse(f"'{where}' (it can walk attributes; use an f-string instead)")
        if type(obj) not in _PLAIN:
            # Nothing is read off what a script may not hold itself (a forbidden module that
            # reached it inside a container, a refused function, a metaclass).
            self.check(obj, _describe(obj))
        value = getattr(obj, name) if default is _MISSING else getattr(obj, name, default)
        return self.check(value, where)

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

    def guarded_call(self, function: Any, /, *args: Any, **kwargs: Any) -> Any:
        """A call as a script makes it. The callee and every argument are checked like values
        the script reads (a refused function stays refused however it was reached; a door is
        called in its guarded form), no module is handed to library code (which could write to
        it), and what comes back is checked too."""
        guard = id(function) in self._builtin_ids
        if not guard and type(function) not in _PLAIN:
            function = self.check(function, _describe(function))
            guard = _is_guard(function)
        if args:
            args = tuple(
                value if type(value) in _PLAIN else self._argument(value, function, guard)
                for value in args
            )
        if kwargs:
            kwargs = {
                key: value if type(value) in _PLAIN else self._argument(value, function, guard)
                for key, value in kwargs.items()
            }
        result = function(*args, **kwargs)
        if type(result) in _PLAIN:
            return result
        return self.check(result, f"the result of {_describe(function)}()")

    def _argument(self, value: Any, function: Any, guard: bool) -> Any:
        if not guard and issubclass(type(value), ModuleType):
            self.refuse(
                f"passing module '{value.__name__}' to '{_describe(function)}' "
                "(a module is never handed to library code)"
            )
        return self.check(value, f"an argument of {_describe(function)}()")

    def guarded_iter(self, iterable: Any) -> Any:
        """``for`` loops, comprehensions and unpacking: each item is checked as it comes."""
        iterator = iter(iterable)
        if isinstance(iterable, _PLAIN_ITEMS):
            return iterator
        return self._checked_items(iterator, _describe(iterable))

    def _checked_items(self, iterator: Any, where: str) -> Any:
        check = self.check
        for item in iterator:
            yield item if type(item) in _PLAIN else check(item, f"an item of {where}")

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
        return refused

    # -- the script's namespace ---------------------------------------------------------------

    def builtins(self) -> dict[str, Any]:
        """The ``__builtins__`` a script runs with."""
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
        self._builtin_ids = frozenset(id(value) for value in table.values())
        return table

    def namespace(self, print_factory: Callable[..., Any]) -> dict[str, Any]:
        """Globals for one script: builtins plus the hooks RestrictedPython compiles in."""
        return {
            "__builtins__": self.builtins(),
            "__name__": "script",
            "__metaclass__": type,
            "_getattr_": self.guarded_getattr,
            "_gen_getattr_": self.template_getattr,
            "_getitem_": self.guarded_getitem,
            "_getiter_": self.guarded_iter,
            "_call_": self.guarded_call,
            "_check_": self.check_value,
            "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
            "_unpack_sequence_": guarded_unpack_sequence,
            "_write_": self.guarded_write,
            "_inplacevar_": _inplacevar,
            "_aug_attr_": self.augmented_attribute,
            "_aug_item_": self.augmented_item,
            "_apply_": _apply,
            "_print_": print_factory,
        }


def _is_guard(function: Any) -> bool:
    """The sandbox's own callables (the print collector): they may be given a module."""
    owner = getattr(type(function), "__module__", "")
    if isinstance(function, MethodType):
        owner = getattr(function.__func__, "__module__", "")
    return isinstance(owner, str) and owner.startswith("sandbox.")


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


def _inplacevar(op: str, target: Any, value: Any) -> Any:
    return _INPLACE_OPERATORS[op](target, value)


def _apply(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return function(*args, **kwargs)
