"""The system-call layer: a seccomp filter that refuses new processes and kernel-level doors.

The filter is classic BPF built here (no library needed). It refuses, with EPERM:

- new processes: fork, vfork, execve, execveat, and clone without CLONE_THREAD (threads keep
  working; clone3 answers ENOSYS so that the C library falls back to clone, whose flags the
  filter can read);
- debugging and reading other processes: ptrace, process_vm_readv/writev, kcmp, pidfd_getfd;
- namespaces and mounts: unshare, setns, mount and the new mount API, pivot_root, chroot;
- kernel modules, kexec, bpf, perf events, keyrings, io_uring, userfaultfd, clock and host
  settings, reboot, swap, quotas, syslog, raw port I/O, and file handles (open_by_handle_at);
- sockets of families other than UNIX, IPv4, IPv6 and netlink (no raw packet sockets).

Syscalls run by the wrong ABI (x32 on x86_64, or a foreign architecture) kill the process.
"""

from __future__ import annotations

import errno
import functools
import struct

from sandbox.syscalls import load_seccomp, machine

# BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_JGE_K = 0x35
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000

_OFFSET_NR = 0
_OFFSET_ARCH = 4
_OFFSET_ARG0 = 16  # low 32 bits of args[0] on little-endian machines

CLONE_THREAD = 0x00010000
_X32_SYSCALL_BIT = 0x40000000
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16

# Checked against <asm/unistd_64.h>.
_X86_64 = {
    "arch": 0xC000003E,
    "clone": 56,
    "clone3": 435,
    "socket": 41,
    "refused": {
        "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "ptrace": 101,
        "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
        "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155,
        "chroot": 161, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320,
        "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248, "request_key": 249,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "userfaultfd": 323, "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305,
        "adjtimex": 159, "sethostname": 170, "setdomainname": 171, "reboot": 169,
        "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179, "quotactl_fd": 443,
        "syslog": 103, "iopl": 172, "ioperm": 173, "open_by_handle_at": 304,
        "name_to_handle_at": 303, "lookup_dcookie": 212, "vhangup": 153, "uselib": 134,
        "personality": 135, "fanotify_init": 300, "seccomp": 317,
    },
}  # fmt: skip

_TABLES = {"x86_64": _X86_64}


def supported() -> str | None:
    """None if this architecture has a syscall table here, otherwise why not."""
    if machine() in _TABLES:
        return None
    return f"no syscall table for the {machine()} architecture yet"


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


@functools.cache
def build_filter() -> bytes:
    """The packed BPF program for this architecture."""
    table = _TABLES[machine()]
    refused = sorted(set(table["refused"].values()))  # type: ignore[attr-defined]
    errno_eperm = _RET_ERRNO | errno.EPERM
    program: list[bytes] = [
        _insn(_LD_W_ABS, 0, 0, _OFFSET_ARCH),
        _insn(_JEQ_K, 1, 0, int(table["arch"])),  # type: ignore[call-overload]
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _OFFSET_NR),
        _insn(_JGE_K, 0, 1, _X32_SYSCALL_BIT),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
    ]
    # Each refused number jumps to the shared EPERM return right after the list.
    for index, number in enumerate(refused):
        program.append(_insn(_JEQ_K, len(refused) - index, 0, number))
    # After the list: [0] jump over the EPERM return, [1] the EPERM return.
    program.append(_insn(0x05, 0, 0, 1))  # BPF_JMP|BPF_JA: skip the next instruction
    program.append(_insn(_RET_K, 0, 0, errno_eperm))
    # clone: allowed only for threads.
    program += [
        _insn(_JEQ_K, 0, 4, int(table["clone"])),  # type: ignore[call-overload]
        _insn(_LD_W_ABS, 0, 0, _OFFSET_ARG0),
        _insn(_JSET_K, 1, 0, CLONE_THREAD),
        _insn(_RET_K, 0, 0, errno_eperm),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
    ]
    # clone3: its flags live in memory the filter cannot read; ENOSYS makes libc use clone.
    program += [
        _insn(_JEQ_K, 0, 1, int(table["clone3"])),  # type: ignore[call-overload]
        _insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
    ]
    # socket: only UNIX, IPv4, IPv6 and netlink.
    program += [
        _insn(_JEQ_K, 0, 7, int(table["socket"])),  # type: ignore[call-overload]
        _insn(_LD_W_ABS, 0, 0, _OFFSET_ARG0),
        _insn(_JEQ_K, 3, 0, AF_UNIX),
        _insn(_JEQ_K, 2, 0, AF_INET),
        _insn(_JEQ_K, 1, 0, AF_INET6),
        _insn(_JEQ_K, 0, 1, AF_NETLINK),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
        _insn(_RET_K, 0, 0, _RET_ERRNO | errno.EAFNOSUPPORT),
    ]
    program.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    return b"".join(program)


def install() -> None:
    """Load the filter into this process (needs no_new_privs or CAP_SYS_ADMIN)."""
    load_seccomp(build_filter())
