"""The ``progress(fraction, message)`` builtin (contract 1.1, "Job lifecycle"): a job's reports
published on ``<prefix>.progress.<job_id>`` (signed, at most 5 a second, the last always sent)
and its last one in ``status``; a sync run's reports go nowhere; bad arguments are the
script's error. Against a real replica and nats-server, and a real pool for the child's side.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import nats
import pytest
from pyexec_client.client import Client

from consumer.protocol import CodeRequest, Progress
from sandbox import Job, Pool, PoolConfig
from tests.conftest import KEY_ID, SECRET, NatsServer, ReplicaProcess, free_port, start_replica

PREFIX = "progress"
CHATTY = """
import time
def execute(ctx):
    for i in range(2000):
        progress(i / 4000, "step " + str(i))
    time.sleep(0.6)
    progress(0.75, "x" * 500)
    time.sleep(0.6)
    progress(1.0, "done")
    return "finished"
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, ReplicaProcess]]:
    server = NatsServer(port=free_port(), store=tmp_path_factory.mktemp("progress-js"))
    server.start()
    replica = start_replica(server.url, PREFIX, EXECUTOR_WORKERS="2")
    try:
        yield server, replica
    finally:
        replica.stop()
        server.stop()


def test_a_jobs_progress_is_published_rate_limited_and_kept_in_its_status(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    """2000 reports in a burst, then two more: subscribers get at most one event per 0.2 s of
    the job's life, the long message cut to 200 characters, the last event is the final
    report, every event is signed for the job's request, and the status keeps the last."""
    server, _ = fleet

    async def scenario() -> tuple[list[Progress], float, Any, Any]:
        async with await Client.connect(server.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            request_id = f"progress-{time.time_ns()}"
            job_id = client.job_id(request_id)
            events: list[Progress] = []

            async def listen(watch: Any) -> None:
                async for event in watch:
                    events.append(event)

            watch = client.progress(job_id)
            await watch.__aenter__()
            listener = asyncio.create_task(listen(watch))
            started = time.monotonic()
            request = CodeRequest(code=CHATTY, mode="async", request_id=request_id, timeout=30)
            await client.send(f"{PREFIX}.code", request)
            completion = await client.wait(job_id, timeout=60)
            elapsed = time.monotonic() - started
            await asyncio.sleep(0.5)
            listener.cancel()
            await watch.__aexit__()
            deadline = time.monotonic() + 30  # the record says done just after the completion
            while (status := await client.status(job_id)).state == "running":
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.05)
            return events, elapsed, completion, status

    events, elapsed, completion, status = asyncio.run(scenario())
    assert completion.result == "finished"
    assert 3 <= len(events) <= elapsed / 0.2 + 2
    assert events[0].fraction == 0.0
    assert (events[-1].fraction, events[-1].message) == (1.0, "done")
    assert any(e.message == "x" * 200 for e in events)
    assert status.state == "done"
    assert status.progress is not None
    assert status.progress.fraction == 1.0
    assert status.progress.message == "done"
    assert status.progress.job_id is None


def test_forged_progress_events_are_not_given_to_the_client(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    """An event published by anyone on the account, unsigned, naming a job this client
    submitted, is skipped; the job's own (signed) events come through."""
    server, _ = fleet

    async def scenario() -> list[Progress]:
        async with await Client.connect(server.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            request_id = f"forged-{time.time_ns()}"
            job_id = client.job_id(request_id)
            source = (
                "import time\ndef execute(ctx):\n    time.sleep(1)\n    progress(0.5, 'real')\n"
            )
            request = CodeRequest(code=source, mode="async", request_id=request_id, timeout=30)
            events: list[Progress] = []

            async def listen(watch: Any) -> None:
                async for event in watch:
                    events.append(event)

            watch = client.progress(job_id)
            await watch.__aenter__()
            listener = asyncio.create_task(listen(watch))
            await client.send(f"{PREFIX}.code", request)
            forger = await nats.connect(server.url)
            forged = json.dumps(
                {"job_id": job_id, "fraction": 0.9, "message": "forged", "at": "2026-01-01"}
            )
            await forger.publish(f"{PREFIX}.progress.{job_id}", forged.encode())
            await forger.close()
            await client.wait(job_id, timeout=60)
            await asyncio.sleep(0.5)
            listener.cancel()
            await watch.__aexit__()
            return events

    events = asyncio.run(scenario())
    assert [e.message for e in events] == ["real"]


def test_progress_in_a_sync_run_does_nothing_and_bad_arguments_fail_the_script(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    """A sync run may call progress(): nothing is published. A fraction outside 0..1, a
    fraction that is not a number and a message that is not a string are script errors."""
    server, _ = fleet

    async def scenario() -> tuple[Any, list[bytes], list[Any]]:
        async with await Client.connect(server.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            seen: list[bytes] = []

            async def note(msg: Any) -> None:
                seen.append(msg.data)

            sub = await client.nc.subscribe(f"{PREFIX}.progress.>", cb=note)
            ok = await client.execute_code(
                "def execute(ctx):\n    progress(0.5, 'sync')\n    return 1\n"
            )
            bad = [
                await client.execute_code(f"def execute(ctx):\n    progress({args})\n")
                for args in ("1.5", "'half'", "0.5, 7", "float('nan')")
            ]
            await asyncio.sleep(0.5)
            await sub.unsubscribe()
            return ok, seen, bad

    ok, seen, bad = asyncio.run(scenario())
    assert (ok.status, ok.result) == ("ok", 1)
    assert seen == []
    assert [(r.status, r.error.code if r.error else None) for r in bad] == [
        ("error", "script_error")
    ] * 4
    assert [r.error.type for r in bad if r.error] == [
        "ValueError",
        "TypeError",
        "TypeError",
        "ValueError",
    ]


@pytest.mark.parametrize("disabled", [(), ("policy",)], ids=["all layers", "policy off"])
def test_the_child_sends_at_most_five_reports_a_second_and_always_the_last(
    disabled: tuple[str, ...],
) -> None:
    """Below the service: the pool receives a burst of reports as one, a report made just
    before a long pause arrives during the pause (not at the end), and the final one arrives
    before the result; with the policy layer off too."""
    source = """
import time
def execute(ctx):
    for i in range(500):
        progress(i / 1000, "burst")
    progress(0.5, "before the pause")
    time.sleep(1.5)
    progress(1.0, "last")
    return "ok"
"""

    async def scenario() -> tuple[list[tuple[float, float | None, str]], float, Any]:
        config = PoolConfig(workers=1, warm_children=1, disabled_layers=disabled)
        async with Pool(config) as pool:
            got: list[tuple[float, float | None, str]] = []
            started = time.monotonic()
            outcome = await pool.run(
                Job(source=source, ctx={}, timeout=30),
                lambda fraction, message: got.append(
                    (time.monotonic() - started, fraction, message)
                ),
            )
            return got, time.monotonic() - started, outcome

    got, elapsed, outcome = asyncio.run(scenario())
    assert outcome.status == "ok"
    messages = [message for _, _, message in got]
    assert messages[0] == "burst"
    assert messages[-2:] == ["before the pause", "last"]
    assert len(got) <= 4
    pause_report = got[-2][0]
    assert pause_report < elapsed - 1.0  # sent during the pause, not with the result


def test_a_run_that_floods_its_socket_with_reports_is_stopped() -> None:
    """Below the policy (layer off), a script writes progress frames straight to its socket,
    thousands a second: the pool stops the run at once (policy_violation) instead of decoding
    them for the rest of its timeout."""
    source = r"""
import os, socket, struct, time
def execute(ctx):
    fd = None
    for candidate in range(3, 256):
        try:
            probe = socket.socket(fileno=os.dup(candidate))
        except OSError:
            continue
        if probe.family == socket.AF_UNIX and probe.type == socket.SOCK_STREAM:
            fd = candidate
        probe.close()
    body = b'{"kind":"progress","fraction":0.5,"message":"flood"}'
    frames = (struct.pack(">I", len(body)) + body) * 1000
    end = time.monotonic() + 20
    while time.monotonic() < end:
        os.write(fd, frames)
    return "survived"
"""

    async def scenario() -> tuple[Any, float, int]:
        config = PoolConfig(workers=1, warm_children=1, disabled_layers=("policy",))
        async with Pool(config) as pool:
            got: list[Any] = []
            started = time.monotonic()
            outcome = await pool.run(
                Job(source=source, ctx={}, timeout=30), lambda f, m: got.append(m)
            )
            return outcome, time.monotonic() - started, len(got)

    outcome, elapsed, delivered = asyncio.run(scenario())
    assert outcome.status == "error"
    assert outcome.error is not None
    assert outcome.error.code == "policy_violation"
    assert "progress reports faster" in outcome.error.message
    assert delivered <= 20
    assert elapsed < 20  # stopped long before the script's own 20 s loop would end
