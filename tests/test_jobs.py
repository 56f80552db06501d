"""Durable async jobs over JetStream, against a nats-server and replicas of their own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import nats
from pyexec_client.client import Client
from pyexec_client.signing import sign_reply

from consumer.protocol import CodeRequest, Reply
from tests.conftest import KEY_ID, SECRET, NatsServer, ReplicaProcess, start_replica

PREFIX = "pyexec"  # the default prefix: streams PYEXEC_JOBS and PYEXEC_RESULTS
SLOW = "import time\ndef execute(ctx):\n    time.sleep(ctx['seconds'])\n    return ctx['n'] * 10\n"
JOB_ENV = {"EXECUTOR_JOB_ACK_WAIT": "3", "EXECUTOR_SHUTDOWN_GRACE": "5"}


def replica(server: NatsServer, **env: str) -> ReplicaProcess:
    return start_replica(server.url, PREFIX, **{**JOB_ENV, **env})


async def connect(server: NatsServer) -> Client:
    return await Client.connect(server.url, KEY_ID, SECRET, prefix=PREFIX)


async def all_completions(server: NatsServer, job_id: str, settle: float = 1.0) -> list[bytes]:
    """Every message stored on the job's results subject."""
    nc = await nats.connect(server.url)
    try:
        sub = await nc.jetstream().subscribe(f"{PREFIX}.results.{job_id}", ordered_consumer=True)
        found = []
        while True:
            try:
                msg = await sub.next_msg(timeout=settle)
            except nats.errors.TimeoutError:
                return found
            found.append(msg.data)
    finally:
        await nc.close()


def test_async_request_is_accepted_then_completes(server: NatsServer) -> None:
    """mode async answers accepted with a job id; the completion arrives on results.<job_id>."""
    worker = replica(server)

    async def scenario() -> tuple[Reply, Reply]:
        async with await connect(server) as client:
            accepted = await client.send(
                f"{PREFIX}.code",
                CodeRequest(code=SLOW, ctx={"seconds": 0.1, "n": 4}, mode="async"),
            )
            assert accepted.job_id is not None
            return accepted, await client.wait(accepted.job_id, timeout=30)

    try:
        accepted, done = asyncio.run(scenario())
    finally:
        worker.stop()
    assert accepted.status == "accepted"
    assert done.status == "ok", done
    assert done.result == 40
    assert done.job_id == accepted.job_id


def test_a_retried_submission_runs_once(server: NatsServer) -> None:
    """The same request id submitted twice gives one job id and exactly one completion."""
    worker = replica(server)

    async def scenario() -> tuple[Reply, Reply, list[bytes]]:
        async with await connect(server) as client:
            request = CodeRequest(
                code=SLOW, ctx={"seconds": 0.2, "n": 1}, mode="async", request_id="retry-me"
            )
            first = await client.send(f"{PREFIX}.code", request)
            second = await client.send(f"{PREFIX}.code", request)
            assert first.job_id is not None
            await client.wait(first.job_id, timeout=30)
            return first, second, await all_completions(server, first.job_id)

    try:
        first, second, completions = asyncio.run(scenario())
        runs = [r for r in worker.records() if r.get("event") == "job completed"]
    finally:
        worker.stop()
    assert first.job_id == second.job_id
    assert len(completions) == 1
    assert len(runs) == 1


def test_direct_jetstream_submission_and_a_bad_signature(server: NatsServer) -> None:
    """A job published straight to the jobs stream runs; one with a bad signature is
    acknowledged and never run or answered (no completion), instead of being redelivered
    forever or completing on a subject its sender chose."""
    worker = replica(server)

    async def scenario() -> tuple[Reply, str, list[bytes]]:
        async with await connect(server) as client:
            good = await client.submit_code(SLOW, {"seconds": 0, "n": 7}, request_id="direct-good")
            forged = Client(client.nc, KEY_ID, "x" * 64, prefix=PREFIX)
            bad = await forged.submit_code(SLOW, {"seconds": 0, "n": 7}, request_id="direct-bad")
            done = await client.wait(good, timeout=30)
        worker.wait_for("job refused; acknowledged without running", timeout=30)
        return done, bad, await all_completions(server, bad)

    try:
        good, bad, bad_completions = asyncio.run(scenario())
    finally:
        worker.stop()
    assert good.status == "ok"
    assert good.result == 70
    assert bad_completions == []
    refusal = next(
        r for r in worker.records() if r.get("event") == "job refused; acknowledged without running"
    )
    assert refusal["reason"] == "unauthorized"
    assert refusal["job_id"] == bad


def _descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                children = [int(child) for child in task.read_text().split()]
            except OSError:
                continue
            found += children
            pending += children
    return found


def _kill_group(process: ReplicaProcess) -> None:
    """SIGKILL the replica and every process under it (warm parent, children) at once."""
    for pid in [process.process.pid, *_descendants(process.process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.stop(signal.SIGKILL)


def test_a_killed_replica_loses_no_job(server: NatsServer) -> None:
    """Two replicas, four 2-second jobs, one replica SIGKILLed mid-run: each job completes
    exactly once with the right result."""
    first = replica(server, EXECUTOR_WORKERS="2", EXECUTOR_JOB_SHARE="1")
    second = replica(server, EXECUTOR_WORKERS="2", EXECUTOR_JOB_SHARE="1")

    async def submit() -> list[str]:
        async with await connect(server) as client:
            return [
                await client.submit_code(SLOW, {"seconds": 2, "n": n}, request_id=f"kill-{n}")
                for n in range(4)
            ]

    async def collect(ids: list[str]) -> dict[str, tuple[Reply, int]]:
        async with await connect(server) as client:
            out = {}
            for job_id in ids:
                reply = await client.wait(job_id, timeout=60)
                out[job_id] = (reply, len(await all_completions(server, job_id)))
            return out

    try:
        ids = asyncio.run(submit())
        time.sleep(1.0)  # both replicas are now running jobs
        _kill_group(first)
        results = asyncio.run(collect(ids))
    finally:
        first.stop(signal.SIGKILL)
        second.stop()
    for n, job_id in enumerate(ids):
        reply, count = results[job_id]
        assert reply.status == "ok", reply
        assert reply.result == n * 10
        assert count == 1


def test_too_many_deliveries_complete_as_worker_lost(server: NatsServer) -> None:
    """With EXECUTOR_JOB_MAX_DELIVER=1, a job whose replica died completes as worker_lost."""
    doomed = replica(server, EXECUTOR_JOB_MAX_DELIVER="1")

    async def submit() -> str:
        async with await connect(server) as client:
            return await client.submit_code(SLOW, {"seconds": 30, "n": 1}, request_id="doomed")

    async def wait(job_id: str) -> Reply:
        async with await connect(server) as client:
            return await client.wait(job_id, timeout=60)

    try:
        job_id = asyncio.run(submit())
        time.sleep(1.5)  # the job is running on the doomed replica
        _kill_group(doomed)
        survivor = replica(server, EXECUTOR_JOB_MAX_DELIVER="1")
        try:
            reply = asyncio.run(wait(job_id))
        finally:
            survivor.stop()
    finally:
        doomed.stop(signal.SIGKILL)
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "worker_lost"


def test_streams_are_created_once_and_then_left_alone(server: NatsServer) -> None:
    """The first replica creates both streams; a restart keeps an operator's changes."""
    replica(server).stop()

    async def tweak() -> float:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info("PYEXEC_RESULTS")
            config = info.config
            config.max_age = 172800.0
            await js.update_stream(config)
            assert (await js.stream_info("PYEXEC_JOBS")).config.retention is not None
            return float((await js.stream_info("PYEXEC_RESULTS")).config.max_age or 0)
        finally:
            await nc.close()

    async def read() -> float:
        nc = await nats.connect(server.url)
        try:
            info = await nc.jetstream().stream_info("PYEXEC_RESULTS")
            return float(info.config.max_age or 0)
        finally:
            await nc.close()

    assert asyncio.run(tweak()) == 172800.0
    replica(server).stop()
    assert asyncio.run(read()) == 172800.0


def test_jobs_survive_a_nats_server_restart(server: NatsServer) -> None:
    """Jobs stored before the server restarts run after it (file storage)."""

    async def submit() -> list[str]:
        async with await connect(server) as client:
            return [
                await client.submit_code(SLOW, {"seconds": 0, "n": n}, request_id=f"restart-{n}")
                for n in range(3)
            ]

    worker = replica(server)
    worker.stop()  # streams exist, nobody takes jobs now
    ids = asyncio.run(submit())
    server.stop()
    server.start()
    worker = replica(server)

    async def collect() -> list[Reply]:
        async with await connect(server) as client:
            return [await client.wait(job_id, timeout=60) for job_id in ids]

    try:
        replies = asyncio.run(collect())
    finally:
        worker.stop()
    assert [r.result for r in replies] == [0, 10, 20]


def test_a_busy_replica_takes_no_more_jobs_than_it_can_start(server: NatsServer) -> None:
    """With one job slot, a replica holds one job; the others wait in the stream for anyone."""
    worker = replica(server, EXECUTOR_WORKERS="2", EXECUTOR_JOB_SHARE="0.5")

    async def scenario() -> tuple[int, int]:
        async with await connect(server) as client:
            for n in range(3):
                await client.submit_code(SLOW, {"seconds": 3, "n": n}, request_id=f"busy-{n}")
            await asyncio.sleep(1.5)
            info = await client.nc.jetstream().consumer_info("PYEXEC_JOBS", "pyexec-workers")
            return info.num_ack_pending, info.num_pending

    try:
        taken, waiting = asyncio.run(scenario())
    finally:
        worker.stop()
    assert taken == 1
    assert waiting == 2


def test_completions_reach_a_durable_reader_once_each(server: NatsServer) -> None:
    """Client.completions(durable) yields every job's completion once."""
    worker = replica(server)

    async def scenario() -> dict[str, object]:
        async with await connect(server) as client:
            ids = [
                await client.submit_code(SLOW, {"seconds": 0, "n": n}, request_id=f"reader-{n}")
                for n in range(3)
            ]
            seen: dict[str, object] = {}
            async with asyncio.timeout(60):
                async for reply in client.completions("test-reader"):
                    assert reply.job_id is not None
                    assert reply.job_id not in seen
                    seen[reply.job_id] = reply.result
                    if set(ids) <= set(seen):
                        break
            return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        worker.stop()
    job_ids = [Client(None, KEY_ID, SECRET).job_id(f"reader-{n}") for n in range(3)]  # type: ignore[arg-type]
    assert seen == dict(zip(job_ids, [0, 10, 20], strict=True))


def test_a_stopping_replica_hands_its_job_back(server: NatsServer) -> None:
    """SIGTERM past the grace period: the replica exits 0 and another replica runs the job."""
    leaving = replica(server, EXECUTOR_SHUTDOWN_GRACE="1")

    async def submit() -> str:
        async with await connect(server) as client:
            return await client.submit_code(SLOW, {"seconds": 4, "n": 5}, request_id="handed-back")

    async def wait(job_id: str) -> tuple[Reply, int]:
        async with await connect(server) as client:
            reply = await client.wait(job_id, timeout=60)
            return reply, len(await all_completions(server, job_id))

    job_id = asyncio.run(submit())
    time.sleep(1.5)  # running on the leaving replica
    code = leaving.stop(signal.SIGTERM, timeout=30)
    handed = [r for r in leaving.records() if r.get("event") == "job handed back"]
    taker = replica(server)
    try:
        reply, count = asyncio.run(wait(job_id))
    finally:
        taker.stop()
    assert code == 0
    assert len(handed) == 1
    assert reply.status == "ok"
    assert reply.result == 50
    assert count == 1


def test_a_redelivered_job_with_a_stored_completion_is_not_run_again(server: NatsServer) -> None:
    """A job that comes back after its completion was stored (the acknowledgement was lost) is
    acknowledged without running the script a second time; the one completion stays."""
    first = replica(server)
    first.stop()
    job_id = Client(None, KEY_ID, SECRET).job_id("done-once")  # type: ignore[arg-type]
    stored = (
        b'{"request_id":"done-once","job_id":"' + job_id.encode() + b'","status":"ok",'
        b'"result":"first run"}'
    )

    async def prepare() -> None:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            async with await connect(server) as client:
                await client.submit_code(SLOW, {"seconds": 0, "n": 2}, request_id="done-once")
                ((subject, nonce),) = client._jobs[job_id]
            # The completion as the replica that ran it would have stored it: signed for the
            # job's request, with the job id as message id.
            signature = sign_reply(KEY_ID, SECRET.encode(), subject, nonce, stored)
            await js.publish(
                f"{PREFIX}.results.{job_id}", stored, headers={"Nats-Msg-Id": job_id, **signature}
            )
            # Take the job as a replica would, then give it back: the next delivery is the 2nd.
            puller = await js.pull_subscribe(
                f"{PREFIX}.jobs.>", durable="pyexec-workers", stream="PYEXEC_JOBS"
            )
            (msg,) = await puller.fetch(1, timeout=5)
            await msg.nak()
        finally:
            await nc.close()

    asyncio.run(prepare())
    second = replica(server)
    try:
        second.wait_for("job already completed; acknowledged", timeout=30)
    finally:
        second.stop()
    assert asyncio.run(all_completions(server, job_id)) == [stored]
    assert not any(
        r.get("event") == "request" and r.get("job_id") == job_id for r in second.records()
    )
