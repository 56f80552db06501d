"""``<prefix>.job.status`` (contract 1.1, "Job lifecycle"), against real replicas and a real
nats-server: a job's state through queued, running and done, its completion once done, another
key's view (``unknown``), and refusals. The reply signature is checked by the rule written out
in the test, not the executor's code.
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
from pyexec_client.errors import ClientError
from pyexec_client.signing import sign

from consumer.protocol import CodeRequest
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
)

PREFIX = "status"


def client_request(code: str, ctx: dict[str, Any]) -> CodeRequest:
    return CodeRequest(code=code, ctx=ctx, mode="async")


SLEEPY = "import time\ndef execute(ctx):\n    time.sleep(ctx['seconds'])\n    return ctx['n']\n"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, list[Any]]]:
    """Two replicas of two workers each: one job slot each."""
    server = NatsServer(port=free_port(), store=tmp_path_factory.mktemp("status-js"))
    server.start()
    replicas: list[ReplicaProcess] = []
    try:
        for _ in range(2):
            replicas.append(start_replica(server.url, PREFIX, EXECUTOR_WORKERS="2"))
        yield server, replicas
    finally:
        for replica in replicas:
            replica.stop()
        server.stop()


async def raw_status(
    nc: nats.NATS, job_id: Any, *, key_id: str = KEY_ID, secret: str = SECRET
) -> tuple[dict[str, Any], dict[str, str], bool]:
    """The status reply as it came, its headers, and whether it is signed for the request."""
    subject = f"{PREFIX}.job.status"
    body = json.dumps({"job_id": job_id}).encode()
    headers = sign(key_id, secret.encode(), subject, body)
    msg = await nc.request(subject, body, headers=headers, timeout=10)
    got = dict(msg.headers or {})
    return (
        json.loads(msg.data),
        got,
        reply_signed(secret, subject, headers["Pyexec-Nonce"], got, msg.data),
    )


def test_a_job_goes_queued_running_done_and_another_key_sees_nothing(
    fleet: tuple[NatsServer, list[Any]],
) -> None:
    """Two slow jobs fill both job slots, so a third waits: it is queued, then running, then
    done with its completion; the same id asked with another key is unknown throughout."""
    server, _ = fleet

    async def scenario() -> tuple[list[str], dict[str, Any], list[str]]:
        async with await Client.connect(server.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            nc = client.nc
            for n in range(2):
                await client.send(
                    f"{PREFIX}.code",
                    client_request(SLEEPY, {"seconds": 3, "n": n}),
                )
            job_id = (
                await client.send(f"{PREFIX}.code", client_request(SLEEPY, {"seconds": 1, "n": 7}))
            ).job_id
            assert job_id is not None
            seen: list[str] = []
            others: list[str] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status = await client.status(job_id)
                if not seen or seen[-1] != status.state:
                    seen.append(status.state)
                other, _, _ = await raw_status(nc, job_id, key_id=OLD_KEY_ID, secret=OLD_SECRET)
                others.append(other["state"])
                if status.state == "done":
                    return seen, status.completion, others
                await asyncio.sleep(0.1)
            raise AssertionError(f"not done: {seen}")

    seen, completion, others = asyncio.run(scenario())
    assert seen == ["queued", "running", "done"]
    assert completion.status == "ok"
    assert completion.result == 7
    assert set(others) == {"unknown"}


def test_status_replies_are_signed_and_an_unknown_id_is_unknown(
    fleet: tuple[NatsServer, list[Any]],
) -> None:
    """An id no job has is unknown, in a reply signed for the status request; a forged
    signature is unauthorized (unsigned), and a bad body is invalid_request (signed)."""
    server, _ = fleet

    async def scenario() -> tuple[Any, Any, Any]:
        nc = await nats.connect(server.url)
        try:
            unknown = await raw_status(nc, "ab" * 16)
            forged = await raw_status(nc, "ab" * 16, secret="not-the-secret-0123456789")  # noqa: S106 - a wrong key
            bad = await raw_status(nc, {"not": "a string"})
            for odd in ("../x", "a b", "AB" * 16, "*", ">", "x" * 64):
                answered, _, signed = await raw_status(nc, odd)
                assert (answered["state"], signed) == ("unknown", True), odd
            return unknown, forged, bad
        finally:
            await nc.close()

    (unknown, _, unknown_signed), (forged, forged_headers, _), (bad, _, bad_signed) = asyncio.run(
        scenario()
    )
    assert unknown == {
        "job_id": "ab" * 16,
        "state": "unknown",
        "progress": None,
        "completion": None,
    }
    assert unknown_signed
    assert forged["error"]["code"] == "unauthorized"
    assert "Pyexec-Signature" not in forged_headers
    assert bad["status"] == "rejected"
    assert bad["error"]["code"] == "invalid_request"
    assert bad_signed


def test_the_client_refuses_a_status_it_cannot_verify(fleet: tuple[NatsServer, list[Any]]) -> None:
    """Client.status with a wrong secret gets the unsigned refusal and raises."""
    server, _ = fleet

    async def scenario() -> str:
        wrong = "w" * 32
        async with await Client.connect(server.url, KEY_ID, wrong, prefix=PREFIX) as client:
            try:
                await client.status("cd" * 16)
            except ClientError as exc:
                return str(exc)
            return "answered"

    assert "the signature does not match" in asyncio.run(scenario())
