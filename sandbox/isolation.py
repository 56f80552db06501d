"""Putting a forked child behind every isolation layer, in order, before it waits for a script.

Layers: ``policy`` (the whitelist guards and library doors), ``limits`` (resource limits,
session, environment, scratch folder), ``user`` (an unprivileged uid when the service runs
as root), ``seccomp`` (system calls: no processes, no network of its own, no other process),
``landlock`` (file system, TCP, signal and abstract-socket scopes) and ``network`` (connections
only through the broker, under the address rules; a network namespace when the network is off
and the service is root).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import pwd
import resource
import secrets
import signal
import stat
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass

import msgspec

from sandbox import landlock, seccomp, syscalls
from sandbox.config import PoolConfig
from sandbox.netrules import NetworkRules, local_addresses, parse_allow

LAYERS: tuple[str, ...] = ("policy", "limits", "user", "seccomp", "landlock", "network")
CLONE_NEWNET = 0x40000000
SYS_UNSHARE = {"x86_64": 272, "aarch64": 97}
MAX_OPEN_FILES = 256
ISOLATION_FAILED_EXIT = 71
# What a run may read of its own /proc/<pid>: nothing that shows the host's network, mounts
# or other tasks.
OWN_PROC_ENTRIES = ("status", "stat", "statm", "limits", "cmdline", "comm", "maps", "fd", "fdinfo")

# Files and folders a run may read, besides the Python installation, when they exist.
SYSTEM_READ_PATHS: tuple[str, ...] = (
    "/usr/lib", "/lib", "/lib64", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo",
    "/etc/localtime", "/etc/ssl/certs", "/etc/ssl/openssl.cnf", "/usr/share/ca-certificates",
    "/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf",
    "/etc/services", "/etc/protocols", "/usr/share/nltk_data", "/usr/local/share/nltk_data",
    "/usr/lib/nltk_data", "/usr/local/lib/nltk_data", "/dev/urandom", "/dev/random",
    "/sys/devices/system/cpu", "/proc/cpuinfo", "/proc/meminfo",
)  # fmt: skip


class LayerStatus(msgspec.Struct, frozen=True):
    """Whether a layer is in force for the runs of this pool, and why not if it is not."""

    name: str
    active: bool
    detail: str


@dataclass(frozen=True)
class Plan:
    """What the warm parent worked out once, for every child it forks."""

    config: PoolConfig
    layers: frozenset[str]
    uid: int | None = None
    gid: int | None = None
    keep_read_capability: bool = False
    scratch_root: str = ""
    read_paths: tuple[str, ...] = ()
    read_rules: tuple[landlock.PathRule, ...] = ()


def python_read_paths() -> set[str]:
    """The Python installation: standard library, site-packages, shared libraries."""
    found: set[str] = set()
    for scheme_path in sysconfig.get_paths().values():
        found.add(scheme_path)
    for name in ("LIBDIR", "LIBPL", "BINLIBDEST"):
        value = sysconfig.get_config_var(name)
        if isinstance(value, str):
            found.add(value)
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    for entry in sys.path:
        real = os.path.realpath(entry)
        if any(real.startswith(os.path.realpath(prefix) + os.sep) for prefix in prefixes):
            found.add(real)
    for prefix in prefixes:
        for sub in ("nltk_data", "share/nltk_data", "lib/nltk_data"):
            found.add(os.path.join(prefix, sub))
    return {os.path.realpath(p) for p in found if p and os.path.exists(p)}


def _outermost(paths: set[str]) -> list[str]:
    """The paths not already inside another one of them: one Landlock rule covers both."""
    kept: list[str] = []
    for path in sorted(paths):
        if not any(path.startswith(parent.rstrip("/") + "/") for parent in kept):
            kept.append(path)
    return kept


def readable_by_others(path: str) -> bool:
    """True if every folder on the way to ``path`` lets other users through."""
    current = os.path.realpath(path)
    while True:
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return False
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(current)
        if parent == current:
            return True
        current = parent


def plan(config: PoolConfig) -> tuple[Plan, list[LayerStatus]]:
    """Decide, in the warm parent, which layers this host supports and how to apply them."""
    disabled = set(config.disabled_layers)
    statuses: list[LayerStatus] = []
    active: set[str] = set()

    def record(name: str, ok: bool, detail: str) -> None:
        if name in disabled:
            statuses.append(LayerStatus(name, False, "switched off by configuration"))
            return
        statuses.append(LayerStatus(name, ok, detail))
        if ok:
            active.add(name)

    record("policy", True, "RestrictedPython whitelist, guarded imports, attributes, doors")
    record("limits", True, "CPU, memory, file size, open files, no core dumps, own session")

    uid = gid = None
    keep_capability = False
    read_paths = _outermost(
        python_read_paths()
        | {p for p in SYSTEM_READ_PATHS if os.path.exists(p)}
        | {os.path.realpath(p) for p in config.read_paths if os.path.exists(p)}
    )
    if os.geteuid() != 0:
        record("user", True, f"the service already runs unprivileged (uid {os.geteuid()})")
    else:
        try:
            entry = pwd.getpwnam(config.run_as_user)
        except KeyError:
            record("user", False, f"user '{config.run_as_user}' does not exist on this host")
        else:
            uid, gid = entry.pw_uid, entry.pw_gid
            keep_capability = not all(readable_by_others(p) for p in read_paths)
            detail = f"runs as {config.run_as_user} (uid {uid})"
            if keep_capability:
                detail += (
                    "; the Python installation is not readable by that user, so the run keeps "
                    "CAP_DAC_READ_SEARCH, confined by Landlock"
                )
            record("user", True, detail)

    reason = seccomp.supported()
    record(
        "seccomp",
        reason is None,
        reason
        or "no new processes, no network system calls of its own, no other process, "
        "no kernel doors",
    )

    applied, status = _landlock_status(disabled)
    statuses.append(status)
    if applied:
        active.add("landlock")
    if keep_capability and "landlock" not in active and "user" not in disabled:
        # Without Landlock the capability would let a run read any file: run as root instead.
        statuses = [s for s in statuses if s.name != "user"]
        active.discard("user")
        statuses.append(
            LayerStatus("user", False, "the Python installation is not readable by "
                        f"{config.run_as_user} and Landlock is not there to confine a capability")
        )  # fmt: skip
        uid = gid = None
        keep_capability = False
    network_detail = (
        "outbound TCP through the broker, to ports "
        f"{','.join(map(str, config.net_ports))} of public addresses"
        if config.network == "on"
        else "no network: the broker refuses everything (and a namespace of its own where "
        "the service runs as root)"
    )
    record("network", True, network_detail)

    scratch_root = tempfile.mkdtemp(prefix="pyexec-runs-", dir=config.scratch_dir or None)
    # Runs may pass through to their own folder, not list the others.
    os.chmod(scratch_root, 0o711)  # noqa: S103
    result = Plan(
        config=config,
        layers=frozenset(active),
        uid=uid,
        gid=gid,
        keep_read_capability=keep_capability,
        scratch_root=scratch_root,
        read_paths=tuple(read_paths),
        read_rules=landlock.open_paths(tuple(read_paths)) if "landlock" in active else (),
    )
    order = {name: index for index, name in enumerate(LAYERS)}
    return result, sorted(statuses, key=lambda s: order[s.name])


def _landlock_status(disabled: set[str]) -> tuple[bool, LayerStatus]:
    """Whether Landlock is applied to runs, and whether that is enough for its guarantees.

    Below ``landlock.REQUIRED_ABI`` it is still applied for what it can do, but reported
    inactive, so that ``EXECUTOR_REQUIRE_ISOLATION=1`` refuses to start on such a kernel.
    """
    if "landlock" in disabled:
        return False, LayerStatus("landlock", False, "switched off by configuration")
    abi = landlock.abi_version()
    have, missing = landlock.features(abi)
    if not abi:
        return False, LayerStatus("landlock", False, "Landlock is not available in this kernel")
    if abi < landlock.REQUIRED_ABI:
        detail = f"Landlock ABI {abi} lacks {'; '.join(missing)} (applied for what it has)"
        return True, LayerStatus("landlock", False, detail)
    extra = f"; without {'; '.join(missing)}" if missing else ""
    return True, LayerStatus("landlock", True, f"Landlock ABI {abi}: {', '.join(have)}{extra}")


IN_FOLDER = "in"
OUT_FOLDER = "out"


def new_scratch_name() -> str:
    """A run's folder name: random, so that no run can find another's (the root is 0711: it
    can be passed through, not listed; Landlock leaves stat, inotify and metadata to seccomp)."""
    return secrets.token_hex(16)


def scratch_path(plan: Plan, name: str) -> str:
    return os.path.join(plan.scratch_root, name)


def enter(plan: Plan, name: str, timings: dict[str, float] | None = None) -> str:
    """In a freshly forked child: apply the OS layers; return the run's scratch folder.

    Raises :class:`~sandbox.errors.SyscallError` (or OSError) if a layer the warm parent
    found working cannot be applied; the child must then exit without running anything.
    ``timings``, when given, receives the milliseconds each step took.
    """
    started = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal started
        if timings is not None:
            now = time.perf_counter()
            timings[step] = round((now - started) * 1000, 3)
            started = now

    layers = plan.layers
    config = plan.config
    scratch = scratch_path(plan, name)
    if not os.path.isdir(plan.scratch_root):
        # Removed under us (a temporary-folder cleaner): make it again rather than fail runs.
        os.makedirs(plan.scratch_root, exist_ok=True)
        os.chmod(plan.scratch_root, 0o711)  # noqa: S103 - pass through, no listing
    os.mkdir(scratch, 0o700)
    # What the script leaves in out/ is stored and listed in the reply (the pool adds in/).
    outputs = os.path.join(scratch, OUT_FOLDER)
    os.mkdir(outputs, 0o700)
    if plan.uid is not None and "user" in layers:
        os.chown(scratch, plan.uid, plan.gid if plan.gid is not None else -1)
        os.chown(outputs, plan.uid, plan.gid if plan.gid is not None else -1)
    os.chdir(scratch)
    _clean_environment(config, scratch)
    lap("scratch and environment")
    if "limits" in layers:
        _limit_resources(config)
        lap("limits")
    if config.network == "off" and "network" in layers and os.geteuid() == 0:
        number = SYS_UNSHARE.get(syscalls.machine())
        if number is not None:
            syscalls.syscall(number, ctypes.c_int(CLONE_NEWNET), what="unshare(CLONE_NEWNET)")
            lap("network namespace")
    if "user" in layers and plan.uid is not None:
        _drop_user(plan)
        lap("user")
    if layers & {"seccomp", "landlock", "user"}:
        syscalls.no_new_privs()
    if "landlock" in layers:
        # No TCP connect or bind at all (where the kernel has TCP rules): a run's connections
        # are made by the broker and arrive connected. Of /proc, only the run's own entries
        # that say nothing of the host (no net/, mounts or task/).
        own_proc = landlock.open_paths(
            tuple(f"/proc/{os.getpid()}/{name}" for name in OWN_PROC_ENTRIES)
        )
        landlock.restrict(
            landlock.Rules(
                read_only=(*plan.read_rules, *own_proc),
                read_write=(scratch, "/dev/null"),
                connect_ports=(),
            )
        )
        for rule in own_proc:
            os.close(rule.fd)
        lap("landlock")
    if "seccomp" in layers:
        seccomp.install(os.getpid())
        lap("seccomp")
    return scratch


def network_rules(config: PoolConfig) -> NetworkRules:
    """The rules the broker applies to every connection of this pool's runs."""
    return NetworkRules(
        enabled=config.network == "on",
        ports=frozenset(config.net_ports),
        allowed=tuple(parse_allow(entry) for entry in config.net_allow),
        own=local_addresses(),
    )


def clean_environment(config: PoolConfig) -> None:
    """Keep only the allow-listed variables, with a fixed PATH and LANG. The warm parent does
    this once before it forks (it starts with just the allowed ones); each child checks again
    and adds its own HOME and TMPDIR."""
    allowed = {*config.passthrough_env, *_SET_BY_POOL, *_SET_PER_RUN} - {"PYTHONPATH"}
    for key in [key for key in os.environ if key not in allowed]:
        del os.environ[key]
    for key, value in _FIXED.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _clean_environment(config: PoolConfig, scratch: str) -> None:
    clean_environment(config)
    os.environ["HOME"] = scratch
    os.environ["TMPDIR"] = scratch
    tempfile.tempdir = scratch


_FIXED = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_SET_PER_RUN = ("HOME", "TMPDIR")


MIN_USER_TASKS = 1024
TASKS_PER_WORKER = 64

# Set by the pool for the warm parent: numeric libraries must not start thread pools.
_SET_BY_POOL = ("PATH", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _limit_resources(config: PoolConfig) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    base = _address_space_bytes()
    limit = base + config.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    scratch_bytes = config.scratch_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (scratch_bytes, scratch_bytes))
    # A write past the file-size limit fails with EFBIG instead of killing the run.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES))
    # Threads and processes of the runs' user, all runs together: a run that starts threads
    # without end gets EAGAIN at this count instead of using up the host's (or container's)
    # process table, which the warm parents need to fork. The kernel checks it for an
    # unprivileged user only (the user layer); the warm parents have no such limit.
    tasks = user_task_limit(config)
    resource.setrlimit(resource.RLIMIT_NPROC, (tasks, tasks))


def user_task_limit(config: PoolConfig) -> int:
    """How many threads and processes the runs' user may have at once."""
    return max(MIN_USER_TASKS, TASKS_PER_WORKER * config.workers + 64)


def limit_cpu(timeout: float) -> None:
    """CPU seconds for the run: its timeout and one more; the kernel stops it past that."""
    soft = math.ceil(timeout) + 1
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))


def _address_space_bytes() -> int:
    """This process's address space (``/proc/self/statm``, read without the text-file stack:
    in a freshly forked child that stack's first use costs more than the rest of the step)."""
    fd = os.open("/proc/self/statm", os.O_RDONLY)
    try:
        fields = os.read(fd, 256).split()
    finally:
        os.close(fd)
    return int(fields[0]) * os.sysconf("SC_PAGE_SIZE") if fields else 0


def _drop_user(plan: Plan) -> None:
    assert plan.uid is not None
    assert plan.gid is not None
    os.setgroups([])
    os.setgid(plan.gid)
    if plan.keep_read_capability:
        syscalls.keep_capabilities(True)
    os.setuid(plan.uid)
    if plan.keep_read_capability:
        syscalls.set_capabilities((syscalls.CAP_DAC_READ_SEARCH,))
        syscalls.keep_capabilities(False)
