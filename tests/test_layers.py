"""Each OS isolation layer on its own: the policy layer and every other OS layer switched off.

With the policy off a script is plain Python with real builtins (``import os``, ``open``,
``socket``, ``subprocess``), so what stops it here is the one layer under test and nothing
else. The file, process and network refusals have controls in a pool with every layer off,
where the same attempts work.

Pools run on an event loop of their own thread (:class:`LivePool`) so that the tests of one
layer share one pool. Network tests only ever reach a listener on 127.0.0.1; the addresses
outside loopback are ones the guard refuses, tried from a socket bound to 127.0.0.1 so that
even a guard that let them through could not send a packet off the host (the kernel answers
EINVAL for a loopback source and a non-loopback destination).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import math
import os
import re
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from textwrap import dedent, indent
from typing import Any, TypeVar

import pytest

from sandbox import isolation, landlock, seccomp, syscalls
from sandbox.api import Job, Outcome
from sandbox.config import PoolConfig
from sandbox.isolation import LAYERS
from sandbox.pool import Pool

T = TypeVar("T")

SETTLE = 20.0  # seconds to wait for a state to be reached (not a measured bound)
QUIET = 0.3  # seconds a listener is watched for a connection that should not come
IS_ROOT = os.geteuid() == 0
UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
NOBODY = 65534


# -- helpers --------------------------------------------------------------------------------------


# The user layer alone needs a Python installation the unprivileged user can read: otherwise
# the run would keep CAP_DAC_READ_SEARCH, which only Landlock confines, so the layer stays off.
PYTHON_HIDDEN = not all(isolation.readable_by_others(p) for p in isolation.python_read_paths())
USER_ALONE_XFAIL = pytest.mark.xfail(
    IS_ROOT and PYTHON_HIDDEN,
    strict=True,
    reason=(
        "the Python installation is not readable by 'nobody' on this host (it lives under a "
        "0700 folder such as /root/.pyenv), so isolation.plan() would have to keep "
        "CAP_DAC_READ_SEARCH, refuses to without Landlock, and reports the user layer inactive: "
        "with Landlock off, runs stay uid 0"
    ),
)
ROOT_ONLY = pytest.mark.skipif(
    not IS_ROOT,
    reason="needs the tests to run as root: only then do runs switch users or get a namespace",
)

ATTEMPT = """\
import errno
def execute(ctx):
    try:
{body}
    except OSError as exc:
        return {{"error": type(exc).__name__, "errno": errno.errorcode.get(exc.errno)}}
    return {{"value": value}}
"""


def attempt(body: str) -> str:
    """A script that runs ``body`` (which sets ``value``) and reports an OSError it raises."""
    return ATTEMPT.format(body=indent(dedent(body).strip("\n"), " " * 8))


def refusal(kind: str, code: str) -> dict[str, str]:
    """What :func:`attempt` reports when ``body`` raised ``kind`` with errno ``code``."""
    return {"error": kind, "errno": code}


def only(layer: str | None, scratch: Path, **settings: Any) -> PoolConfig:
    """A config with the policy and every OS layer but ``layer`` switched off."""
    disabled = tuple(name for name in LAYERS if name != layer)
    return PoolConfig(
        workers=2, warm_children=2, disabled_layers=disabled, scratch_dir=str(scratch), **settings
    )


def ok_result(outcome: Outcome) -> Any:
    """The result of a run that must have ended ok."""
    assert outcome.status == "ok", outcome.error
    assert outcome.error is None
    return outcome.result


def assert_policy_violation(outcome: Outcome, *mentions: str) -> None:
    """The run ended policy_violation and the message names every one of ``mentions``."""
    assert outcome.status == "error", outcome
    assert outcome.error is not None
    assert outcome.error.code == "policy_violation", outcome.error
    for mention in mentions:
        assert mention in outcome.error.message, outcome.error.message


def eventually(condition: Callable[[], bool], timeout: float = SETTLE) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def children_of(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (every thread's list), empty if it is gone."""
    found: set[int] = set()
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found.update(int(word) for word in listing.read_text().split())
    return found


def processes_running(argv: list[str]) -> set[int]:
    """The live processes whose command line is exactly ``argv``."""
    wanted = b"".join(arg.encode() + b"\0" for arg in argv)
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes() != wanted:
                continue
        except OSError:
            continue
        if alive(int(entry.name)):
            found.add(int(entry.name))
    return found


class LivePool:
    """A :class:`Pool` on an event loop in a thread of its own, so sync tests can share it."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="live-pool")
        self._thread.start()
        try:
            self.pool = self._wait(self._start(config), SETTLE * 6)
        except BaseException:
            self._stop_loop()
            raise
        assert self.pool._parent is not None
        self.parent_pid = self.pool._parent.pid

    @staticmethod
    async def _start(config: PoolConfig) -> Pool:
        pool = Pool(config)
        await pool.start()
        return pool

    def _wait(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def submit(
        self, source: str, timeout: float = 10.0, **ctx: Any
    ) -> concurrent.futures.Future[Outcome]:
        """Start one job (its source indented freely); the future holds its outcome."""
        job = Job(source=dedent(source), ctx=ctx, timeout=timeout)
        return asyncio.run_coroutine_threadsafe(self.pool.run(job), self._loop)

    def run(self, source: str, timeout: float = 10.0, **ctx: Any) -> Outcome:
        """Run one job and return its outcome."""
        return self.submit(source, timeout, **ctx).result(timeout + SETTLE)

    def layer(self, name: str) -> isolation.LayerStatus:
        (status,) = (status for status in self.pool.layers if status.name == name)
        return status

    def close(self) -> None:
        """Close the pool, stop the loop, and check that none of the pool's processes lives."""
        processes = {self.parent_pid, *children_of(self.parent_pid)}
        try:
            self._wait(self.pool.close(), SETTLE)
        finally:
            self._stop_loop()
        assert eventually(lambda: not any(alive(pid) for pid in processes))

    def _stop_loop(self) -> None:
        """Stop the loop's thread, then finish the loop here as asyncio.run would."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(SETTLE)
        assert not self._thread.is_alive()
        self._loop.run_until_complete(_cancel_the_rest())
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()


async def _cancel_the_rest() -> None:
    """Cancel every other task of the running loop and wait for them to end."""
    pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


@contextlib.contextmanager
def live(config: PoolConfig) -> Iterator[LivePool]:
    pool = LivePool(config)
    try:
        yield pool
    finally:
        pool.close()


class Listener:
    """A TCP listener on 127.0.0.1 that reports the connections it was offered."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]

    def take(self, wait: float = QUIET) -> list[bytes]:
        """Accept every connection waiting or arriving within ``wait`` s; what each one sent."""
        received = []
        deadline = time.monotonic() + wait
        while True:
            readable, _, _ = select.select([self.sock], [], [], max(deadline - time.monotonic(), 0))
            if not readable:
                return received
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while chunk := conn.recv(4096):
                        data += chunk
                received.append(data)

    def close(self) -> None:
        self.sock.close()


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch_base() -> Iterator[Path]:
    """Where the pools make their scratch roots: a folder every user can pass through."""
    base = Path(tempfile.mkdtemp(prefix="pyexec-layers-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def tcp_listener() -> Iterator[Listener]:
    """One listener for the module: the pool that allows it needs its port when it starts."""
    listener = Listener()
    assert listener.port not in PoolConfig().net_ports
    yield listener
    listener.close()


@pytest.fixture
def listener(tcp_listener: Listener) -> Iterator[Listener]:
    """The module's listener, with nothing left over from an earlier test."""
    tcp_listener.take(0)
    yield tcp_listener
    tcp_listener.take(0)


@pytest.fixture
def root_only_dir() -> Iterator[Path]:
    """A root-owned 0755 folder that every user can reach and list (under /tmp, not tmp_path)."""
    folder = Path(tempfile.mkdtemp(prefix="pyexec-root-only-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def bare_pool(scratch_base: Path) -> Iterator[LivePool]:
    """Every layer off: the control where every attempt below works."""
    with live(only(None, scratch_base)) as pool:
        yield pool


@pytest.fixture(scope="module")
def full_pool(scratch_base: Path) -> Iterator[LivePool]:
    """Every layer on, as configured by default."""
    with live(PoolConfig(workers=1, warm_children=1, scratch_dir=str(scratch_base))) as pool:
        yield pool


@pytest.fixture(scope="module")
def landlock_pool(scratch_base: Path) -> Iterator[LivePool]:
    """Landlock alone."""
    if landlock.abi_version() == 0:
        pytest.skip("Landlock is not available in this kernel")
    with live(only("landlock", scratch_base)) as pool:
        yield pool


@pytest.fixture(scope="module")
def seccomp_pool(scratch_base: Path) -> Iterator[LivePool]:
    """The seccomp filter alone."""
    reason = seccomp.supported()
    if reason is not None:
        pytest.skip(reason)
    with live(only("seccomp", scratch_base)) as pool:
        yield pool


@pytest.fixture(scope="module")
def user_pool(scratch_base: Path) -> Iterator[LivePool]:
    """The user layer alone."""
    with live(only("user", scratch_base)) as pool:
        yield pool


@pytest.fixture(scope="module")
def user_landlock_pool(scratch_base: Path) -> Iterator[LivePool]:
    """The user and Landlock layers together, the policy and the other OS layers off."""
    if landlock.abi_version() == 0:
        pytest.skip("Landlock is not available in this kernel")
    disabled = ("policy", "limits", "seccomp", "network")
    config = PoolConfig(
        workers=1, warm_children=1, disabled_layers=disabled, scratch_dir=str(scratch_base)
    )
    with live(config) as pool:
        yield pool


MEMORY_MB = 128
SCRATCH_LIMIT_MB = 1
LEAKY_ENVIRONMENT = {
    "EXECUTOR_API_KEYS": "layer-test:not-a-real-secret",
    "EXECUTOR_WORKERS": "3",
    "NATS_URL": "nats://127.0.0.1:4222",
}


@pytest.fixture(scope="module")
def limits_pool(scratch_base: Path) -> Iterator[LivePool]:
    """The limits layer alone, started while the test process has service variables set."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in LEAKY_ENVIRONMENT.items():
            patch.setenv(key, value)
        config = only(
            "limits", scratch_base, memory_mb=MEMORY_MB, scratch_limit_mb=SCRATCH_LIMIT_MB
        )
        with live(config) as pool:
            yield pool


@pytest.fixture(scope="module")
def network_pool(scratch_base: Path) -> Iterator[LivePool]:
    """The network layer alone, with the default ports (80, 443) and no allow list."""
    with live(only("network", scratch_base)) as pool:
        yield pool


@pytest.fixture(scope="module")
def allowing_pool(scratch_base: Path, tcp_listener: Listener) -> Iterator[LivePool]:
    """The network layer alone, allowing the module's listener."""
    allow = (f"127.0.0.1:{tcp_listener.port}",)
    with live(only("network", scratch_base, net_allow=allow)) as pool:
        yield pool


@pytest.fixture(scope="module")
def offline_pool(scratch_base: Path, tcp_listener: Listener) -> Iterator[LivePool]:
    """The network layer alone with the network off, the listener allowed all the same."""
    allow = (f"127.0.0.1:{tcp_listener.port}",)
    with live(only("network", scratch_base, network="off", net_allow=allow)) as pool:
        yield pool


# Probes shared by the layers' tests and their controls.
READ_FILE = attempt(
    """
    with open(ctx["path"], encoding="utf-8", errors="replace") as handle:
        value = len(handle.read())
    """
)
WRITE_FILE = attempt(
    """
    with open(ctx["path"], "w", encoding="utf-8") as handle:
        handle.write("written from a run")
    value = "written"
    """
)
FORK = attempt(
    """
    import os
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    value = "forked"
    """
)
SUBPROCESS = attempt(
    """
    import subprocess
    value = subprocess.run(["true"], check=False).returncode
    """
)
EXECV = attempt(
    """
    import os
    os.execv("/bin/true", ["true"])
    value = "still here after exec"
    """
)
PACKET_SOCKET = attempt(
    """
    import socket
    # Protocol 0: the socket receives nothing and nothing is sent on it.
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    raw.close()
    value = "opened"
    """
)
PLAIN_CONNECT = attempt(
    """
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(("127.0.0.1", ctx["port"]))
        sock.sendall(b"plain")
    value = "connected"
    """
)
RAW_CONNECT = attempt(
    """
    import _socket
    # The C socket class under socket.socket: none of the Python-level wrappers apply.
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(("127.0.0.1", ctx["port"]))
        sock.send(b"raw")
    finally:
        sock.close()
    value = "connected"
    """
)
CREATE_CONNECTION = attempt(
    """
    import socket
    with socket.create_connection(("127.0.0.1", ctx["port"]), timeout=5) as sock:
        sock.sendall(b"guarded")
    value = "connected"
    """
)

ALLOCATE = "def execute(ctx):\n    return len(bytearray(ctx['mb'] * 1024 * 1024))\n"
BIG_FILE = """
    import errno, os
    def execute(ctx):
        with open("small.bin", "wb") as handle:
            handle.write(b"s" * (ctx["limit"] // 2))
        report = {"small": os.path.getsize("small.bin")}
        try:
            with open("big.bin", "wb") as handle:
                handle.write(b"b" * (ctx["limit"] * 2))
        except OSError as exc:
            report["error"] = [type(exc).__name__, errno.errorcode.get(exc.errno)]
        report["big"] = os.path.getsize("big.bin")
        return report
    """
MANY_FILES = """
    import errno, os
    def execute(ctx):
        opened = []
        failure = None
        try:
            while len(opened) < 512:
                opened.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            failure = errno.errorcode.get(exc.errno)
        finally:
            for fd in opened:
                os.close(fd)
        return [len(opened), failure]
    """


# -- controls: every layer off --------------------------------------------------------------------


def test_control_files_are_reachable_with_every_layer_off(
    bare_pool: LivePool, tmp_path: Path
) -> None:
    """With every layer off, the reads and writes the file layers refuse all work."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for scripts")
    canary = tmp_path / "canary.txt"
    assert ok_result(bare_pool.run(READ_FILE, path="/etc/passwd"))["value"] > 0
    assert ok_result(bare_pool.run(READ_FILE, path=str(secret))) == {
        "value": len("not for scripts")
    }
    assert ok_result(bare_pool.run(READ_FILE, path="/proc/1/status"))["value"] > 0
    assert ok_result(bare_pool.run(WRITE_FILE, path=str(canary))) == {"value": "written"}
    assert canary.read_text() == "written from a run"


@ROOT_ONLY
def test_control_runs_are_root_with_every_layer_off(
    bare_pool: LivePool, root_only_dir: Path
) -> None:
    """With every layer off (tests as root), runs are uid 0 and can write a root-only folder."""
    source = "import os\ndef execute(ctx):\n    return [os.getuid(), os.geteuid()]\n"
    assert ok_result(bare_pool.run(source)) == [0, 0]
    target = root_only_dir / "control.txt"
    assert ok_result(bare_pool.run(WRITE_FILE, path=str(target))) == {"value": "written"}
    assert target.exists()


def test_control_processes_and_packet_sockets_work_with_every_layer_off(
    bare_pool: LivePool,
) -> None:
    """With every layer off, fork, subprocess and (as root) an AF_PACKET socket work."""
    assert ok_result(bare_pool.run(FORK)) == {"value": "forked"}
    assert ok_result(bare_pool.run(SUBPROCESS)) == {"value": 0}
    if IS_ROOT:
        assert ok_result(bare_pool.run(PACKET_SOCKET)) == {"value": "opened"}


def test_control_loopback_connections_work_with_every_layer_off(
    bare_pool: LivePool, listener: Listener
) -> None:
    """With every layer off, plain, raw and guarded-API connections reach the listener."""
    assert ok_result(bare_pool.run(PLAIN_CONNECT, port=listener.port)) == {"value": "connected"}
    assert listener.take() == [b"plain"]
    assert ok_result(bare_pool.run(RAW_CONNECT, port=listener.port)) == {"value": "connected"}
    assert listener.take() == [b"raw"]
    assert ok_result(bare_pool.run(CREATE_CONNECTION, port=listener.port)) == {"value": "connected"}
    assert listener.take() == [b"guarded"]


def test_control_limit_probes_pass_with_every_layer_off(bare_pool: LivePool) -> None:
    """With every layer off, the allocation, big file and many open files all succeed."""
    assert ok_result(bare_pool.run(ALLOCATE, mb=MEMORY_MB * 4)) == MEMORY_MB * 4 * 1024 * 1024
    limit = SCRATCH_LIMIT_MB * 1024 * 1024
    assert ok_result(bare_pool.run(BIG_FILE, limit=limit)) == {
        "small": limit // 2,
        "big": limit * 2,
    }
    assert ok_result(bare_pool.run(MANY_FILES)) == [512, None]


# -- landlock alone -------------------------------------------------------------------------------


def test_landlock_alone_refuses_reads_outside_its_paths(
    landlock_pool: LivePool, tmp_path: Path
) -> None:
    """Landlock alone refuses /etc/passwd, a secret outside the scratch folder and /proc/1."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for scripts")
    denied = refusal("PermissionError", "EACCES")
    for path in ("/etc/passwd", str(secret), "/proc/1/status"):
        assert ok_result(landlock_pool.run(READ_FILE, path=path)) == denied, path
    # What the rules do allow still reads: the run's own /proc entry and resolver files.
    assert ok_result(landlock_pool.run(READ_FILE, path="/proc/self/status"))["value"] > 0
    assert ok_result(landlock_pool.run(READ_FILE, path="/etc/hosts"))["value"] >= 0


def test_landlock_alone_refuses_writes_outside_the_scratch_folder(
    landlock_pool: LivePool, tmp_path: Path
) -> None:
    """Landlock alone refuses to create a canary in a folder the test owns; it never appears."""
    canary = tmp_path / "canary.txt"
    outcome = landlock_pool.run(WRITE_FILE, path=str(canary))
    assert ok_result(outcome) == refusal("PermissionError", "EACCES")
    assert not canary.exists()
    assert list(tmp_path.iterdir()) == []


def test_landlock_alone_allows_the_scratch_folder(landlock_pool: LivePool) -> None:
    """Under Landlock alone a run writes, reads, lists and removes files in its working folder."""
    source = """
        import os
        def execute(ctx):
            os.mkdir("sub")
            with open("sub/data.txt", "w", encoding="utf-8") as handle:
                handle.write("kept")
            with open(os.path.join(os.getcwd(), "sub", "data.txt"), encoding="utf-8") as handle:
                text = handle.read()
            listed = os.listdir("sub")
            os.remove("sub/data.txt")
            os.rmdir("sub")
            return [text, listed, os.listdir(".")]
        """
    assert ok_result(landlock_pool.run(source)) == ["kept", ["data.txt"], []]


def test_landlock_alone_lets_standard_library_modules_load_lazily(landlock_pool: LivePool) -> None:
    """Under Landlock alone, standard-library modules the warm parent never loaded import."""
    source = """
        import sys
        def execute(ctx):
            names = ["email.mime.text", "wave", "colorsys", "xml.dom.minidom"]
            before = [name for name in names if name in sys.modules]
            import email.mime.text
            import wave
            import colorsys
            import xml.dom.minidom
            return {
                "preloaded": before,
                "mime": email.mime.text.MIMEText("hi").get_content_type(),
                "hls": [round(x, 3) for x in colorsys.rgb_to_hls(1.0, 0.0, 0.0)],
                "xml": xml.dom.minidom.parseString("<a><b/></a>").documentElement.tagName,
                "wave": wave.Wave_write.__name__,
            }
        """
    assert ok_result(landlock_pool.run(source)) == {
        "preloaded": [],
        "mime": "text/plain",
        "hls": [0.0, 0.5, 1.0],
        "xml": "a",
        "wave": "Wave_write",
    }


def test_landlock_alone_refuses_tcp_to_an_unlisted_port(
    landlock_pool: LivePool, listener: Listener
) -> None:
    """Landlock alone refuses a plain TCP connect to a loopback port not in net_ports."""
    assert listener.port not in landlock_pool.config.net_ports
    outcome = landlock_pool.run(PLAIN_CONNECT, port=listener.port)
    assert ok_result(outcome) == refusal("PermissionError", "EACCES")
    assert listener.take() == []


# -- seccomp alone --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probe", [FORK, SUBPROCESS, EXECV], ids=["os.fork", "subprocess.run", "os.execv"]
)
def test_seccomp_alone_refuses_new_processes(seccomp_pool: LivePool, probe: str) -> None:
    """Seccomp alone makes fork, subprocess and exec fail with PermissionError (EPERM)."""
    assert ok_result(seccomp_pool.run(probe)) == refusal("PermissionError", "EPERM")


def test_seccomp_alone_lets_threads_run(seccomp_pool: LivePool) -> None:
    """Under seccomp alone a thread starts, runs in a thread of its own, and joins."""
    source = """
        import threading
        def execute(ctx):
            seen = []
            worker = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
            worker.start()
            worker.join(10)
            return [worker.is_alive(), len(seen), seen[0] != threading.get_native_id()]
        """
    assert ok_result(seccomp_pool.run(source)) == [False, 1, True]


def test_seccomp_alone_refuses_packet_sockets(seccomp_pool: LivePool) -> None:
    """Seccomp alone refuses an AF_PACKET raw socket (EAFNOSUPPORT), even to a root run."""
    assert ok_result(seccomp_pool.run(PACKET_SOCKET)) == refusal("OSError", "EAFNOSUPPORT")


# -- user alone -----------------------------------------------------------------------------------


@ROOT_ONLY
@USER_ALONE_XFAIL
def test_user_alone_runs_as_nobody(user_pool: LivePool) -> None:
    """The user layer alone runs scripts as nobody (uid 65534) when the service is root."""
    source = "import os\ndef execute(ctx):\n    return [os.getuid(), os.geteuid()]\n"
    assert ok_result(user_pool.run(source)) == [NOBODY, NOBODY]


@ROOT_ONLY
@USER_ALONE_XFAIL
def test_user_alone_cannot_write_a_root_only_folder(
    user_pool: LivePool, root_only_dir: Path
) -> None:
    """Under the user layer alone a run can list but not write a root-owned 0755 folder."""
    (root_only_dir / "present.txt").write_text("listed")
    target = root_only_dir / "intruder.txt"
    source = """
        import errno, os
        def execute(ctx):
            listed = os.listdir(ctx["folder"])
            try:
                with open(ctx["target"], "w", encoding="utf-8") as handle:
                    handle.write("x")
            except OSError as exc:
                return [listed, type(exc).__name__, errno.errorcode.get(exc.errno)]
            return [listed, "written", None]
        """
    outcome = user_pool.run(source, folder=str(root_only_dir), target=str(target))
    assert ok_result(outcome) == [["present.txt"], "PermissionError", "EACCES"]
    assert not target.exists()


@ROOT_ONLY
def test_user_with_landlock_runs_as_nobody_with_one_capability(
    user_landlock_pool: LivePool,
) -> None:
    """With Landlock on too, runs are nobody, keeping at most CAP_DAC_READ_SEARCH."""
    assert user_landlock_pool.layer("user").active
    source = """
        import os
        def execute(ctx):
            with open("/proc/self/status", encoding="ascii") as handle:
                fields = dict(line.split(":", 1) for line in handle)
            return [os.getuid(), os.geteuid(), int(fields["CapEff"], 16), int(fields["CapPrm"], 16)]
        """
    expected = 1 << syscalls.CAP_DAC_READ_SEARCH if PYTHON_HIDDEN else 0
    assert ok_result(user_landlock_pool.run(source)) == [NOBODY, NOBODY, expected, expected]


# -- limits alone ---------------------------------------------------------------------------------


def test_limits_alone_stops_allocation_past_memory_mb(limits_pool: LivePool) -> None:
    """Under limits alone a run allocates a little, but past memory_mb ends memory_limit."""
    assert ok_result(limits_pool.run(ALLOCATE, mb=16)) == 16 * 1024 * 1024
    outcome = limits_pool.run(ALLOCATE, mb=MEMORY_MB * 4)
    assert outcome.status == "error"
    assert outcome.error is not None
    assert outcome.error.code == "memory_limit", outcome.error
    assert outcome.error.type == "MemoryError"


def test_limits_alone_stops_files_past_scratch_limit(limits_pool: LivePool) -> None:
    """Under limits alone a file past scratch_limit_mb fails EFBIG, caught by the script."""
    limit = SCRATCH_LIMIT_MB * 1024 * 1024
    assert ok_result(limits_pool.run(BIG_FILE, limit=limit)) == {
        "small": limit // 2,
        "error": ["OSError", "EFBIG"],
        "big": limit,
    }


def test_limits_alone_caps_open_files(limits_pool: LivePool) -> None:
    """Under limits alone a run cannot hold more than 256 open files (EMFILE)."""
    count, failure = ok_result(limits_pool.run(MANY_FILES))
    assert failure == "EMFILE"
    assert 0 < count < isolation.MAX_OPEN_FILES


def test_limits_alone_sets_rlimits_from_the_job(limits_pool: LivePool) -> None:
    """Under limits alone RLIMIT_CPU follows the job's timeout; core, file and fd limits hold."""
    source = """
        import resource
        def execute(ctx):
            return {
                name: list(resource.getrlimit(getattr(resource, name)))
                for name in ("RLIMIT_CPU", "RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NOFILE")
            }
        """
    for timeout in (3.0, 7.5):
        soft = math.ceil(timeout) + 1
        assert ok_result(limits_pool.run(source, timeout=timeout)) == {
            "RLIMIT_CPU": [soft, soft + 1],
            "RLIMIT_CORE": [0, 0],
            "RLIMIT_FSIZE": [SCRATCH_LIMIT_MB * 1024 * 1024] * 2,
            "RLIMIT_NOFILE": [isolation.MAX_OPEN_FILES] * 2,
        }


def test_limits_alone_runs_lead_their_own_session(limits_pool: LivePool) -> None:
    """Under limits alone the run is its own session and process-group leader."""
    source = """
        import os
        def execute(ctx):
            return [os.getsid(0), os.getpgid(0), os.getpid()]
        """
    sid, pgid, pid = ok_result(limits_pool.run(source))
    assert sid == pgid == pid


def test_limits_alone_environment_is_clean(limits_pool: LivePool) -> None:
    """The run sees no EXECUTOR_* or NATS_URL the test process has; HOME and TMPDIR are its cwd."""
    for key, value in LEAKY_ENVIRONMENT.items():
        assert os.environ.get(key) == value  # set while the pool started, and still set
    source = """
        import os, tempfile
        def execute(ctx):
            return {"env": dict(os.environ), "cwd": os.getcwd(), "tmp": tempfile.gettempdir()}
        """
    seen = ok_result(limits_pool.run(source))
    env, cwd = seen["env"], seen["cwd"]
    assert not [key for key in env if key.startswith(("EXECUTOR_", "NATS"))], env
    assert env["HOME"] == env["TMPDIR"] == seen["tmp"] == cwd
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    # Besides the allow list: where the run lives, and the pool's one-thread settings for the
    # numeric libraries.
    allowed = {
        *limits_pool.config.passthrough_env,
        *("PATH", "HOME", "TMPDIR", "LANG"),
        *("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"),
    }
    assert set(env) <= allowed - {"PYTHONPATH"}, env


def _sleepers_of(parent: int) -> set[int]:
    """``sleep 60`` processes whose parent is a child of ``parent``."""
    return {
        pid
        for pid in processes_running(["sleep", "60"])
        if parent_of(parent_of(pid) or 0) == parent
    }


def test_limits_timeout_kills_the_run_and_its_grandchild(limits_pool: LivePool) -> None:
    """With seccomp off too, a run that starts `sleep 60` and loops dies at its timeout with it."""
    assert not limits_pool.layer("seccomp").active
    source = """
        import subprocess
        def execute(ctx):
            subprocess.Popen(["sleep", "60"])
            while True:
                pass
        """
    timeout = 3.0
    started = time.monotonic()
    pending = limits_pool.submit(source, timeout=timeout)
    try:
        assert eventually(lambda: bool(_sleepers_of(limits_pool.parent_pid)), timeout)
        (sleeper,) = _sleepers_of(limits_pool.parent_pid)
        runner = parent_of(sleeper)
        assert runner is not None
    finally:
        outcome = pending.result(timeout + SETTLE)
    elapsed = time.monotonic() - started
    assert outcome.status == "timeout"
    assert outcome.error is not None
    assert outcome.error.code == "timeout"
    assert elapsed < timeout + limits_pool.config.kill_grace + 2
    assert eventually(lambda: not alive(runner))
    assert eventually(lambda: sleeper not in processes_running(["sleep", "60"]))


# -- network alone (the Python-level address guard) -----------------------------------------------


def test_network_alone_refuses_an_unlisted_loopback_port(
    network_pool: LivePool, listener: Listener
) -> None:
    """The guard alone refuses create_connection to 127.0.0.1:PORT; the listener sees nothing."""
    outcome = network_pool.run(CREATE_CONNECTION, port=listener.port)
    assert_policy_violation(outcome, f"127.0.0.1:{listener.port}", "is not allowed")
    assert listener.take() == []


def test_network_alone_allows_a_listed_destination(
    allowing_pool: LivePool, listener: Listener
) -> None:
    """With net_allow naming the listener, the same connection is made and data arrives."""
    outcome = allowing_pool.run(CREATE_CONNECTION, port=listener.port)
    assert ok_result(outcome) == {"value": "connected"}
    assert listener.take() == [b"guarded"]


@pytest.mark.parametrize(
    ("host", "reason"),
    [("169.254.169.254", "link-local address"), ("10.0.0.1", "private address")],
    ids=["metadata", "private"],
)
def test_network_alone_refuses_special_ranges_before_connecting(
    network_pool: LivePool, host: str, reason: str
) -> None:
    """The guard alone refuses metadata and private addresses on port 80, naming the range."""
    # From a socket bound to 127.0.0.1: a real attempt would fail EINVAL and send nothing.
    source = """
        import socket
        def execute(ctx):
            try:
                socket.create_connection(
                    (ctx["host"], 80), timeout=2, source_address=("127.0.0.1", 0)
                )
            except Exception as exc:
                print(type(exc).__name__)
                raise
            return "connected"
        """
    outcome = network_pool.run(source, host=host)
    assert_policy_violation(outcome, f"network access to {host}:80 ({reason})")
    assert outcome.stdout == "PolicyViolation\n"  # refused by the guard, not by the kernel


def test_network_off_refuses_even_an_allowed_destination(
    offline_pool: LivePool, listener: Listener
) -> None:
    """With network="off" the guard refuses the listener net_allow names; nothing arrives."""
    outcome = offline_pool.run(CREATE_CONNECTION, port=listener.port)
    assert_policy_violation(outcome, "the network is off")
    assert listener.take() == []


@ROOT_ONLY
def test_network_off_puts_the_run_in_an_empty_namespace(
    offline_pool: LivePool, listener: Listener
) -> None:
    """With network="off" even a connect below the guard fails: the run has no network at all."""
    outcome = offline_pool.run(RAW_CONNECT, port=listener.port)
    assert ok_result(outcome) == refusal("OSError", "ENETUNREACH")
    assert listener.take() == []


@pytest.mark.xfail(
    strict=True,
    reason=(
        "the network layer with the network on is only a Python-level guard: netguard.install() "
        "wraps methods of socket.socket, and the C base class _socket.socket connects without "
        "them; only Landlock's TCP port rules (when Landlock is on too) act in the kernel"
    ),
)
def test_network_alone_refuses_a_connect_below_the_socket_module(
    network_pool: LivePool, listener: Listener
) -> None:
    """The network layer alone refuses a connect made with _socket.socket directly."""
    outcome = network_pool.run(RAW_CONNECT, port=listener.port)
    assert outcome.result != {"value": "connected"}
    assert listener.take() == []


# -- the scratch folder ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pool_name",
    ["bare_pool", "landlock_pool", "seccomp_pool", "user_pool", "limits_pool", "network_pool"],
)
def test_scratch_folder_exists_during_the_run_and_is_removed_after(
    request: pytest.FixtureRequest, pool_name: str
) -> None:
    """The run's working folder is its own private scratch folder, gone once it was reaped."""
    pool: LivePool = request.getfixturevalue(pool_name)
    source = """
        import os, stat
        def execute(ctx):
            cwd = os.getcwd()
            with open("probe.txt", "w", encoding="utf-8") as handle:
                handle.write("x")
            info = os.stat(cwd)
            return {
                "cwd": cwd,
                "pid": os.getpid(),
                "is_dir": stat.S_ISDIR(info.st_mode),
                "mode": stat.S_IMODE(info.st_mode),
                "files": os.listdir(cwd),
            }
        """
    seen = ok_result(pool.run(source))
    cwd = Path(seen["cwd"])
    assert seen["is_dir"]
    assert seen["mode"] == 0o700
    assert seen["files"] == ["probe.txt"]
    assert cwd.name == str(seen["pid"])
    assert cwd.parent.parent == Path(pool.config.scratch_dir)
    assert eventually(lambda: not cwd.exists())


def test_scratch_root_is_removed_when_the_pool_closes(scratch_base: Path) -> None:
    """After close() the pool's scratch root (and its waiting children's folders) is gone."""
    source = "import os\ndef execute(ctx):\n    return os.getcwd()\n"
    with live(only(None, scratch_base)) as pool:
        root = Path(ok_result(pool.run(source))).parent
        assert root.is_dir()
    assert eventually(lambda: not root.exists(), timeout=2.0), sorted(os.listdir(root))


# -- what the pool reports ------------------------------------------------------------------------


def test_every_layer_is_active_by_default(full_pool: LivePool) -> None:
    """With the default configuration every layer is reported active on this host."""
    assert [status.name for status in full_pool.pool.layers] == list(LAYERS)
    inactive = [status for status in full_pool.pool.layers if not status.active]
    assert inactive == []
    outcome = full_pool.run("import math\ndef execute(ctx):\n    return math.factorial(5)\n")
    assert ok_result(outcome) == 120


@pytest.mark.parametrize(
    "pool_name",
    ["landlock_pool", "seccomp_pool", "user_pool", "limits_pool", "network_pool"],
)
def test_switched_off_layers_are_reported_inactive(
    request: pytest.FixtureRequest, pool_name: str
) -> None:
    """Each layer in disabled_layers but user is inactive, 'switched off by configuration'."""
    pool: LivePool = request.getfixturevalue(pool_name)
    disabled = pool.config.disabled_layers
    assert len(disabled) == len(LAYERS) - 1
    wrong = {
        name: pool.layer(name)
        for name in disabled
        if name != "user"
        and (pool.layer(name).active or pool.layer(name).detail != "switched off by configuration")
    }
    assert wrong == {}


@pytest.mark.parametrize(
    "pool_name",
    [
        "landlock_pool",
        "seccomp_pool",
        "limits_pool",
        "network_pool",
    ],
)
def test_switched_off_user_layer_is_reported_as_switched_off(
    request: pytest.FixtureRequest, pool_name: str
) -> None:
    """A user layer in disabled_layers is reported 'switched off by configuration'."""
    pool: LivePool = request.getfixturevalue(pool_name)
    assert "user" in pool.config.disabled_layers
    status = pool.layer("user")
    assert not status.active
    assert status.detail == "switched off by configuration", status


@pytest.mark.parametrize(
    "layer",
    ["landlock", "seccomp", pytest.param("user", marks=USER_ALONE_XFAIL), "limits", "network"],
)
def test_the_layer_under_test_is_active_on_its_own(
    request: pytest.FixtureRequest, layer: str
) -> None:
    """The one layer a single-layer pool keeps is reported active (so its tests test it)."""
    pool: LivePool = request.getfixturevalue(f"{layer}_pool")
    status = pool.layer(layer)
    assert status.active, status


# -- the seccomp filter itself --------------------------------------------------------------------

AUDIT_ARCH_X86_64 = 0x80000000 | 0x40000000 | 62  # __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE | EM_X86_64
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000


def _header_numbers() -> dict[str, int]:
    if not UNISTD_64.exists():
        pytest.skip(f"{UNISTD_64} is not installed on this host")
    pattern = re.compile(r"^#define __NR_(\w+)\s+(\d+)\s*$", re.MULTILINE)
    return {name: int(number) for name, number in pattern.findall(UNISTD_64.read_text())}


def _x86_64_program(monkeypatch: pytest.MonkeyPatch) -> bytes:
    monkeypatch.setattr(seccomp, "machine", lambda: "x86_64")
    return seccomp.build_filter()


def _evaluate(program: bytes, nr: int, arg0: int = 0, arch: int = AUDIT_ARCH_X86_64) -> int:
    """Run the classic BPF ``program`` on one seccomp_data and return its verdict."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    instructions = list(struct.iter_unpack("<HBBI", program))
    accumulator = 0
    pc = 0
    for _ in range(len(instructions)):
        code, jt, jf, k = instructions[pc]
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            (accumulator,) = struct.unpack_from("<I", data, k)
            pc += 1
        elif code == 0x15:  # BPF_JMP | BPF_JEQ | BPF_K
            pc += 1 + (jt if accumulator == k else jf)
        elif code == 0x35:  # BPF_JMP | BPF_JGE | BPF_K
            pc += 1 + (jt if accumulator >= k else jf)
        elif code == 0x45:  # BPF_JMP | BPF_JSET | BPF_K
            pc += 1 + (jt if accumulator & k else jf)
        elif code == 0x05:  # BPF_JMP | BPF_JA
            pc += 1 + k
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x} at {pc}")
    raise AssertionError("the program ran off its end or looped")


def test_seccomp_table_matches_the_kernel_headers() -> None:
    """Every syscall number in the x86_64 table equals the one in <asm/unistd_64.h>."""
    header = _header_numbers()
    table: dict[str, Any] = seccomp._X86_64
    numbers = {**table["refused"], **{name: table[name] for name in ("clone", "clone3", "socket")}}
    assert table["arch"] == AUDIT_ARCH_X86_64
    missing = sorted(name for name in numbers if name not in header)
    assert not missing, f"not in {UNISTD_64}: {missing}"
    # name: (number in the table, number in the header)
    wrong = {name: (nr, header[name]) for name, nr in numbers.items() if header[name] != nr}
    assert wrong == {}


def test_other_hardcoded_syscall_numbers_match_the_kernel_headers() -> None:
    """The x86_64 numbers for Landlock, unshare and capset equal those in <asm/unistd_64.h>."""
    header = _header_numbers()
    assert header["landlock_create_ruleset"] == syscalls.SYS_LANDLOCK_CREATE_RULESET
    assert header["landlock_add_rule"] == syscalls.SYS_LANDLOCK_ADD_RULE
    assert header["landlock_restrict_self"] == syscalls.SYS_LANDLOCK_RESTRICT_SELF
    assert header["unshare"] == isolation.SYS_UNSHARE["x86_64"]
    assert header["capset"] == syscalls._SYS_CAPSET["x86_64"]


def test_seccomp_filter_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built x86_64 filter refuses its table, threads-only clone, and odd socket families."""
    program = _x86_64_program(monkeypatch)
    assert len(program) % 8 == 0
    assert len(program) // 8 <= 4096  # BPF_MAXINSNS
    eperm, enosys = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
    refused: dict[str, int] = seccomp._X86_64["refused"]
    for name, number in refused.items():
        assert _evaluate(program, number) == eperm, name
    for name, number in {"read": 0, "write": 1, "openat": 257, "connect": 42, "mmap": 9}.items():
        assert _evaluate(program, number) == RET_ALLOW, name
    clone_thread = 0x00010000 | 0x00000100 | 0x00000800  # CLONE_THREAD | CLONE_VM | CLONE_SIGHAND
    assert _evaluate(program, 56, arg0=clone_thread) == RET_ALLOW
    assert _evaluate(program, 56, arg0=17) == eperm  # SIGCHLD only: fork
    assert _evaluate(program, 56, arg0=0x4000 | 0x100 | 17) == eperm  # vfork's flags
    assert _evaluate(program, 435) == enosys
    for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK):
        assert _evaluate(program, 41, arg0=family) == RET_ALLOW, family
    for family in (socket.AF_PACKET, 3, 4, 5, 9):  # packet, AX.25, IPX, AppleTalk, X.25
        assert _evaluate(program, 41, arg0=family) == RET_ERRNO | errno.EAFNOSUPPORT, family
    assert _evaluate(program, 0, arch=0xC00000B7) == RET_KILL_PROCESS  # an aarch64 call
    assert _evaluate(program, 0x40000000 | 0) == RET_KILL_PROCESS  # an x32 call
