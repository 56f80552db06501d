"""Fixtures: a real nats-server on a free port, real replicas as processes, a signing caller."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from pyexec_client.client import Client
from pyexec_client.errors import NoReplica
from pyexec_client.signing import sign

from consumer import protocol
from consumer.config import environment_with
from consumer.embedded import server_binary
from consumer.protocol import Reply
from sandbox.config import PoolConfig
from tests.pools import Listener

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
KEY_ID = "test"
SECRET = secrets.token_hex(32)
OLD_KEY_ID = "old"
OLD_SECRET = secrets.token_hex(32)
_prefixes = itertools.count(1)


def reply_signed(
    secret: str, subject: str, nonce: str, headers: dict[str, str] | None, body: bytes
) -> bool:
    """Whether ``body`` with ``headers`` is signed by ``secret`` as the answer to the request
    sent on ``subject`` with ``nonce``."""
    headers = headers or {}
    stamp = headers.get("Pyexec-Timestamp", "")
    digest = hashlib.sha256(body).hexdigest()
    canonical = f"v1-reply\n{subject}\n{nonce}\n{stamp}\n{digest}".encode()
    expected = hmac.new(secret.encode(), canonical, hashlib.sha256).hexdigest()
    return headers.get("Pyexec-Signature") == expected and stamp.isdigit()


def until(check: Callable[[], bool], timeout: float = 30.0, what: str = "the condition") -> None:
    """Poll ``check`` until it holds; fail the test if it does not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


async def once_routed(call: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """``await call()``, asked again while NATS answers "no responders". Under load the server
    was seen saying so for a moment to a request sent right after another connection's
    subscription was flushed; what a test checks is the answer, not that moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except (NoReplica, nats.errors.NoRespondersError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def stop_process(process: subprocess.Popen[Any], signum: int, timeout: float) -> int:
    """Send ``signum``, wait up to ``timeout`` for the exit code; kill the process if it is
    still there then (the wait's TimeoutExpired goes on to the test)."""
    if process.poll() is None:
        process.send_signal(signum)
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def stored_on(nc: nats.NATS, subject: str, settle: float = 1.0) -> list[Any]:
    """Every message a stream holds on ``subject``, read by an ordered consumer until none
    comes for ``settle`` seconds."""
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
    found = []
    try:
        while True:
            try:
                found.append(await sub.next_msg(timeout=settle))
            except nats.errors.TimeoutError:
                return found
    finally:
        await sub.unsubscribe()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class NatsServer:
    """A nats-server process with JetStream on 127.0.0.1."""

    port: int
    store: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
             str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
                continue
            # Another process may have taken the port between free_port() and the bind: then
            # what answered is not this server, which has exited.
            time.sleep(0.1)
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited at start (port {self.port} taken?)")
            return
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server for the whole session; replicas keep apart by subject prefix."""
    server = NatsServer(port=free_port(), store=tmp_path_factory.mktemp("jetstream"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of the test's own, with file storage: its streams start empty, and it can
    be stopped and started again on the same port."""
    nats_server = NatsServer(port=free_port(), store=tmp_path / "js")
    nats_server.start()
    yield nats_server
    nats_server.stop()


# -- fixtures for pools of the test's own (tests/pools.py) --------------------------------------


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


@dataclass
class ReplicaProcess:
    """``pyexec serve`` as a real process, with its log lines collected as they come."""

    process: subprocess.Popen[str]
    prefix: str
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread = field(default_factory=threading.Thread)

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines so far."""
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def wait_for(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if record.get("event") == event:
                    return record
            if self.process.poll() is not None:
                raise RuntimeError(f"replica exited: {''.join(self.lines)[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no '{event}' log line within {timeout} s")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the replica, wait for it to exit, and return its exit code."""
        try:
            return stop_process(self.process, signum, timeout)
        finally:
            self.reader.join(timeout=5)
            if self.process.stderr is not None:
                self.process.stderr.close()


def replica_env(nats_url: str, prefix: str, **overrides: str) -> dict[str, str]:
    env = environment_with(
        NATS_URL=nats_url,
        EXECUTOR_API_KEYS=f"{KEY_ID}:{SECRET},{OLD_KEY_ID}:{OLD_SECRET}",
        EXECUTOR_SUBJECT_PREFIX=prefix,
        EXECUTOR_QUEUE_GROUP=prefix,
        EXECUTOR_WORKERS="2",
        EXECUTOR_LOG_FORMAT="json",
        EXECUTOR_METRICS_PORT="0",
        EXECUTOR_MAX_TIMEOUT="10",
        EXECUTOR_DEFAULT_TIMEOUT="5",
        EXECUTOR_SHUTDOWN_GRACE="15",
    )
    env.update(overrides)
    return env


def start_replica(
    nats_url: str,
    prefix: str | None = None,
    *,
    cwd: Path | None = None,
    wait: bool = True,
    **overrides: str,
) -> ReplicaProcess:
    """Start a replica and (unless ``wait`` is false) wait until it serves."""
    prefix = prefix or f"t{next(_prefixes)}"
    process = subprocess.Popen(
        [sys.executable, "-m", "consumer", "serve"],
        env=replica_env(nats_url, prefix, **overrides),
        cwd=cwd or ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    replica = ReplicaProcess(process=process, prefix=prefix)

    def collect() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            replica.lines.append(line)

    replica.reader = threading.Thread(target=collect, daemon=True)
    replica.reader.start()
    if not wait:
        return replica
    try:
        replica.wait_for("replica ready")
    except BaseException:
        replica.stop(signal.SIGKILL)
        raise
    return replica


@pytest.fixture(scope="session")
def replica(nats_server: NatsServer) -> Iterator[ReplicaProcess]:
    """A replica with a small stdout limit, shared by tests that do not stop it."""
    proc = start_replica(nats_server.url, "shared", EXECUTOR_STDOUT_LIMIT="200")
    yield proc
    proc.stop()


@dataclass
class RawReply:
    """A reply as it came over the wire: decoded body plus headers."""

    reply: Reply
    headers: dict[str, str]
    data: bytes


class Caller:
    """Synchronous helpers over the real client, one connection per call."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix

    def subject(self, kind: str) -> str:
        return f"{self.prefix}.{kind}"

    def code(self, source: str, ctx: dict[str, Any] | None = None, **options: Any) -> Reply:
        async def go() -> Reply:
            async with await Client.connect(self.url, KEY_ID, SECRET, prefix=self.prefix) as c:
                return await c.execute_code(source, ctx, **options)

        return asyncio.run(go())

    def named(self, name: str, ctx: dict[str, Any] | None = None, **options: Any) -> Reply:
        async def go() -> Reply:
            async with await Client.connect(self.url, KEY_ID, SECRET, prefix=self.prefix) as c:
                return await c.execute_named(name, ctx, **options)

        return asyncio.run(go())

    def raw(
        self,
        kind: str,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        signed: bool = True,
        subject: str | None = None,
        timeout: float = 20.0,
    ) -> RawReply:
        """Send ``body`` as it is; signed for its subject unless ``headers`` or ``signed=False``."""
        target = subject or self.subject(kind)
        sent = dict(headers or {})
        if signed and headers is None:
            sent = sign(KEY_ID, SECRET.encode(), target, body)

        async def go() -> RawReply:
            nc = await nats.connect(self.url)
            try:
                msg = await nc.request(target, body, timeout=timeout, headers=sent or None)
            finally:
                await nc.close()
            got = dict(msg.headers or {})
            encoding: protocol.Encoding = (
                protocol.MSGPACK
                if got.get("Content-Type") == protocol.MSGPACK_CONTENT_TYPE
                else protocol.JSON
            )
            return RawReply(protocol.decode_reply(msg.data, encoding), got, msg.data)

        return asyncio.run(go())


@pytest.fixture(scope="session")
def caller(nats_server: NatsServer, replica: ReplicaProcess) -> Caller:
    """Calls the shared replica."""
    return Caller(nats_server.url, replica.prefix)
