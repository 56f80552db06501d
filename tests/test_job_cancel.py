"""``<prefix>.job.cancel`` (contract 1.1, "Job lifecycle"), against real replicas and a real
nats-server: cancel while queued (the job never runs), while running (its child is killed and
its job slot is free again), after done (nothing changes), twice, by another key, and racing the
loss of the replica that runs it (the redelivered job is not run). Every case checks that the
job has exactly one completion.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import nats
import pytest
from pyexec_client.client import Client
from pyexec_client.signing import sign

from consumer.protocol import CodeRequest, Reply
from tests.conftest import (
    KEY_ID,
    OLD_KEY_ID,
    OLD_SECRET,
    SECRET,
    NatsServer,
    ReplicaProcess,
    free_port,
    reply_signed,
    start_replica,
    stored_on,
)

PREFIX = "cancel"
SETTLE = 60.0  # seconds to wait for a state (not a measured bound)
SPIN = "def execute(ctx):\n    while True:\n        pass\n"
QUICK = "def execute(ctx):\n    return ctx['n']\n"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, ReplicaProcess]]:
    """One replica with one job slot, jobs allowed a minute."""
    server = NatsServer(port=free_port(), store=tmp_path_factory.mktemp("cancel-js"))
    server.start()
    replica = start_replica(
        server.url, PREFIX, EXECUTOR_WORKERS="2", EXECUTOR_MAX_JOB_TIMEOUT="120"
    )
    try:
        yield server, replica
    finally:
        replica.stop()
        server.stop()


def job(code: str, **ctx: Any) -> CodeRequest:
    return CodeRequest(code=code, ctx=ctx, mode="async", timeout=100)


async def until_state(client: Client, job_id: str, state: str) -> None:
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        if (await client.status(job_id)).state == state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never became {state}")


async def completions_of(nc: nats.NATS, job_id: str, prefix: str = PREFIX) -> list[dict[str, Any]]:
    """Every message the results stream holds for the job, decoded."""
    return [json.loads(msg.data) for msg in await stored_on(nc, f"{prefix}.results.{job_id}")]


def test_cancel_while_queued_never_runs_it(fleet: tuple[NatsServer, ReplicaProcess]) -> None:
    """A job waiting behind a running one is cancelled: its one completion is 'cancelled' at
    once, and once the slot frees it is acknowledged without running."""
    server, replica = fleet

    async def scenario() -> tuple[Any, Reply, list[dict[str, Any]], str]:
        async with await Client.connect(server.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            blocker = (await client.send(f"{PREFIX}.code", job(SPIN))).job_id
            assert blocker is not None
            await until_state(client, blocker, "running")
            queued = (await client.send(f"{PREFIX}.code", job(QUICK, n=1))).job_id
            assert queued is not None
            assert (await client.status(queued)).state == "queued"
            answer = await client.cancel(queued)
            completion = await client.wait(queued, timeout=30)
            await client.cancel(blocker)  # frees the slot: the cancelled job is delivered
            await until_state(client, blocker, "cancelled")
            replica.wait_for("job cancelled; acknowledged without a run")
            status = (await client.status(queued)).state
            return answer, completion, await completions_of(client.nc, queued), status

    answer, completion, stored, status = asyncio.run(scenario())
    assert (answer.state, status) == ("cancelled", "cancelled")
    assert completion.status == "cancelled"
    assert completion.error is not None
    assert completion.error.code == "cancelled"
    assert [c["status"] for c in stored] == ["cancelled"]


def test_cancel_while_running_kills_the_child_and_frees_the_slot(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    """A job spinning for up to 100 s is cancelled: it completes 'cancelled', and the next
    job runs on the replica's only job slot long before the spinning one would have ended."""
    server, replica = fleet

    async def scenario() -> tuple[Reply, Reply, float, list[dict[str, Any]]]:
        async with await Client.connect(server.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            spinning = (await client.send(f"{PREFIX}.code", job(SPIN))).job_id
            assert spinning is not None
            await until_state(client, spinning, "running")
            started = time.monotonic()
            assert (await client.cancel(spinning)).state == "cancelled"
            cancelled = await client.wait(spinning, timeout=30)
            after = (await client.send(f"{PREFIX}.code", job(QUICK, n=5))).job_id
            assert after is not None
            done = await client.wait(after, timeout=60)
            return (
                cancelled,
                done,
                time.monotonic() - started,
                await completions_of(client.nc, spinning),
            )

    cancelled, done, elapsed, stored = asyncio.run(scenario())
    assert cancelled.status == "cancelled"
    assert (done.status, done.result) == ("ok", 5)
    assert elapsed < 60  # the spinning job had 100 s: its slot was freed by the cancel
    assert [c["status"] for c in stored] == ["cancelled"]
    replica.wait_for("job stopped: it was cancelled")


def test_cancel_after_done_twice_and_by_another_key(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    """Cancelling a finished job answers 'done' and keeps its completion; cancelling twice
    answers 'cancelled' both times; another key's cancel is 'unknown' and changes nothing.
    Answers are signed for the cancel request."""
    server, _ = fleet

    async def scenario() -> dict[str, Any]:
        async with await Client.connect(server.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            finished = (await client.send(f"{PREFIX}.code", job(QUICK, n=3))).job_id
            assert finished is not None
            await client.wait(finished, timeout=60)
            spinning = (await client.send(f"{PREFIX}.code", job(SPIN))).job_id
            assert spinning is not None
            await until_state(client, spinning, "running")
            other, signed = await raw_cancel(client.nc, spinning, OLD_KEY_ID, OLD_SECRET)
            still = (await client.status(spinning)).state
            first = (await client.cancel(spinning)).state
            second = (await client.cancel(spinning)).state
            await client.wait(spinning, timeout=30)
            return {
                "done": (await client.cancel(finished)).state,
                "done_completion": (await client.status(finished)).completion,
                "other": other["state"],
                "other_signed": signed,
                "still": still,
                "first": first,
                "second": second,
                "stored": await completions_of(client.nc, spinning),
                "odd": (await client.cancel("not-a-job-id")).state,
            }

    seen = asyncio.run(scenario())
    assert seen["done"] == "done"
    assert seen["done_completion"].status == "ok"
    assert seen["done_completion"].result == 3
    assert (seen["other"], seen["other_signed"], seen["still"]) == ("unknown", True, "running")
    assert (seen["first"], seen["second"]) == ("cancelled", "cancelled")
    assert [c["status"] for c in seen["stored"]] == ["cancelled"]
    assert seen["odd"] == "unknown"


async def raw_cancel(
    nc: nats.NATS, job_id: str, key_id: str, secret: str
) -> tuple[dict[str, Any], bool]:
    subject = f"{PREFIX}.job.cancel"
    body = json.dumps({"job_id": job_id}).encode()
    headers = sign(key_id, secret.encode(), subject, body)
    msg = await nc.request(subject, body, headers=headers, timeout=10)
    signed = reply_signed(
        secret, subject, headers["Pyexec-Nonce"], dict(msg.headers or {}), msg.data
    )
    return json.loads(msg.data), signed


def test_cancel_racing_the_loss_of_the_replica_running_it(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Of two replicas, the one running a job is killed (SIGKILL) and the job cancelled at
    once through the other: the job comes back to the survivor after its ack wait, which
    acknowledges it without running it; the state stays 'cancelled' through a restart of the
    NATS server, with one completion."""
    server = NatsServer(port=free_port(), store=tmp_path_factory.mktemp("cancel-race-js"))
    server.start()
    prefix = "cancelrace"
    options = {"EXECUTOR_WORKERS": "2", "EXECUTOR_JOB_ACK_WAIT": "3"}
    replicas = [start_replica(server.url, prefix, **options) for _ in range(2)]
    try:

        async def submit_kill_cancel() -> tuple[str, ReplicaProcess]:
            async with await Client.connect(server.url, KEY_ID, SECRET, prefix=prefix) as client:
                job_id = (await client.send(f"{prefix}.code", job(SPIN))).job_id
                assert job_id is not None
                await until_state(client, job_id, "running")
                deadline = time.monotonic() + SETTLE
                while True:
                    running = [
                        r
                        for r in replicas
                        if any(x.get("event") == "job started" for x in r.records())
                    ]
                    if running or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                assert len(running) == 1
                running[0].stop(signal.SIGKILL)
                assert (await client.cancel(job_id)).state == "cancelled"
                return job_id, next(r for r in replicas if r is not running[0])

        job_id, survivor = asyncio.run(submit_kill_cancel())
        survivor.wait_for("job cancelled; acknowledged without a run", timeout=SETTLE)
        server.stop()
        server.start()

        async def after() -> tuple[str, Any, list[dict[str, Any]]]:
            async with await Client.connect(server.url, KEY_ID, SECRET, prefix=prefix) as client:
                deadline = time.monotonic() + SETTLE
                while True:
                    try:
                        status = await client.status(job_id)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                stored = await completions_of(client.nc, job_id, prefix)
                return status.state, status.completion, stored

        state, completion, stored = asyncio.run(after())
        assert state == "cancelled"
        assert completion.status == "cancelled"
        assert [c["status"] for c in stored] == ["cancelled"]
        assert not any(r.get("event") == "job started" for r in survivor.records())
    finally:
        for replica in replicas:
            if replica.process.poll() is None:
                replica.stop()
        server.stop()


def test_a_job_stored_straight_into_the_stream_and_cancelled_before_any_replica_took_it(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    """A job published straight into the jobs stream has no record until a replica takes it:
    its cancel answers 'unknown' (as for an id no job has), yet when the replica takes it, it
    is not run: it completes 'cancelled', and its status says so from then on."""
    server, _ = fleet

    async def scenario() -> tuple[str, str, Reply, str, list[dict[str, Any]]]:
        async with await Client.connect(server.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            blocker = (await client.send(f"{PREFIX}.code", job(SPIN))).job_id
            assert blocker is not None
            await until_state(client, blocker, "running")
            direct = await client.submit_code(QUICK, {"n": 9}, timeout=30)
            answer = (await client.cancel(direct)).state
            before = (await client.status(direct)).state
            await client.cancel(blocker)
            completion = await client.wait(direct, timeout=60)
            after = (await client.status(direct)).state
            return answer, before, completion, after, await completions_of(client.nc, direct)

    answer, before, completion, after, stored = asyncio.run(scenario())
    assert (answer, before) == ("unknown", "unknown")
    assert completion.status == "cancelled"
    assert after == "cancelled"
    assert [c["status"] for c in stored] == ["cancelled"]


def test_a_cancelled_direct_job_stays_cancelled_when_the_same_job_is_sent_again(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    """The job stored straight into the stream and cancelled before any replica took it is
    sent again, the same body through pyexec.code (a client's retry): accepted, and it still
    never runs; its one completion is 'cancelled'."""
    server, _ = fleet

    async def scenario() -> tuple[str, Reply, Reply, str, list[dict[str, Any]]]:
        async with await Client.connect(server.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            blocker = (await client.send(f"{PREFIX}.code", job(SPIN))).job_id
            assert blocker is not None
            await until_state(client, blocker, "running")
            request = CodeRequest(
                code=QUICK, ctx={"n": 4}, mode="async", timeout=30, request_id=uuid.uuid4().hex
            )
            direct = await client.submit(request)
            answer = (await client.cancel(direct)).state
            again = await client.send(f"{PREFIX}.code", request)
            await client.cancel(blocker)
            completion = await client.wait(direct, timeout=60)
            state = (await client.status(direct)).state
            return answer, again, completion, state, await completions_of(client.nc, direct)

    answer, again, completion, state, stored = asyncio.run(scenario())
    assert answer == "unknown"
    assert again.status == "accepted"
    assert completion.status == "cancelled"
    assert state == "cancelled"
    assert [c["status"] for c in stored] == ["cancelled"]
