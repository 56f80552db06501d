"""Thin ctypes wrappers for the Linux calls the isolation layers need (prctl, capset, syscall)."""

from __future__ import annotations

import ctypes
import platform

from sandbox.errors import SyscallError

PR_SET_NO_NEW_PRIVS = 38
PR_SET_KEEPCAPS = 8
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
SECCOMP_MODE_FILTER = 2
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Numbers of the calls made through syscall(2) here; the same on x86_64 and aarch64 except capset.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def machine() -> str:
    return platform.machine()


def syscall(number: int, *args: object, what: str) -> int:
    """Call ``syscall(number, *args)``; raise :class:`SyscallError` on -1."""
    result = int(_libc.syscall(ctypes.c_long(number), *args))
    if result == -1:
        raise SyscallError(what, ctypes.get_errno())
    return result


def prctl(option: int, arg2: int = 0, *, what: str) -> None:
    if _libc.prctl(option, arg2, 0, 0, 0) != 0:
        raise SyscallError(what, ctypes.get_errno())


def no_new_privs() -> None:
    """Neither this process nor anything it could start may gain privileges."""
    prctl(PR_SET_NO_NEW_PRIVS, 1, what="PR_SET_NO_NEW_PRIVS")


def keep_capabilities(keep: bool) -> None:
    """Whether permitted capabilities survive a change from uid 0 to another uid."""
    prctl(PR_SET_KEEPCAPS, 1 if keep else 0, what="PR_SET_KEEPCAPS")


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def set_capabilities(capabilities: tuple[int, ...]) -> None:
    """Make ``capabilities`` (all below 32) the only effective and permitted ones."""
    number = _SYS_CAPSET.get(machine())
    if number is None:
        raise SyscallError("capset", 38)  # ENOSYS: not wired up for this architecture
    mask = 0
    for capability in capabilities:
        mask |= 1 << capability
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(mask, mask, 0), _CapData(0, 0, 0))
    syscall(number, ctypes.byref(header), ctypes.byref(data), what="capset")


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def load_seccomp(program: bytes) -> None:
    """Install a classic BPF seccomp filter given as packed ``sock_filter`` entries."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        raise SyscallError("seccomp filter", ctypes.get_errno())
