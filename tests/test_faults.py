"""Failure modes as behaviour: overload, worker crashes, a lost warm parent, stops under load."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from pyexec_client.signing import sign

from consumer import protocol
from consumer.protocol import CodeRequest, Reply
from sandbox import Job, Pool, PoolConfig
from sandbox.parent import CRASH_LOOP_LIMIT
from tests.conftest import (
    KEY_ID,
    SECRET,
    Caller,
    NatsServer,
    ReplicaProcess,
    free_port,
    start_replica,
    until,
)
from tests.test_operations import get, scrape, value

SPIN = "def execute(ctx):\n    while True:\n        pass\n"
QUICK = "def execute(ctx):\n    return ctx.get('n', 1)\n"
BUSY = (
    "import time\n"
    "def execute(ctx):\n"
    "    end = time.monotonic() + ctx['seconds']\n"
    "    while time.monotonic() < end:\n"
    "        pass\n"
    "    return ctx['n']\n"
)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def warm_parent(replica: int, tier: str = "stdlib") -> int:
    """The pid of the replica's warm parent of ``tier`` (its command line names the tier)."""
    for pid in children(replica):
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sandbox.zygote" in argv and tier.encode() in argv:
            return pid
    raise AssertionError(f"the replica has no {tier} warm parent")


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def state(pid: int) -> str | None:
    """The process state letter (R, S, Z...), or None once the process is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


async def send(url: str, subject: str, request: CodeRequest, wait: float = 30) -> Reply:
    body = protocol.encode(request, protocol.JSON)
    nc = await nats.connect(url)
    try:
        msg = await nc.request(
            subject, body, timeout=wait, headers=sign(KEY_ID, SECRET.encode(), subject, body)
        )
    finally:
        await nc.close()
    reply = protocol.decode_reply(msg.data, protocol.JSON)
    if reply.status == "rejected":
        assert msg.headers is not None
        assert reply.error is not None
        code = msg.headers["Nats-Service-Error-Code"]
        assert code == {"overloaded": "503", "invalid_request": "400"}.get(reply.error.code, code)
    return reply


# -- overload --------------------------------------------------------------------------------


def test_overload_is_answered_at_once_and_every_request_gets_a_reply(
    nats_server: NatsServer,
) -> None:
    """With the one worker busy and the queue full, further requests are refused as
    overloaded (503) before the running one ends; a waiting one is refused when its wait runs
    out; afterwards the replica serves normally."""
    port = free_port()
    replica = start_replica(
        nats_server.url,
        EXECUTOR_WORKERS="1",
        EXECUTOR_QUEUE_LIMIT="1",
        EXECUTOR_QUEUE_WAIT="1.5",
        EXECUTOR_METRICS_PORT=str(port),
        EXECUTOR_METRICS_HOST="127.0.0.1",
    )
    subject = f"{replica.prefix}.code"
    try:

        async def scenario() -> tuple[Reply, list[tuple[float, Reply]], float]:
            long = asyncio.create_task(
                send(nats_server.url, subject, CodeRequest(code=SPIN, timeout=4))
            )
            await asyncio.to_thread(
                until, lambda: value(scrape(port), "pyexec_workers", state="busy") == 1
            )
            loop = asyncio.get_running_loop()

            async def timed(n: int) -> tuple[float, Reply]:
                reply = await send(nats_server.url, subject, CodeRequest(code=QUICK, ctx={"n": n}))
                return loop.time(), reply

            others = await asyncio.gather(*(timed(n) for n in range(6)))
            first = await long
            return first, others, loop.time()

        first, others, long_done = asyncio.run(scenario())
        assert first.status == "timeout"
        replies = [reply for _, reply in others]
        assert all(r.status == "rejected" for r in replies), replies
        assert all(r.error is not None and r.error.code == "overloaded" for r in replies)
        messages = [r.error.message for r in replies if r.error is not None]
        queue_full = [m for m in messages if "already waiting" in m]
        waited_out = [m for m in messages if "no worker became free within 1.5 s" in m]
        assert len(queue_full) == 5
        assert len(waited_out) == 1
        # Refusals came back while the long run was still going.
        assert max(at for at, _ in others) < long_done
        assert Caller(nats_server.url, replica.prefix).code(QUICK).status == "ok"
        samples = scrape(port)
        assert (
            value(
                samples,
                "pyexec_requests_total",
                subject=subject,
                status="rejected",
                code="overloaded",
            )
            == 6
        )
        assert value(samples, "pyexec_runs_waiting") == 0
    finally:
        assert replica.stop() == 0


def test_a_queued_request_runs_when_a_worker_frees_in_time(nats_server: NatsServer) -> None:
    """A request that waits less than EXECUTOR_QUEUE_WAIT is run, not refused."""
    replica = start_replica(
        nats_server.url, EXECUTOR_WORKERS="1", EXECUTOR_QUEUE_LIMIT="4", EXECUTOR_QUEUE_WAIT="20"
    )
    subject = f"{replica.prefix}.code"
    try:

        async def scenario() -> list[Reply]:
            return list(
                await asyncio.gather(
                    *(
                        send(
                            nats_server.url,
                            subject,
                            CodeRequest(code=BUSY, ctx={"seconds": 0.5, "n": n}, timeout=5),
                        )
                        for n in range(3)
                    )
                )
            )

        replies = asyncio.run(scenario())
        assert sorted(r.result for r in replies) == [0, 1, 2]
    finally:
        assert replica.stop() == 0


# -- worker faults ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unguarded(nats_server: NatsServer) -> Iterator[ReplicaProcess]:
    """A replica with the policy layer switched off, so a script can reach what only a hole
    in the policy would give it (ctypes, os._exit). The other layers stay on."""
    replica = start_replica(nats_server.url, EXECUTOR_UNSAFE_DISABLE_LAYERS="policy")
    yield replica
    replica.stop()


@pytest.mark.parametrize(
    ("source", "signal_name"),
    [
        ("import ctypes\ndef execute(ctx):\n    return ctypes.string_at(0)\n", "SIGSEGV"),
        ("import os\ndef execute(ctx):\n    os._exit(3)\n", None),
        ("import os, signal\ndef execute(ctx):\n    os.abort()\n", "SIGABRT"),
    ],
    ids=["segfault", "os-exit", "abort"],
)
def test_a_child_that_dies_is_worker_lost(
    unguarded: ReplicaProcess, nats_server: NatsServer, source: str, signal_name: str | None
) -> None:
    """A run whose process dies gives error/worker_lost naming how, and the next run works."""
    caller = Caller(nats_server.url, unguarded.prefix)
    reply = caller.code(source)
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "worker_lost"
    if signal_name is not None:
        assert signal_name in reply.error.message
    assert caller.code(QUICK).result == 1


def test_a_child_killed_from_outside_is_memory_limit(
    unguarded: ReplicaProcess, nats_server: NatsServer
) -> None:
    """A SIGKILL the executor did not send, which is how the kernel's OOM killer ends a
    process, is reported as memory_limit. (The OOM killer itself cannot be provoked safely on
    a shared test machine; the signal it sends can.)"""
    caller = Caller(nats_server.url, unguarded.prefix)

    async def scenario() -> Reply:
        task = asyncio.create_task(asyncio.to_thread(caller.code, SPIN, timeout=8))
        running: list[int] = []

        def spinning() -> bool:
            # The run's process is a child of the stdlib warm parent (the script imports no
            # library); the one spinning is runnable at two looks in a row.
            parent = warm_parent(unguarded.process.pid)
            first = {pid for pid in children(parent) if state(pid) == "R"}
            time.sleep(0.1)
            running[:] = [pid for pid in children(parent) if state(pid) == "R" and pid in first]
            return len(running) == 1

        await asyncio.to_thread(until, spinning)
        os.kill(running[0], signal.SIGKILL)
        return await task

    reply = asyncio.run(scenario())
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "memory_limit"


def test_warm_parent_killed_is_restarted_and_leaves_nothing_behind(
    nats_server: NatsServer,
) -> None:
    """SIGKILL to the warm parent: the replica starts another, keeps answering, counts the
    restart, and none of the old processes stays behind, not even as a zombie."""
    port = free_port()
    replica = start_replica(
        nats_server.url, EXECUTOR_METRICS_PORT=str(port), EXECUTOR_METRICS_HOST="127.0.0.1"
    )
    caller = Caller(nats_server.url, replica.prefix)
    try:
        assert caller.code(QUICK).result == 1
        parent = warm_parent(replica.process.pid)
        until(lambda: len(children(parent)) >= 2)
        old = {parent, *descendants(parent)}
        os.kill(parent, signal.SIGKILL)
        until(lambda: value(scrape(port), "pyexec_warm_parent_restarts_total") == 1)
        until(lambda: value(scrape(port), "pyexec_ready") == 1)
        for n in range(5):
            assert caller.code(QUICK, {"n": n}).result == n
        until(lambda: all(state(pid) is None for pid in old))
        assert warm_parent(replica.process.pid) != parent
    finally:
        assert replica.stop() == 0


def test_a_crash_loop_stops_the_restarts_and_fails_readiness(nats_server: NatsServer) -> None:
    """A warm parent that dies right after every start: each exit is logged with its cause,
    and after the crash-loop limit the replica stops restarting it, logs why and answers
    /readyz and /healthz 503 with the reason (instead of spinning)."""
    port = free_port()
    replica = start_replica(
        nats_server.url,
        EXECUTOR_METRICS_PORT=str(port),
        EXECUTOR_METRICS_HOST="127.0.0.1",
        EXECUTOR_TIERS="stdlib",
    )
    try:
        for _ in range(CRASH_LOOP_LIMIT):
            # Killed once it has started (the pool shows it up), so that each exit is a crash.
            until(lambda: value(scrape(port), "pyexec_tier_up", tier="stdlib") == 1)
            parent = warm_parent(replica.process.pid)
            os.kill(parent, signal.SIGKILL)
            until(lambda: parent not in children(replica.process.pid))  # noqa: B023
        until(lambda: get(port, "/readyz")[0] == 503, timeout=60)
        _, text, _ = get(port, "/readyz")
        assert "restarts stopped" in text
        assert "killed by SIGKILL" in text
        # Broken for good: liveness fails too, so that the orchestrator replaces the replica.
        code, text, _ = get(port, "/healthz")
        assert code == 503
        assert "restarts stopped" in text
        samples = scrape(port)
        assert value(samples, "pyexec_ready") == 0
        assert value(samples, "pyexec_tier_up", tier="stdlib") == 0
        crashed = value(samples, "pyexec_warm_parent_exits_total", tier="stdlib", cause="crashed")
        assert crashed == CRASH_LOOP_LIMIT - 1
        halted = value(samples, "pyexec_warm_parent_exits_total", tier="stdlib", cause="halted")
        assert halted == 1
        time.sleep(1)
        assert not [pid for pid in children(replica.process.pid) if state(pid) != "Z"]
    finally:
        replica.stop()
    logs = replica.records()
    exits = [line for line in logs if line.get("event") == "warm parent exited; restarting it"]
    assert len(exits) == CRASH_LOOP_LIMIT - 1
    assert all(line["cause"] == "killed by SIGKILL" and line["tier"] == "stdlib" for line in exits)
    assert all(line["level"] == "warning" for line in exits)
    halting = "warm parent crash loop: restarts stopped"
    (halt,) = [line for line in logs if line.get("event") == halting]
    assert halt["level"] == "error"
    assert "restarts stopped" in halt["reason"]


def test_a_crash_loop_backs_off() -> None:
    """A warm parent that keeps dying right after it starts is restarted ever more slowly."""

    async def scenario() -> list[float]:
        starts: list[float] = []
        async with Pool(PoolConfig(tiers=("stdlib",), workers=1, warm_children=1)) as pool:
            for _ in range(4):
                seen = pool.parent_starts
                pid = pool.parent_pid()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                await asyncio.to_thread(
                    until,
                    lambda: pool.parent_starts != seen and pool.live,  # noqa: B023
                )
                starts.append(time.monotonic())
            outcome = await pool.run(Job(source=QUICK, ctx={}, timeout=5))
            assert outcome.result == 1
        return starts

    starts = asyncio.run(scenario())
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    # Restart delays 0.1, 0.5, 1.0, 2.0 s: each gap includes at least the next delay.
    assert gaps[1] >= 1.0
    assert gaps[2] >= 2.0


def test_no_process_outlives_the_replica(nats_server: NatsServer) -> None:
    """After serving (including timeouts and crashes) and stopping, every process the replica
    ever had is gone and none is left a zombie."""
    replica = start_replica(nats_server.url, EXECUTOR_UNSAFE_DISABLE_LAYERS="policy")
    caller = Caller(nats_server.url, replica.prefix)
    seen: set[int] = set()
    try:
        for source, timeout in (
            (QUICK, 5.0),
            (SPIN, 0.3),
            ("import os\ndef execute(ctx):\n    os._exit(1)\n", 5.0),
            (QUICK, 5.0),
        ):
            caller.code(source, timeout=timeout)
            seen |= descendants(replica.process.pid)
    finally:
        assert replica.stop() == 0
    assert len(seen) >= 3
    until(lambda: all(state(pid) is None for pid in seen), timeout=10)


# -- graceful stop under load ----------------------------------------------------------------


def test_sigterm_under_load_answers_every_request_and_hands_jobs_back(
    nats_server: NatsServer,
) -> None:
    """SIGTERM with requests running and queued and a job in progress: every request is
    answered ok, the job goes back to the stream (another replica completes it), exit 0."""
    first = start_replica(
        nats_server.url,
        EXECUTOR_WORKERS="2",
        EXECUTOR_SHUTDOWN_GRACE="8",
        EXECUTOR_QUEUE_WAIT="20",
    )
    prefix = first.prefix
    subject = f"{prefix}.code"

    async def scenario() -> tuple[list[Reply], int, Reply]:
        nc = await nats.connect(nats_server.url)
        try:
            job_body = protocol.encode(
                CodeRequest(code=BUSY, ctx={"seconds": 30, "n": 99}, timeout=60, mode="async"),
                protocol.JSON,
            )
            accepted = await nc.request(
                subject, job_body, timeout=10,
                headers=sign(KEY_ID, SECRET.encode(), subject, job_body),
            )  # fmt: skip
            job_id = protocol.decode_reply(accepted.data, protocol.JSON).job_id
            assert job_id is not None
            await asyncio.to_thread(first.wait_for, "job started")
            requests = [
                asyncio.create_task(
                    send(
                        nats_server.url,
                        subject,
                        CodeRequest(code=BUSY, ctx={"seconds": 1.0, "n": n}, timeout=10),
                    )
                )
                for n in range(4)
            ]
            await asyncio.sleep(0.5)
            first.process.send_signal(signal.SIGTERM)
            replies = list(await asyncio.gather(*requests))
            code = await asyncio.to_thread(first.process.wait, 30)
            second = await asyncio.to_thread(start_replica, nats_server.url, prefix)
            try:
                js = nc.jetstream()
                sub = await js.subscribe(f"{prefix}.results.{job_id}", ordered_consumer=True)
                done = await sub.next_msg(timeout=60)
                await sub.unsubscribe()
            finally:
                await asyncio.to_thread(second.stop)
            return replies, code, protocol.decode_reply(done.data, protocol.JSON)
        finally:
            await nc.close()

    try:
        replies, code, completion = asyncio.run(scenario())
    finally:
        first.stop()
    assert code == 0
    assert sorted(r.result for r in replies) == [0, 1, 2, 3]
    assert all(r.status == "ok" for r in replies)
    assert any(r.get("event") == "job handed back" for r in first.records())
    assert completion.job_id is not None


def test_reconnect_backoff_grows_to_a_cap_with_jitter() -> None:
    """Reconnection tries the least-tried server, first almost at once, then waits about twice
    as long per failed round up to 5 s, never exactly the same for two replicas."""
    from urllib.parse import urlparse

    from nats.aio.client import Server

    from consumer.transport import RECONNECT_CAP, reconnect_backoff

    def delays(rounds: int) -> list[float]:
        servers = [
            Server(uri=urlparse("nats://a:4222"), reconnects=rounds + 1),
            Server(uri=urlparse("nats://b:4222"), reconnects=rounds),
        ]
        picks = [reconnect_backoff(servers, {}) for _ in range(50)]
        assert all(server.uri.netloc == "b:4222" for server, _ in picks)
        return [delay for _, delay in picks]

    assert max(delays(0)) <= 0.1
    assert 0.25 <= min(delays(1)) <= max(delays(1)) <= 0.5
    assert 1.0 <= min(delays(3)) <= max(delays(3)) <= 2.0
    assert max(delays(40)) <= RECONNECT_CAP
    assert min(delays(40)) >= RECONNECT_CAP / 2
    assert len(set(delays(3))) > 1
