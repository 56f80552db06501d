"""A replica's life: sharing a queue group, graceful stop on SIGTERM, refusing bad settings."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from pyexec_client.client import Client
from pyexec_client.errors import ClientError

from consumer.protocol import Reply
from tests.conftest import (
    KEY_ID,
    SECRET,
    NatsServer,
    ReplicaProcess,
    free_port,
    replica_env,
    start_replica,
)

SERVE = [sys.executable, "-m", "consumer", "serve"]


def busy_script(seconds: float) -> str:
    """A script that keeps its worker busy for ``seconds`` and then returns "done"."""
    return (
        "import time\n"
        "def execute(ctx):\n"
        f"    end = time.monotonic() + {seconds}\n"
        "    while time.monotonic() < end:\n"
        "        pass\n"
        "    return 'done'\n"
    )


def service_id(replica: ReplicaProcess) -> str:
    return str(replica.wait_for("replica ready")["service_id"])


async def stats_of(nc: Any, ident: str) -> dict[str, Any]:
    msg = await nc.request(f"$SRV.STATS.pyexec.{ident}", b"", timeout=10)
    return dict(json.loads(msg.data))


def requests_counted(stats: dict[str, Any]) -> int:
    return sum(int(endpoint["num_requests"]) for endpoint in stats["endpoints"])


async def answers_ping(nc: Any, ident: str) -> bool:
    try:
        await nc.request(f"$SRV.PING.pyexec.{ident}", b"", timeout=0.5)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return False
    return True


def stop_all(*replicas: ReplicaProcess) -> None:
    for replica in replicas:
        replica.stop(signal.SIGKILL if replica.process.poll() is None else signal.SIGTERM)


# -- a queue group of two ----------------------------------------------------------------------


def test_two_replicas_in_one_queue_group_share_the_requests(nats_server: NatsServer) -> None:
    """Two replicas with the same prefix both answer some of 40 requests, all of them ok."""
    first = start_replica(nats_server.url, prefix="pair")
    try:
        second = start_replica(nats_server.url, prefix="pair")
        try:
            ids = [service_id(first), service_id(second)]
            assert ids[0] != ids[1]

            async def go() -> tuple[list[Reply], list[dict[str, Any]]]:
                async with await Client.connect(
                    nats_server.url, KEY_ID, SECRET, prefix="pair"
                ) as client:
                    replies = [
                        await client.execute_code(
                            "def execute(ctx):\n    return ctx['i']", {"i": i}
                        )
                        for i in range(40)
                    ]
                    # Stats are counted just after each reply is sent; wait until all 40 are in.
                    deadline = time.monotonic() + 10
                    while True:
                        stats = [await stats_of(client.nc, ident) for ident in ids]
                        if sum(map(requests_counted, stats)) >= 40 or time.monotonic() > deadline:
                            return replies, stats

            replies, stats = asyncio.run(go())
        finally:
            second.stop()
    finally:
        first.stop()
    assert [r.status for r in replies] == ["ok"] * 40
    assert [r.result for r in replies] == list(range(40))
    assert [s["id"] for s in stats] == ids
    counts = [requests_counted(s) for s in stats]
    assert sum(counts) == 40
    assert all(count > 0 for count in counts), counts
    for replica, count in zip((first, second), counts, strict=True):
        assert len([r for r in replica.records() if r.get("event") == "request"]) == count


# -- graceful stop -----------------------------------------------------------------------------


def test_sigterm_lets_the_in_flight_request_finish(nats_server: NatsServer) -> None:
    """SIGTERM during a 2 s request: the caller still gets its ok reply and the replica exits 0."""
    replica = start_replica(nats_server.url)
    try:

        async def go() -> tuple[Reply, int]:
            async with await Client.connect(
                nats_server.url, KEY_ID, SECRET, prefix=replica.prefix
            ) as client:
                call = asyncio.create_task(client.execute_code(busy_script(2.0), timeout=8))
                await asyncio.sleep(0.5)  # let the request reach a worker
                replica.process.send_signal(signal.SIGTERM)
                reply = await call
            code = await asyncio.to_thread(replica.process.wait, 30)
            return reply, code

        reply, code = asyncio.run(go())
        assert replica.wait_for("stopping")["in_flight"] == 1
        assert reply.status == "ok", reply.error
        assert reply.result == "done"
        assert code == 0
        events = [record.get("event") for record in replica.records()]
        assert "stopped" in events
        assert not [r for r in replica.records() if r.get("level") in ("error", "critical")]
    finally:
        stop_all(replica)


def test_after_sigterm_new_requests_are_not_taken(nats_server: NatsServer) -> None:
    """Once a stopping replica has left the queue group, a new request finds no responder."""
    replica = start_replica(nats_server.url)
    ident = service_id(replica)
    try:

        async def go() -> tuple[Reply, str, bool]:
            async with await Client.connect(
                nats_server.url, KEY_ID, SECRET, prefix=replica.prefix
            ) as client:
                call = asyncio.create_task(client.execute_code(busy_script(4.0), timeout=8))
                await asyncio.sleep(0.5)  # let the request reach a worker
                replica.process.send_signal(signal.SIGTERM)
                # The micro endpoints are dropped right after the request subscriptions.
                for _ in range(200):
                    if not await answers_ping(client.nc, ident):
                        break
                    await asyncio.sleep(0.05)
                alive_while_refusing = replica.process.poll() is None
                with pytest.raises(ClientError) as refused:
                    await client.execute_code("def execute(ctx):\n    return 1", timeout=2)
                return await call, str(refused.value), alive_while_refusing

        reply, refusal, alive = asyncio.run(go())
        assert alive, "the replica had exited before the new request was sent"
        assert "no executor is listening" in refusal
        assert reply.status == "ok", reply.error
        assert replica.process.wait(timeout=30) == 0
        handled = [r for r in replica.records() if r.get("event") == "request"]
        assert len(handled) == 1
    finally:
        stop_all(replica)


def test_second_sigterm_stops_without_waiting(nats_server: NatsServer) -> None:
    """A second SIGTERM in the grace period ends it at once: the in-flight script is stopped and
    its caller answered worker_lost right away, long before the script could have finished."""
    replica = start_replica(nats_server.url, EXECUTOR_SHUTDOWN_GRACE="30")
    try:

        async def go() -> tuple[int, Reply, float]:
            async with await Client.connect(
                nats_server.url, KEY_ID, SECRET, prefix=replica.prefix
            ) as client:
                call = asyncio.create_task(client.execute_code(busy_script(9.0), timeout=10))
                await asyncio.sleep(0.5)  # let the request reach a worker
                started = time.monotonic()
                replica.process.send_signal(signal.SIGTERM)
                await asyncio.to_thread(replica.wait_for, "stopping")
                replica.process.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(replica.process.wait, 30)
                reply = await call
                return code, reply, time.monotonic() - started

        code, reply, waited = asyncio.run(go())
        assert reply.status == "error"
        assert reply.error is not None
        assert reply.error.code == "worker_lost"
        assert "replica stopped" in reply.error.message
        assert waited < 9, "the stop waited for the script"
        assert code == 0
        assert replica.wait_for("stopping")["in_flight"] == 1
        cut = replica.wait_for("grace period over; cutting in-flight requests")
        assert cut["count"] == 1
        assert "stopped" in [record.get("event") for record in replica.records()]
    finally:
        stop_all(replica)


# -- refusing to start -------------------------------------------------------------------------


def run_serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``pyexec serve`` expected to refuse to start; killed if it serves instead."""
    return subprocess.run(
        SERVE,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_nats_url_without_keys_refuses_to_start(nats_server: NatsServer) -> None:
    """With NATS_URL set and no signing key, serve exits non-zero naming both key variables."""
    env = replica_env(nats_server.url, "nokeys")
    del env["EXECUTOR_API_KEYS"]
    done = run_serve(env)
    assert done.returncode != 0
    assert "EXECUTOR_API_KEYS" in done.stderr
    assert "EXECUTOR_API_KEY" in done.stderr.replace("EXECUTOR_API_KEYS", "")
    assert "Traceback" not in done.stderr


SHORT_SECRET = secrets.token_hex(8)[:15]  # one character under the minimum of 16


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EXECUTOR_WORKERS", "abc"),
        ("EXECUTOR_WORKERS", "0"),
        ("EXECUTOR_MAX_TIMEOUT", "-1"),
        ("EXECUTOR_MAX_TIMEOUT", "soon"),
        ("EXECUTOR_DEFAULT_TIMEOUT", "0"),
        ("EXECUTOR_MEMORY_MB", "lots"),
        ("EXECUTOR_METRICS_PORT", "70000"),
        ("EXECUTOR_METRICS_HOST", "localhost"),
        ("EXECUTOR_METRICS_KEY_IDS", "maybe"),
        ("EXECUTOR_API_KEYS", "nocolon"),
        ("EXECUTOR_API_KEYS", f"test:{SECRET},bad id:{SECRET}"),
        ("EXECUTOR_API_KEYS", f"test:{SECRET},short:{SHORT_SECRET}"),
        ("EXECUTOR_API_KEY", SHORT_SECRET),
        ("EXECUTOR_LOG_FORMAT", "xml"),
        ("EXECUTOR_SCRIPTS_DIR", "/nonexistent"),
    ],
)
def test_malformed_setting_refuses_to_start(
    nats_server: NatsServer, variable: str, value: str
) -> None:
    """A malformed setting stops serve with a message naming the variable and no secret."""
    env = replica_env(nats_server.url, "malformed", **{variable: value})
    if variable == "EXECUTOR_API_KEY":
        del env["EXECUTOR_API_KEYS"]
    done = run_serve(env)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert variable in done.stderr
    assert "Traceback" not in output
    assert SECRET not in output
    assert SHORT_SECRET not in output
    if variable == "EXECUTOR_API_KEYS":
        assert value not in output


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_sigterm_while_nats_is_unreachable_stops(tmp_path: Path) -> None:
    """A replica still waiting for an unreachable NATS_URL exits 0 when sent SIGTERM."""
    env = replica_env(f"nats://127.0.0.1:{closed_port()}", "unreachable")
    with subprocess.Popen(
        SERVE,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stderr is not None
        try:
            for line in process.stderr:  # wait until it is retrying the connection
                if '"nats error"' in line:
                    break
            process.send_signal(signal.SIGTERM)
            try:
                code: int | None = process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                code = None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert code == 0, "serve ignored SIGTERM while connecting to NATS"


def test_sigterm_after_the_nats_server_died_still_exits(tmp_path: Path) -> None:
    """A replica whose NATS server is gone stops on SIGTERM instead of waiting to reconnect."""
    server = NatsServer(port=free_port(), store=tmp_path / "js")
    server.start()
    replica = start_replica(server.url)
    try:
        assert server.process is not None
        server.process.kill()
        server.process.wait()
        replica.wait_for("nats disconnected")
        code = replica.stop(signal.SIGTERM, timeout=60)
    finally:
        replica.stop(signal.SIGKILL)
        server.stop()
    assert code == 0
    assert any(record.get("event") == "stopped" for record in replica.records())
