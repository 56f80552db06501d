"""Pools for tests of the isolation layers: a pool on a loop of its own thread, its probes.

Shared by the layer tests (``test_layers``, ``test_network_isolation``, ``test_quota``): a
:class:`LivePool` lets synchronous tests share one pool per module, :func:`attempt` builds a
probe script that reports the OSError it meets, and :class:`Listener` is a loopback TCP
listener that reports what reached it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from textwrap import dedent, indent
from typing import Any, TypeVar

import pytest

from sandbox import isolation
from sandbox.api import Job, Outcome
from sandbox.config import PoolConfig
from sandbox.isolation import LAYERS
from sandbox.pool import Pool

T = TypeVar("T")

SETTLE = 20.0  # seconds to wait for a state to be reached (not a measured bound)
QUIET = 0.3  # seconds a listener is watched for a connection that should not come
IS_ROOT = os.geteuid() == 0
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
    """A :class:`Pool` on an event loop in a thread of its own, so sync tests can share it.

    With ``empty_network`` (root only) that thread first moves to a network namespace of its
    own with no interfaces: the pool's broker, its warm parent and its runs then have no route
    anywhere, so a test of a refusal can never send a packet even if the refusal failed.
    """

    def __init__(self, config: PoolConfig, *, empty_network: bool = False) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            if empty_network:
                enter_empty_network_namespace()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="live-pool")
        self._thread.start()
        try:
            self.pool = self._wait(self._start(config), SETTLE * 6)
        except BaseException:
            self._stop_loop()
            raise
        pids = [self.pool.parent_pid(tier) for tier in self.pool.tiers]
        assert None not in pids
        # The smallest tier's: where scripts that import no library run.
        self.parent_pids = [pid for pid in pids if pid is not None]
        self.parent_pid = self.parent_pids[0]

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
        processes = {pid for parent in self.parent_pids for pid in (parent, *children_of(parent))}
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


CLONE_NEWNET = 0x40000000


def enter_empty_network_namespace() -> None:
    """Move the calling thread into a new network namespace (no interfaces, not even lo up)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")


@contextlib.contextmanager
def live(config: PoolConfig, *, empty_network: bool = False) -> Iterator[LivePool]:
    pool = LivePool(config, empty_network=empty_network)
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
