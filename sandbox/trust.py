"""Who may compile, load code and make functions inside a run: decided by code, never by globals.

The compile hooks (``sandbox.hooks``) and the audit hook (``sandbox.audit``) ask the same
question of the Python frame an operation comes from: is this the sandbox compiling a script, or
the import system loading a library, or is it anything a script could have caused? The answer
rests on the frame's *code object*, which a script cannot change, not on its globals, which
it sometimes can.

Trust is narrow on purpose:

- **The sandbox's own compiling code** (:func:`trusted_code` registers it) is trusted only as
  the frame that raised the event. Being *called from* such code is no trust at all: a guard
  that looks at a script's values is sandbox code too, and a C function it calls (``map``,
  ``next``, a ``partial``) may run whatever the script chose with no frame of its own. Code
  registered here never touches a script's objects but through exact built-in types.
- ``ast.parse`` is the sandbox's when the frame that called it is.
- **The import system** is trusted to compile and load the code of the module it imports (a
  lazy import inside a run), as the frame that raised the event; not to make functions or code
  objects, which a script's ``__hash__`` running under its lookups could ask for.
- **A module's body while the import system runs it**, and the library code it calls, may do
  what any library does at import time, as long as no script frame lies between.

Script frames are those of the script and of code compiled under the sandbox rules at run time.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, TypeVar

SCRIPT_FILENAME = "<script>"
SANDBOXED = "<sandboxed "
IMPORT_SYSTEM = "<frozen importlib._bootstrap"
MODULE_BODY = "<module>"
_STACK_LIMIT = 200

_trusted: dict[int, CodeType] = {}  # by id; the code objects are kept alive here
_PARSE = ast.parse.__code__

F = TypeVar("F", bound=Callable[..., Any])


def trusted_code(function: F) -> F:
    """Register ``function`` as sandbox code whose own compiles and loads are trusted."""
    code = function.__code__
    _trusted[id(code)] = code
    return function


def is_trusted_code(code: CodeType) -> bool:
    return _trusted.get(id(code)) is code


def is_script_frame(frame: FrameType) -> bool:
    """Code a script wrote, or code compiled under the sandbox rules at run time."""
    filename = frame.f_code.co_filename
    return filename == SCRIPT_FILENAME or filename.startswith(SANDBOXED)


def is_import_system(frame: FrameType | None) -> bool:
    return frame is not None and frame.f_code.co_filename.startswith(IMPORT_SYSTEM)


def trusted(frame: FrameType | None, *, loading: bool = False) -> bool:
    """Whether what ``frame`` is doing (compiling, loading or making code, writing a
    function's code) is the sandbox's or the import system's own.

    ``loading`` is true for compiling source and loading marshalled code, which the import
    system does itself; it is false for making code objects and functions and for changing
    what a function runs."""
    if frame is None:
        return False
    code = frame.f_code
    if is_trusted_code(code):
        return True
    if code is _PARSE and frame.f_back is not None and is_trusted_code(frame.f_back.f_code):
        return True
    if loading and is_import_system(frame):
        return True
    return in_module_body(frame)


def in_module_body(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs, with no script frame on the way, inside the body of a module
    the import system is executing."""
    depth = 0
    while frame is not None and depth < _STACK_LIMIT:
        if is_script_frame(frame):
            return False
        if frame.f_code.co_name == MODULE_BODY and is_import_system(frame.f_back):
            return True
        frame = frame.f_back
        depth += 1
    return False
