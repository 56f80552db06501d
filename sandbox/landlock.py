"""The file-system layer (and TCP ports and scopes where the kernel has them): Landlock.

A ruleset handles every file-system right the kernel knows; a run is then allowed to read
the Python installation and the data libraries need, and to read and write its own scratch
folder, and nothing else. On kernels with Landlock ABI 4 or later, TCP connections are allowed
to the configured ports only and binding is refused; with ABI 6 or later the run can neither
signal processes outside its domain nor reach abstract UNIX sockets outside it.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from sandbox.errors import SyscallError
from sandbox.syscalls import (
    SYS_LANDLOCK_ADD_RULE,
    SYS_LANDLOCK_CREATE_RULESET,
    SYS_LANDLOCK_RESTRICT_SELF,
    syscall,
)

_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
# Rights that make sense on a file (not a directory) in a path rule.
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ_ONLY = FS_READ_FILE | FS_READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


class _NetPortAttr(ctypes.Structure):
    _fields_ = (("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64))


# What each ABI adds, and what its absence costs; the file guarantee needs truncation rules.
REQUIRED_ABI = 3
_FEATURES = (
    (1, "file rules", "file rules"),
    (2, "renaming and linking across folders", "control of renaming and linking (ABI 2)"),
    (3, "truncation", "control of truncation (ABI 3): a run could truncate files its uid owns"),
    (4, "TCP connect and bind", "TCP rules (ABI 4; seccomp still refuses connect and bind)"),
    (5, "device ioctls", "device ioctl rules (ABI 5)"),
    (6, "signal and abstract-socket scopes",
     "signal and abstract-socket scopes (ABI 6; seccomp still refuses both)"),
)  # fmt: skip


def features(abi: int) -> tuple[list[str], list[str]]:
    """What Landlock of this ABI enforces for runs, and what it lacks."""
    have = [name for version, name, _ in _FEATURES if version <= abi]
    missing = [lack for version, _, lack in _FEATURES if version > abi]
    return have, missing


def abi_version() -> int:
    """The Landlock ABI the kernel offers; 0 when Landlock is absent or disabled."""
    try:
        return syscall(
            SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
            ctypes.c_uint32(_CREATE_RULESET_VERSION), what="landlock_create_ruleset",
        )  # fmt: skip
    except SyscallError:
        return 0


@dataclass(frozen=True)
class PathRule:
    """A path opened with O_PATH ahead of time (the warm parent does it once for all runs)."""

    path: str
    fd: int
    directory: bool


def open_paths(paths: tuple[str, ...]) -> tuple[PathRule, ...]:
    """O_PATH handles for the paths that exist; each rule later needs no lookup of its own."""
    rules = []
    for path in paths:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # A path that does not exist on this host needs no rule.
        rules.append(PathRule(path, fd, os.path.isdir(path)))
    return tuple(rules)


@dataclass(frozen=True)
class Rules:
    """What one run may touch."""

    read_only: tuple[PathRule, ...]
    read_write: tuple[str, ...]
    connect_ports: tuple[int, ...] | None
    """TCP ports a run may connect to; None leaves TCP to the other layers."""


def restrict(rules: Rules) -> int:
    """Apply ``rules`` to this process for good; return the ABI used. Needs no_new_privs."""
    abi = abi_version()
    if abi < 1:
        raise SyscallError("landlock", 95)  # EOPNOTSUPP
    handled_fs = _FS_BY_ABI[max(v for v in _FS_BY_ABI if v <= abi)]
    handled_net = (
        (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 and rules.connect_ports is not None else 0
    )
    scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0
    attr = _RulesetAttr(handled_fs, handled_net, scoped)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    ruleset = syscall(
        SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
        ctypes.c_uint32(0), what="landlock_create_ruleset",
    )  # fmt: skip
    try:
        for rule in rules.read_only:
            _allow(ruleset, rule, READ_ONLY & handled_fs)
        for opened in open_paths(rules.read_write):
            try:
                _allow(ruleset, opened, handled_fs & ~FS_EXECUTE)
            finally:
                os.close(opened.fd)
        if handled_net:
            for port in rules.connect_ports or ():
                port_rule = _NetPortAttr(NET_CONNECT_TCP, port)
                syscall(
                    SYS_LANDLOCK_ADD_RULE, ruleset, _RULE_NET_PORT, ctypes.byref(port_rule),
                    ctypes.c_uint32(0), what=f"landlock rule for port {port}",
                )  # fmt: skip
        syscall(
            SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0), what="landlock_restrict_self"
        )
    finally:
        os.close(ruleset)
    return abi


def _allow(ruleset: int, rule: PathRule, rights: int) -> None:
    if not rule.directory:
        rights &= _FILE_RIGHTS
    attr = _PathBeneathAttr(rights, rule.fd)
    syscall(
        SYS_LANDLOCK_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(attr),
        ctypes.c_uint32(0), what=f"landlock rule for {rule.path}",
    )  # fmt: skip
