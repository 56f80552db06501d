"""The audit hook: the interpreter's own checkpoints, refused for a run whatever called them.

Python raises an audit event (PEP 578) inside C code for the operations that matter here:
every unpickler's global lookup, every ``ctypes`` door to raw memory and foreign functions,
every compile and every exec of a code object, frames reached through generators, coroutines
and tracebacks, the collector's views of all objects, tracing hooks, and new processes and
sockets. A hook, once added, cannot be removed. It is added to each child just before the
script runs, so it holds against references to the real functions taken before the Python-level
hooks (``sandbox.hooks``) were installed: an ``Unpickler`` subclassed from the C one at import
time, ``compile`` bound to a library's own name, ``ctypes.pythonapi``.

What the sandbox and the import system do themselves passes: the hook looks at the code of the
Python frame that raised the event (``sandbox.trust``). New processes, signals and sockets are
left to seccomp and the broker: libraries expect the OSError they give, not a policy refusal.
"""

from __future__ import annotations

import linecache
import sys
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

from sandbox.hooks import Ours
from sandbox.trust import is_script_frame, is_trusted_code, trusted

Refuse = Callable[[str], NoReturn]

# Refused whoever raises them.
ALWAYS = {
    "pickle.find_class": "unpickling (nothing is unpickled inside the sandbox)",
    "sys._current_frames": "the frames of every thread",
    "sys.settrace": "tracing", "sys.setprofile": "profiling",
    "threading.settrace": "tracing", "threading.setprofile": "profiling",
    "sys.addaudithook": "adding an audit hook",
    "gc.get_objects": "the collector's list of objects",
    "gc.get_referrers": "the collector's referrers",
    "gc.get_referents": "the collector's referents",
    "cpython.PyInterpreterState_New": "a new interpreter",
}  # fmt: skip
# Refused unless the sandbox or the import system raised them.
UNLESS_TRUSTED = {
    "compile": "compiling code below the sandbox's compile hook",
    "marshal.loads": "loading marshalled code", "marshal.load": "loading marshalled code",
    "code.__new__": "making a code object", "function.__new__": "making a function",
    "object.__setattr__": None,  # checked by name below
    "object.__getattr__": None,  # checked by name below
    "exec": None,  # checked below: code compiled under the rules may run
}  # fmt: skip
# Attributes that lead to frames (object.__getattr__ events).
FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
# Attributes whose change would make a function or class run other code.
WRITE_ATTRIBUTES = frozenset({"__code__", "__globals__", "__builtins__", "__closure__"})
# Who may read frames off tracebacks (by the file of their code): the standard library's
# traceback formatting, besides the sandbox's own reporting (registered with trusted_code).
FRAME_READERS = tuple(module.__file__ or "" for module in (traceback, linecache))
_LOADING = frozenset({"compile", "marshal.loads", "marshal.load"})


def install(refuse: Refuse, ours: Ours) -> None:
    """Add the hook to this process, for good."""
    getframe = sys._getframe

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "sys._getframe" or (event not in ALWAYS and event not in UNLESS_TRUSTED):
            if event.startswith("ctypes."):
                refuse(f"ctypes ({event}): raw memory and foreign functions")
            return
        reason = ALWAYS.get(event)
        if reason is not None:
            refuse(f"{reason} ({event})")
        frame = getframe(1)
        if event == "exec":
            # Only code compiled under the rules (ours), or a library's own code made before
            # the hooks (code cannot be made since any other way), and never from a script.
            ran = args[0] if args else None
            if frame is not None and is_script_frame(frame) and ours.get(id(ran)) is not ran:
                refuse("running a code object from a script")
            return
        if event == "object.__getattr__":
            if len(args) > 1 and args[1] in FRAME_ATTRIBUTES and not _reader(frame):
                refuse(f"reaching a frame through '{args[1]}'")
            return
        if event == "object.__setattr__":
            if len(args) > 1 and args[1] in WRITE_ATTRIBUTES and not trusted(frame):
                refuse(f"changing '{args[1]}'")
            return
        if not trusted(frame, loading=event in _LOADING):
            refuse(f"{UNLESS_TRUSTED[event]} ({event})")

    sys.addaudithook(hook)


def _reader(frame: FrameType | None) -> bool:
    """The sandbox's own reporting, or the standard library formatting a traceback."""
    if frame is None:
        return False
    return is_trusted_code(frame.f_code) or frame.f_code.co_filename.startswith(FRAME_READERS)
