"""The system-call layer: a seccomp filter for runs, built here as classic BPF (no library).

It refuses, with EPERM:

- new processes: fork, vfork, execve, execveat, and clone without CLONE_THREAD (threads keep
  working; clone3 answers ENOSYS so that the C library falls back to clone, whose flags the
  filter can read);
- the network, whatever a script calls: ``connect``, ``bind``, ``listen``, ``accept``,
  ``sendto`` with an address, ``sendmsg``/``sendmmsg``, interface and routing ioctls, and every
  ``socket`` but a TCP stream over IPv4 or IPv6 (no UDP, no raw, packet or netlink sockets, no
  UNIX sockets, named or abstract). Connections a run may make are made by the broker outside
  the sandbox and handed over already connected;
- other processes: signals to anything but the run itself, ``ptrace``, ``process_vm_readv`` /
  ``writev``, ``kcmp``, pidfds, and changing another process's limits, priority, scheduling or
  memory (``prlimit64``, ``setpriority``, ``sched_set*``, ``ioprio_set``, ``migrate_pages``,
  ``move_pages``): with the service's own uid a run could otherwise reach the service;
- what outlives the run or reaches across runs: System V shared memory, semaphores and message
  queues, POSIX message queues (they stay on the host after the run, and another run could
  read them), and Landlock rulesets of the run's own (a rule keeps a deleted file's space
  allocated, out of the quota's sight; the sandbox's own ruleset is in place by then);
- what Landlock does not mediate: inotify (it would show another run's file names as they are
  made), changing modes, owners, times and extended attributes (of another run's files, or of
  the service's own in the image), ``fallocate`` but in its plain mode (``FALLOC_FL_KEEP_SIZE``
  allocates past ``RLIMIT_FSIZE``), and ``fcntl``/``ioctl`` commands that make the kernel signal
  a process of the run's choosing (``F_SETOWN``, ``F_SETSIG``, ``F_SETOWN_EX``, ``FIOSETOWN``,
  ``SIOCSPGRP``) or watch another folder (``F_NOTIFY``);
- namespaces and mounts, kernel modules, kexec, bpf, perf events, keyrings, io_uring, AIO,
  userfaultfd, memory files (``memfd_create``: memory outside the address-space limit), clock
  and host settings, reboot, swap, quotas, syslog, raw port I/O, and file handles.

Syscalls run by the wrong ABI (x32 on x86_64, or a foreign architecture) kill the process. The
program depends on the run's own pid (signals and limits to itself stay allowed), so each child
patches its pid into a program built once in the warm parent.
"""

from __future__ import annotations

import errno
import functools
import struct
from dataclasses import dataclass, field

from sandbox.syscalls import load_seccomp, machine

# BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
LD_W_ABS = 0x20
ALU_AND_K = 0x54
JMP_JA = 0x05
JEQ_K = 0x15
JSET_K = 0x45
JGE_K = 0x35
RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
EPERM = RET_ERRNO | errno.EPERM

OFFSET_NR = 0
OFFSET_ARCH = 4


def arg_low(index: int) -> int:
    """Offset of the low 32 bits of syscall argument ``index`` (little-endian)."""
    return 16 + 8 * index


def arg_high(index: int) -> int:
    return 16 + 8 * index + 4


CLONE_THREAD = 0x00010000
X32_SYSCALL_BIT = 0x40000000
AF_INET, AF_INET6 = 2, 10
SOCK_STREAM = 1
SOCK_FLAGS = 0o4000 | 0o2000000  # SOCK_NONBLOCK | SOCK_CLOEXEC
IPPROTO_TCP = 6
# Socket ioctls from SIOCADDRT on (routes, interfaces, ARP, bridges, device-private).
SOCKET_IOCTLS = range(0x890B, 0x8A00)
PID_PLACEHOLDER = 0x7FFFFFFE

# Checked against <asm/unistd_64.h>.
_X86_64 = {
    "arch": 0xC000003E,
    "clone": 56,
    "clone3": 435,
    "socket": 41,
    "sendto": 44,
    "ioctl": 16,
    # Calls that must name the run itself (argument 0 is a pid): 0 (where it means "me") or the
    # run's own pid.
    "own_pid": {
        "kill": 62, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
        "prlimit64": 302, "sched_setaffinity": 203, "sched_setparam": 142,
        "sched_setscheduler": 144, "sched_setattr": 314, "migrate_pages": 256,
        "move_pages": 279, "get_robust_list": 274,
    },
    # which, who: only PRIO_PROCESS (0) of the run itself.
    "own_which_who": {"setpriority": 141, "ioprio_set": 251},
    "refused": {
        "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "ptrace": 101,
        "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
        "pidfd_open": 434, "pidfd_send_signal": 424, "tkill": 200, "process_madvise": 440,
        "process_mrelease": 448,
        "connect": 42, "accept": 43, "accept4": 288, "bind": 49, "listen": 50,
        "sendmsg": 46, "sendmmsg": 307,
        "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155,
        "chroot": 161, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320,
        "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248, "request_key": 249,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "io_setup": 206, "io_submit": 209, "userfaultfd": 323, "memfd_create": 319,
        "memfd_secret": 447, "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305,
        "adjtimex": 159, "sethostname": 170, "setdomainname": 171, "reboot": 169,
        "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179, "quotactl_fd": 443,
        "syslog": 103, "iopl": 172, "ioperm": 173, "open_by_handle_at": 304,
        "name_to_handle_at": 303, "lookup_dcookie": 212, "vhangup": 153, "uselib": 134,
        "personality": 135, "fanotify_init": 300, "seccomp": 317,
        "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65,
        "semctl": 66, "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70,
        "msgctl": 71, "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242,
        "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245,
        "landlock_create_ruleset": 444, "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
        "inotify_init": 253, "inotify_init1": 294, "inotify_add_watch": 254,
        "inotify_rm_watch": 255,
        "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "chown": 92,
        "fchown": 93, "lchown": 94, "fchownat": 260, "utime": 132, "utimes": 235,
        "futimesat": 261, "utimensat": 280, "setxattr": 188, "lsetxattr": 189,
        "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199,
    },
    "fcntl": 72,
    "fallocate": 285,
}  # fmt: skip
# In the table but newer than the kernel headers some build hosts have.
NEWER_THAN_HEADERS = frozenset({"fchmodat2"})
# fcntl commands that make the kernel signal a process of the caller's choice (F_SETOWN,
# F_SETSIG, F_SETOWN_EX) or report another folder's changes (F_NOTIFY).
FCNTL_SIGNALS = (8, 10, 15, 1026)
# ioctls that set which process an open file signals (FIOSETOWN, SIOCSPGRP).
OWNER_IOCTLS = (0x8901, 0x8902)

_TABLES = {"x86_64": _X86_64}
# Calls with a rule of their own on their arguments.
SINGLE_RULES = ("clone", "clone3", "socket", "sendto", "ioctl", "fcntl", "fallocate")


def supported() -> str | None:
    """None if this architecture has a syscall table here, otherwise why not."""
    if machine() in _TABLES:
        return None
    return f"no syscall table for the {machine()} architecture yet"


@dataclass
class _Assembler:
    """Classic BPF with labels. Conditional jumps reach at most 255 instructions ahead, so each
    rule's instructions stay together and the dispatch reaches them with long jumps."""

    code: list[tuple[int, int | str, int | str, int]] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def emit(self, op: int, k: int = 0, jt: int | str = 0, jf: int | str = 0) -> None:
        self.code.append((op, jt, jf, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def load(self, offset: int) -> None:
        self.emit(LD_W_ABS, offset)

    def ret(self, value: int) -> None:
        self.emit(RET_K, value)

    def assemble(self) -> bytes:
        out = []
        for index, (op, jt, jf, k) in enumerate(self.code):
            value = k
            if op == JMP_JA and isinstance(jt, str):
                value = self.labels[jt] - index - 1  # a long jump: the offset is its k
                out.append(struct.pack("<HBBI", op, 0, 0, value))
                continue
            out.append(
                struct.pack("<HBBI", op, self._offset(index, jt), self._offset(index, jf), value)
            )
        return b"".join(out)

    def _offset(self, index: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[target] - index - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"jump to {target} is {offset} instructions away")
        return offset


def _own_pid_rule(asm: _Assembler, arg: int, zero_allowed: bool) -> None:
    """Allow when argument ``arg`` is the run's pid (or 0); refuse otherwise."""
    asm.load(arg_low(arg))
    asm.emit(JEQ_K, PID_PLACEHOLDER, 0, 1)
    asm.ret(RET_ALLOW)
    if zero_allowed:
        asm.emit(JEQ_K, 0, 0, 1)
        asm.ret(RET_ALLOW)
    asm.ret(EPERM)


@functools.cache
def _program() -> tuple[bytes, tuple[int, ...]]:
    """The program for this architecture with a placeholder pid, and where the pid goes."""
    table = _TABLES[machine()]
    asm = _Assembler()
    asm.load(OFFSET_ARCH)
    asm.emit(JEQ_K, int(table["arch"]), 1, 0)  # type: ignore[call-overload]
    asm.ret(RET_KILL_PROCESS)
    asm.load(OFFSET_NR)
    asm.emit(JGE_K, X32_SYSCALL_BIT, 0, 1)
    asm.ret(RET_KILL_PROCESS)
    refused = sorted(set(table["refused"].values()))  # type: ignore[attr-defined]
    for number in refused:
        asm.emit(JEQ_K, number, "eperm", 0)
    own_pid: dict[str, int] = table["own_pid"]  # type: ignore[assignment]
    which_who: dict[str, int] = table["own_which_who"]  # type: ignore[assignment]
    single = SINGLE_RULES
    rules = {
        **{int(table[name]): name for name in single},  # type: ignore[call-overload]
        **{number: f"pid:{name}" for name, number in own_pid.items()},
        **{number: f"which_who:{name}" for name, number in which_who.items()},
    }
    # Dispatch: two instructions a rule (a miss skips the long jump).
    for number, name in rules.items():
        asm.emit(JEQ_K, number, 0, 1)
        asm.emit(JMP_JA, 0, name)
    asm.ret(RET_ALLOW)
    asm.label("eperm")
    asm.ret(EPERM)
    _processes(asm)
    _network(asm)
    _files(asm)
    _other_processes(asm, own_pid, which_who)
    program = asm.assemble()
    placeholder = struct.pack("<I", PID_PLACEHOLDER)
    places = tuple(
        offset + 4
        for offset in range(0, len(program), 8)
        if program[offset + 4 : offset + 8] == placeholder
    )
    return program, places


def _processes(asm: _Assembler) -> None:
    asm.label("clone")  # threads only
    asm.load(arg_low(0))
    asm.emit(JSET_K, CLONE_THREAD, 0, 1)
    asm.ret(RET_ALLOW)
    asm.ret(EPERM)
    asm.label("clone3")  # its flags live in memory the filter cannot read: libc falls back
    asm.ret(RET_ERRNO | errno.ENOSYS)


def _network(asm: _Assembler) -> None:
    asm.label("socket")  # TCP over IPv4 or IPv6 only
    asm.load(arg_low(0))
    asm.emit(JEQ_K, AF_INET, 1, 0)
    asm.emit(JEQ_K, AF_INET6, 0, "socket_no")
    asm.load(arg_low(1))
    asm.emit(ALU_AND_K, 0xFFFFFFFF & ~SOCK_FLAGS)
    asm.emit(JEQ_K, SOCK_STREAM, 0, "socket_no")
    asm.load(arg_low(2))
    asm.emit(JEQ_K, 0, 1, 0)
    asm.emit(JEQ_K, IPPROTO_TCP, 0, "socket_no")
    asm.ret(RET_ALLOW)
    asm.label("socket_no")
    asm.ret(EPERM)

    asm.label("sendto")  # no destination address (TCP Fast Open would be a connect)
    asm.load(arg_low(4))
    asm.emit(JEQ_K, 0, 0, "sendto_no")
    asm.load(arg_high(4))
    asm.emit(JEQ_K, 0, 0, "sendto_no")
    asm.ret(RET_ALLOW)
    asm.label("sendto_no")
    asm.ret(EPERM)

    asm.label("ioctl")  # no interface, route or device-private socket ioctls, no owners
    asm.load(arg_low(1))
    for request in OWNER_IOCTLS:
        asm.emit(JEQ_K, request, "ioctl_no", 0)
    asm.emit(JGE_K, SOCKET_IOCTLS.start, 0, 2)
    asm.emit(JGE_K, SOCKET_IOCTLS.stop, 1, 0)
    asm.label("ioctl_no")
    asm.ret(EPERM)
    asm.ret(RET_ALLOW)


def _files(asm: _Assembler) -> None:
    asm.label("fcntl")  # no signals to a process of the run's choosing
    asm.load(arg_low(1))
    for command in FCNTL_SIGNALS:
        asm.emit(JEQ_K, command, "fcntl_no", 0)
    asm.ret(RET_ALLOW)
    asm.label("fcntl_no")
    asm.ret(EPERM)

    asm.label("fallocate")  # mode 0 only: it grows the file, within RLIMIT_FSIZE
    asm.load(arg_low(1))
    asm.emit(JEQ_K, 0, 0, 1)
    asm.ret(RET_ALLOW)
    asm.ret(EPERM)


def _other_processes(asm: _Assembler, own_pid: dict[str, int], which_who: dict[str, int]) -> None:
    for name in own_pid:
        asm.label(f"pid:{name}")
        # kill(0, sig) is the run's own process group (a session of its own).
        _own_pid_rule(asm, 0, zero_allowed=name not in ("tgkill", "rt_tgsigqueueinfo"))
    for name in which_who:
        asm.label(f"which_who:{name}")
        asm.load(arg_low(0))
        # PRIO_PROCESS and IOPRIO_WHO_PROCESS are 0 and 1 respectively.
        asm.emit(JEQ_K, 0 if name == "setpriority" else 1, 0, "which_who_no")
        _own_pid_rule(asm, 1, zero_allowed=True)
    asm.label("which_who_no")
    asm.ret(EPERM)


def build_filter(pid: int) -> bytes:
    """The packed BPF program for this architecture, for the run whose pid is ``pid``."""
    program, places = _program()
    patched = bytearray(program)
    value = struct.pack("<I", pid)
    for offset in places:
        patched[offset : offset + 4] = value
    return bytes(patched)


def prepare() -> None:
    """Build the program once (the warm parent does, so its children only patch their pid)."""
    _program()


def install(pid: int) -> None:
    """Load the filter into this process (needs no_new_privs or CAP_SYS_ADMIN)."""
    load_seccomp(build_filter(pid))
