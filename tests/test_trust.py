"""Trust between callers (contract 1.1), against two real replicas and a real nats-server.

Job ids per key, direct submissions whose message id is not their job id, idempotency past the
stream's duplicate window, conflicting bodies, refused reply subjects, replays across replicas,
signed replies and completions (checked here by an implementation of the ``v1-reply`` rule of
the test's own, not the executor's code), repeated signature headers, and a request cut by a
stopping replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from pyexec_client.client import Client
from pyexec_client.errors import ClientError
from pyexec_client.signing import sign

from consumer.config import DEFAULT_MAX_REQUEST_BYTES
from consumer.protocol import CodeRequest, Reply
from tests.conftest import (
    KEY_ID,
    OLD_KEY_ID,
    OLD_SECRET,
    SECRET,
    NatsServer,
    ReplicaProcess,
    free_port,
    once_routed,
    reply_signed,
    start_replica,
    stored_on,
    until,
)

PREFIX = "trust"
RESULTS_STREAM = "PYEXEC_RESULTS_TRUST"
DUPLICATE_WINDOW = 1.0
FLEET_ENV = {
    "EXECUTOR_JOBS_DUPLICATE_WINDOW": str(DUPLICATE_WINDOW),
    "EXECUTOR_JOB_ACK_WAIT": "5",
}
ECHO = "def execute(ctx):\n    return ctx\n"
SLEEPY = "import time\ndef execute(ctx):\n    time.sleep(ctx['seconds'])\n    return 'woke'\n"
SECRETS = {KEY_ID: SECRET, OLD_KEY_ID: OLD_SECRET}


# -- the rules, written out again from the contract (not imported from the executor) ----------


def expected_job_id(secret: str, request_id: str) -> str:
    mac = hmac.new(secret.encode(), b"v1-job\n" + request_id.encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


# -- the fleet -----------------------------------------------------------------------------------


@dataclass
class Fleet:
    server: NatsServer
    replicas: list[ReplicaProcess]

    @property
    def url(self) -> str:
        return self.server.url

    def records(self) -> list[dict[str, Any]]:
        return [record for replica in self.replicas for record in replica.records()]

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
        ]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = NatsServer(port=free_port(), store=tmp_path_factory.mktemp("trust-js"))
    server.start()
    replicas = []
    try:
        for _ in range(2):
            replicas.append(start_replica(server.url, PREFIX, **FLEET_ENV))
        yield Fleet(server, replicas)
    finally:
        for replica in replicas:
            replica.stop()
        server.stop()


@dataclass
class Sent:
    """A request as sent, with the reply as it came back."""

    subject: str
    nonce: str
    body: bytes
    reply: dict[str, Any]
    headers: dict[str, str]
    data: bytes


async def request(
    nc: nats.NATS,
    kind: str,
    payload: dict[str, Any],
    *,
    key_id: str = KEY_ID,
    headers: dict[str, str] | None = None,
) -> Sent:
    subject = f"{PREFIX}.{kind}"
    body = json.dumps(payload).encode()
    sent = headers or sign(key_id, SECRETS[key_id].encode(), subject, body)
    msg = await nc.request(subject, body, headers=sent, timeout=30)
    return Sent(
        subject,
        sent["Pyexec-Nonce"],
        body,
        json.loads(msg.data),
        dict(msg.headers or {}),
        msg.data,
    )


async def publish_job(
    nc: nats.NATS,
    payload: dict[str, Any],
    *,
    key_id: str = KEY_ID,
    msg_id: str | None = None,
    extra: dict[str, str] | None = None,
    signed_subject: str | None = None,
) -> tuple[str, str]:
    """Store a job straight into the jobs stream; its (subject, nonce)."""
    subject = f"{PREFIX}.jobs.code"
    body = json.dumps(payload).encode()
    headers = sign(key_id, SECRETS[key_id].encode(), signed_subject or subject, body)
    headers["Nats-Msg-Id"] = msg_id or expected_job_id(SECRETS[key_id], payload["request_id"])
    headers.update(extra or {})
    await nc.jetstream().publish(subject, body, headers=headers, timeout=10)
    return subject, headers["Pyexec-Nonce"]


async def completions(nc: nats.NATS, job_id: str, settle: float = 1.0) -> list[nats.aio.msg.Msg]:
    """Every message stored on the job's results subject."""
    return await stored_on(nc, f"{PREFIX}.results.{job_id}", settle)


async def completion(nc: nats.NATS, job_id: str, timeout: float = 30) -> nats.aio.msg.Msg:
    sub = await nc.jetstream().subscribe(f"{PREFIX}.results.{job_id}", ordered_consumer=True)
    try:
        return await sub.next_msg(timeout=timeout)
    finally:
        await sub.unsubscribe()


async def refused(fleet: Fleet, nc: nats.NATS, job_id: str) -> tuple[list[Any], str]:
    """Wait until a replica refuses the job message claiming ``job_id``; what was stored on its
    results subject, and the refusal's reason."""
    event = "job refused; acknowledged without running"
    await asyncio.to_thread(
        until, lambda: fleet.events(event, job_id=job_id), 30, "the job's refusal"
    )
    (refusal,) = fleet.events(event, job_id=job_id)
    return await completions(nc, job_id), str(refusal["reason"])


def run(scenario: Any, url: str) -> Any:
    async def main() -> Any:
        nc = await nats.connect(url)
        try:
            return await scenario(nc)
        finally:
            await nc.close()

    return asyncio.run(main())


def rid(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


# -- job ids -------------------------------------------------------------------------------------


def test_two_keys_with_one_request_id_get_two_jobs(fleet: Fleet) -> None:
    """The same request_id under two keys gives two job ids, each HMAC(secret, "v1-job\\n" +
    request_id)[:32]; each job runs and completes with its own result."""
    shared = rid("shared")

    async def scenario(nc: nats.NATS) -> tuple[list[Sent], list[dict[str, Any]]]:
        sent = [
            await request(
                nc,
                "code",
                {"code": ECHO, "ctx": {"who": key}, "mode": "async", "request_id": shared},
                key_id=key,
            )
            for key in (KEY_ID, OLD_KEY_ID)
        ]
        done = [json.loads((await completion(nc, s.reply["job_id"])).data) for s in sent]
        return sent, done

    sent, done = run(scenario, fleet.url)
    assert [s.reply["status"] for s in sent] == ["accepted", "accepted"]
    assert sent[0].reply["job_id"] == expected_job_id(SECRET, shared)
    assert sent[1].reply["job_id"] == expected_job_id(OLD_SECRET, shared)
    assert sent[0].reply["job_id"] != sent[1].reply["job_id"]
    assert [d["result"] for d in done] == [{"who": KEY_ID}, {"who": OLD_KEY_ID}]


def test_an_async_request_without_a_request_id_gets_a_job_id_from_the_one_made(
    fleet: Fleet,
) -> None:
    """Without request_id the executor makes one; the job id follows from it by the formula."""

    async def scenario(nc: nats.NATS) -> tuple[Sent, dict[str, Any]]:
        sent = await request(nc, "code", {"code": ECHO, "ctx": {"n": 1}, "mode": "async"})
        done = json.loads((await completion(nc, sent.reply["job_id"])).data)
        return sent, done

    sent, done = run(scenario, fleet.url)
    assert sent.reply["status"] == "accepted"
    assert sent.reply["job_id"] == expected_job_id(SECRET, sent.reply["request_id"])
    assert done["request_id"] == sent.reply["request_id"]
    assert done["result"] == {"n": 1}


def test_a_direct_job_whose_message_id_is_not_its_job_id_never_runs(fleet: Fleet) -> None:
    """Key B publishing under key A's job id is acknowledged, never run and answered nowhere;
    A's own job with that id then runs and completes normally."""
    victim = rid("victim")
    victim_job = expected_job_id(SECRET, victim)

    async def scenario(nc: nats.NATS) -> tuple[list[Any], dict[str, Any]]:
        await publish_job(
            nc,
            {"code": ECHO, "ctx": {"planted": True}, "request_id": victim},
            key_id=OLD_KEY_ID,
            msg_id=victim_job,
        )
        await asyncio.to_thread(
            until,
            lambda: fleet.events("job refused; acknowledged without running", job_id=victim_job),
            30,
            "the refusal",
        )
        planted = await completions(nc, victim_job)
        # (Within the stream's duplicate window the stored copy would drop the genuine one as a
        # duplicate: a squat that needs the job id, which no other key can compute.)
        await asyncio.sleep(DUPLICATE_WINDOW)
        await publish_job(nc, {"code": ECHO, "ctx": {"mine": True}, "request_id": victim})
        return planted, json.loads((await completion(nc, victim_job)).data)

    planted, genuine = run(scenario, fleet.url)
    assert planted == []
    (refusal,) = fleet.events("job refused; acknowledged without running", job_id=victim_job)
    assert refusal["reason"] == "msg_id_mismatch"
    assert genuine["result"] == {"mine": True}


def test_a_copied_sync_request_cannot_become_a_job(fleet: Fleet) -> None:
    """A job claiming to come from a replica (``Pyexec-Origin-Subject``) must be a
    ``mode: "async"`` request signed for that subject: a sync one is refused, never run."""
    request_id = rid("copied")
    job_id = expected_job_id(SECRET, request_id)

    async def scenario(nc: nats.NATS) -> list[Any]:
        await publish_job(
            nc,
            {"code": ECHO, "ctx": {}, "request_id": request_id},
            extra={"Pyexec-Origin-Subject": f"{PREFIX}.code"},
            signed_subject=f"{PREFIX}.code",
        )
        return await refused(fleet, nc, job_id)

    assert run(scenario, fleet.url) == ([], "not_async")


# -- idempotency -----------------------------------------------------------------------------


def test_a_retry_past_the_duplicate_window_is_accepted_and_not_run_again(fleet: Fleet) -> None:
    """A submission repeated after the jobs stream's duplicate window (1 s here) is answered
    accepted with the same job id, through a replica and straight into the stream, and the job
    runs once: one completion, one run."""
    request_id = rid("late")
    payload = {"code": ECHO, "ctx": {"n": 5}, "mode": "async", "request_id": request_id}
    job_id = expected_job_id(SECRET, request_id)

    async def scenario(nc: nats.NATS) -> tuple[Sent, Sent, list[Any]]:
        first = await request(nc, "code", payload)
        await completion(nc, job_id)
        await asyncio.sleep(DUPLICATE_WINDOW + 1.0)
        again = await request(nc, "code", payload)
        # The same submission stored straight into the stream, also past the window.
        await publish_job(nc, payload)
        await asyncio.to_thread(
            until,
            lambda: fleet.events("job already completed; acknowledged", job_id=job_id),
            30,
            "the duplicate acknowledged",
        )
        return first, again, await completions(nc, job_id, settle=2.0)

    first, again, stored = run(scenario, fleet.url)
    assert first.reply["status"] == again.reply["status"] == "accepted"
    assert first.reply["job_id"] == again.reply["job_id"] == job_id
    assert len(stored) == 1
    runs = [r for r in fleet.events("job completed") if r.get("job_id") == job_id]
    assert len(runs) == 1


def test_the_same_request_id_with_another_body_is_a_conflict(fleet: Fleet) -> None:
    """Same key and request_id, different body: rejected / conflict (409), signed, and the
    second body never runs."""
    request_id = rid("conflict")
    job_id = expected_job_id(SECRET, request_id)

    async def scenario(nc: nats.NATS) -> tuple[Sent, list[Any]]:
        base = {"code": ECHO, "mode": "async", "request_id": request_id}
        await request(nc, "code", {**base, "ctx": {"n": 1}})
        await completion(nc, job_id)
        other = await request(nc, "code", {**base, "ctx": {"n": 2}})
        return other, await completions(nc, job_id, settle=2.0)

    other, stored = run(scenario, fleet.url)
    assert other.reply["status"] == "rejected"
    assert other.reply["error"]["code"] == "conflict"
    assert other.headers["Nats-Service-Error-Code"] == "409"
    assert reply_signed(SECRET, other.subject, other.nonce, other.headers, other.data)
    assert [json.loads(m.data)["result"] for m in stored] == [{"n": 1}]


# -- signed replies ------------------------------------------------------------------------------


def test_replies_and_completions_are_signed_for_their_request(fleet: Fleet) -> None:
    """ok, rejected and accepted replies and the completion carry the v1-reply signature of the
    caller's key for the request's subject and nonce; a changed body no longer verifies, and
    another request's nonce does not either."""

    async def scenario(nc: nats.NATS) -> tuple[list[Sent], nats.aio.msg.Msg]:
        ok = await request(nc, "code", {"code": ECHO, "ctx": {"a": 1}})
        bad = await request(nc, "code", {"code": ECHO, "ctx": {}, "timeout": 9999})
        accepted = await request(
            nc, "code", {"code": ECHO, "ctx": {"b": 2}, "mode": "async"}, key_id=OLD_KEY_ID
        )
        done = await completion(nc, accepted.reply["job_id"])
        return [ok, bad, accepted], done

    (ok, bad, accepted), done = run(scenario, fleet.url)
    assert [ok.reply["status"], bad.reply["status"], accepted.reply["status"]] == [
        "ok",
        "rejected",
        "accepted",
    ]
    for sent, secret in ((ok, SECRET), (bad, SECRET), (accepted, OLD_SECRET)):
        assert reply_signed(secret, sent.subject, sent.nonce, sent.headers, sent.data)
        assert not reply_signed(secret, sent.subject, sent.nonce, sent.headers, sent.data + b" ")
        assert not reply_signed(secret, sent.subject, "00" * 16, sent.headers, sent.data)
    assert ok.headers["Pyexec-Key-Id"] == KEY_ID
    assert accepted.headers["Pyexec-Key-Id"] == OLD_KEY_ID
    # The completion answers the request that submitted it: its subject and nonce.
    headers = dict(done.headers or {})
    assert reply_signed(OLD_SECRET, accepted.subject, accepted.nonce, headers, done.data)
    assert not reply_signed(SECRET, accepted.subject, accepted.nonce, headers, done.data)


def test_a_messagepack_job_completes_in_messagepack(fleet: Fleet) -> None:
    """A MessagePack async request is accepted in MessagePack and its completion comes in
    MessagePack too (Content-Type set), signed for that request."""
    subject = f"{PREFIX}.code"
    body = msgspec.msgpack.encode({"code": ECHO, "ctx": {"blob": b"\x01"}, "mode": "async"})
    headers = {
        **sign(KEY_ID, SECRET.encode(), subject, body),
        "Content-Type": "application/msgpack",
    }

    async def scenario(nc: nats.NATS) -> tuple[Any, Any]:
        accepted = await nc.request(subject, body, headers=headers, timeout=30)
        job_id = msgspec.msgpack.decode(accepted.data)["job_id"]
        return accepted, await completion(nc, job_id)

    accepted, done = run(scenario, fleet.url)
    assert accepted.headers["Content-Type"] == "application/msgpack"
    assert msgspec.msgpack.decode(accepted.data)["status"] == "accepted"
    assert done.headers["Content-Type"] == "application/msgpack"
    finished = msgspec.msgpack.decode(done.data)
    assert finished["status"] == "ok"
    assert finished["result"] == {"blob": "AQ=="}
    assert reply_signed(SECRET, subject, headers["Pyexec-Nonce"], dict(done.headers), done.data)


def test_a_refused_signature_gets_an_unsigned_reply(fleet: Fleet) -> None:
    """A request whose signature does not verify is answered unauthorized, without reply
    signature headers (the executor does not know whose it is)."""

    async def scenario(nc: nats.NATS) -> Sent:
        body = json.dumps({"code": ECHO}).encode()
        headers = sign(KEY_ID, b"not-the-secret-0123456789", f"{PREFIX}.code", body)
        return await request(nc, "code", {"code": ECHO}, headers=headers)

    sent = run(scenario, fleet.url)
    assert sent.reply["error"]["code"] == "unauthorized"
    assert "Pyexec-Signature" not in sent.headers


def test_the_client_checks_reply_signatures(fleet: Fleet) -> None:
    """The Python client accepts a signed answer and refuses one forged into its inbox."""

    async def scenario() -> tuple[Any, str]:
        async with await Client.connect(fleet.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            good = await client.execute_code(ECHO, {"x": 1})
            # A fake executor answering on the same subject first, with an unsigned "ok".
            impostor = await nats.connect(fleet.url)
            try:

                async def answer(msg: Any) -> None:
                    await msg.respond(b'{"request_id":"x","status":"ok","result":"forged"}')

                await impostor.subscribe(f"{PREFIX}.impostor", cb=answer)
                await impostor.flush()
                try:
                    await once_routed(
                        lambda: client.send_raw(f"{PREFIX}.impostor", b"{}", timeout=5)
                    )
                except Exception as exc:  # noqa: BLE001 - the refusal is what is checked
                    return good, str(exc)
                return good, "accepted"
            finally:
                await impostor.close()

    good, refused = asyncio.run(scenario())
    assert good.result == {"x": 1}
    assert "not signed with this client's key" in refused


# -- reply subjects ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply_to",
    [
        f"{PREFIX}.results.{'ab' * 16}",
        f"{PREFIX}.jobs.code",
        "$JS.API.STREAM.DELETE." + RESULTS_STREAM,
        "$KV.PYEXEC_NONCES_TRUST.x",
        "$O.bucket.x",
        "$SRV.PING",
        "$SYS.REQ.SERVER.PING",
        "_PYEXEC_INBOX.abc.def",
        "billing.ledger.credit",  # not an inbox: whatever stream may capture it
    ],
)
def test_a_request_with_a_refused_reply_subject_is_dropped(fleet: Fleet, reply_to: str) -> None:
    """A signed request whose reply subject lies under the prefix or a system prefix runs
    nothing and publishes nothing there; the drop is logged."""
    request_id = rid("reply")

    async def scenario(nc: nats.NATS) -> tuple[list[bytes], int]:
        seen: list[bytes] = []

        async def spy(msg: Any) -> None:
            seen.append(msg.data)

        await nc.subscribe(reply_to, cb=spy)
        body = json.dumps({"code": ECHO, "ctx": {}, "request_id": request_id}).encode()
        headers = sign(KEY_ID, SECRET.encode(), f"{PREFIX}.code", body)
        before = (await nc.jetstream().stream_info(RESULTS_STREAM)).state.messages
        await nc.publish(f"{PREFIX}.code", body, reply=reply_to, headers=headers)
        await nc.flush()
        await asyncio.to_thread(
            until,
            lambda: any(
                r.get("reply") == reply_to
                for r in fleet.events("request dropped: its reply subject is refused")
            ),
            30,
            "the drop",
        )
        await asyncio.sleep(0.5)
        after = (await nc.jetstream().stream_info(RESULTS_STREAM)).state.messages
        return seen, after - before

    seen, stored = run(scenario, fleet.url)
    assert seen == []
    assert stored == 0
    assert not [r for r in fleet.events("request") if r.get("request_id") == request_id]


def test_discovery_does_not_answer_into_the_executors_subjects(fleet: Fleet) -> None:
    """A $SRV.PING whose reply subject is a results subject stores nothing there."""
    target = f"{PREFIX}.results.{'cd' * 16}"

    async def scenario(nc: nats.NATS) -> int:
        await nc.publish("$SRV.PING.pyexec", b"", reply=target)
        await nc.flush()
        await asyncio.sleep(1.0)
        return len(await completions(nc, "cd" * 16, settle=0.5))

    assert run(scenario, fleet.url) == 0


def test_another_fleet_does_not_answer_into_this_fleets_results(fleet: Fleet) -> None:
    """A replica of another prefix on the same account refuses a reply subject that this
    fleet's results stream captures: no forged completion lands there."""
    other = start_replica(fleet.url, "trustother")
    job_id = "ef" * 16
    try:

        async def scenario(nc: nats.NATS) -> int:
            body = json.dumps({"code": ECHO, "ctx": {"forged": True}}).encode()
            headers = sign(OLD_KEY_ID, OLD_SECRET.encode(), "trustother.code", body)
            reply_to = f"{PREFIX}.results.{job_id}"
            await nc.publish("trustother.code", body, reply=reply_to, headers=headers)
            await nc.flush()
            await asyncio.to_thread(
                other.wait_for, "request dropped: its reply subject is refused", 30
            )
            return len(await completions(nc, job_id, settle=0.5))

        assert run(scenario, fleet.url) == 0
    finally:
        other.stop()


def test_the_client_skips_what_is_not_its_jobs_completion(fleet: Fleet) -> None:
    """Client.wait returns the completion signed for the job's request, skipping what was
    stored first on the job's subject: an unsigned "completion" naming the job, and another
    job's genuine, signed completion copied there."""

    async def scenario() -> tuple[str, str, Any]:
        async with await Client.connect(fleet.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            other = await client.submit_code(ECHO, {"other": True})
            other_done = await completion(client.nc, other)
            request_id = rid("target")
            job_id = client.job_id(request_id)
            js = client.nc.jetstream()
            forged = {"request_id": request_id, "job_id": job_id, "status": "ok", "result": 1}
            await js.publish(f"{PREFIX}.results.{job_id}", json.dumps(forged).encode())
            copied = {k: v for k, v in (other_done.headers or {}).items() if k != "Nats-Msg-Id"}
            await js.publish(f"{PREFIX}.results.{job_id}", other_done.data, headers=copied)
            submitted = await client.submit_code(SLEEPY, {"seconds": 0.5}, request_id=request_id)
            return job_id, submitted, await client.wait(job_id, timeout=30)

    job_id, submitted, done = asyncio.run(scenario())
    assert submitted == job_id
    assert done.job_id == job_id
    assert done.status == "ok"
    assert done.result == "woke"


def test_a_job_id_held_by_another_message_is_not_accepted(server: NatsServer) -> None:
    """Inside the duplicate window, a submission whose job id is held in the jobs stream by a
    message that is not this job (here unsigned junk, waiting behind a busy job slot) is
    answered conflict, not accepted; the junk is refused when its turn comes."""
    replica = start_replica(server.url, PREFIX, EXECUTOR_WORKERS="2")  # one job slot
    request_id = rid("held")
    job_id = expected_job_id(SECRET, request_id)
    try:

        async def scenario(nc: nats.NATS) -> Sent:
            busy = {"code": SLEEPY, "ctx": {"seconds": 3}, "mode": "async"}
            await request(nc, "code", busy)  # takes the only job slot for 3 s
            await asyncio.sleep(0.5)
            await nc.jetstream().publish(
                f"{PREFIX}.jobs.code", b'{"code": "junk"}', headers={"Nats-Msg-Id": job_id}
            )
            payload = {"code": ECHO, "ctx": {}, "mode": "async", "request_id": request_id}
            return await request(nc, "code", payload)

        sent = run(scenario, server.url)
        replica.wait_for("job refused; acknowledged without running", timeout=30)
    finally:
        replica.stop()
    assert sent.reply["status"] == "rejected"
    assert sent.reply["error"]["code"] == "conflict"


def test_the_client_does_not_take_a_squatted_job_id_for_a_receipt(fleet: Fleet) -> None:
    """A direct submission whose job id another message holds in the duplicate window raises
    instead of returning the id as if the job were stored."""
    request_id = rid("squat")
    job_id = expected_job_id(SECRET, request_id)

    async def scenario() -> str:
        async with await Client.connect(fleet.url, KEY_ID, SECRET, prefix=PREFIX) as client:
            await client.nc.jetstream().publish(
                f"{PREFIX}.jobs.code", b"{}", headers={"Nats-Msg-Id": job_id}
            )
            try:
                await client.submit_code(ECHO, {}, request_id=request_id)
            except ClientError as exc:
                return str(exc)
            return "stored"

    assert "held in the jobs stream" in asyncio.run(scenario())


def test_a_full_jobs_stream_refuses_new_jobs_and_keeps_serving(server: NatsServer) -> None:
    """With EXECUTOR_JOBS_MAX_MSGS jobs waiting (junk behind a busy job slot), a submission is
    answered overloaded instead of growing the queue; once the junk is refused, jobs run."""
    replica = start_replica(server.url, PREFIX, EXECUTOR_WORKERS="2", EXECUTOR_JOBS_MAX_MSGS="100")
    try:

        async def scenario(nc: nats.NATS) -> tuple[Sent, dict[str, Any]]:
            await request(nc, "code", {"code": SLEEPY, "ctx": {"seconds": 3}, "mode": "async"})
            await asyncio.sleep(0.5)  # the busy job is taken: the queue holds only junk now
            js = nc.jetstream()
            for n in range(99):  # with the busy job, the stream holds its limit of 100
                await js.publish(f"{PREFIX}.jobs.code", b"{}", headers={"Nats-Msg-Id": f"j{n}"})
            full = await request(nc, "code", {"code": ECHO, "ctx": {"n": 1}, "mode": "async"})
            later: Sent | None = None
            for _ in range(60):
                await asyncio.sleep(0.5)
                later = await request(nc, "code", {"code": ECHO, "ctx": {"n": 2}, "mode": "async"})
                if later.reply["status"] == "accepted":
                    break
            assert later is not None
            done = json.loads((await completion(nc, later.reply["job_id"])).data)
            return full, done

        full, done = run(scenario, server.url)
    finally:
        replica.stop()
    assert full.reply["status"] == "rejected"
    assert full.reply["error"]["code"] == "overloaded"
    assert done["result"] == {"n": 2}


def test_a_job_with_a_message_id_in_another_case_never_runs(fleet: Fleet) -> None:
    """JetStream reads only the header named exactly Nats-Msg-Id; a job carrying its id as
    nats-msg-id is refused, not run under an id the stream did not deduplicate by."""
    request_id = rid("case")
    job_id = expected_job_id(SECRET, request_id)

    async def scenario(nc: nats.NATS) -> list[Any]:
        subject = f"{PREFIX}.jobs.code"
        body = json.dumps({"code": ECHO, "ctx": {}, "request_id": request_id}).encode()
        headers = {**sign(KEY_ID, SECRET.encode(), subject, body), "nats-msg-id": job_id}
        await nc.jetstream().publish(subject, body, headers=headers)
        return await refused(fleet, nc, job_id)

    assert run(scenario, fleet.url) == ([], "msg_id_mismatch")


# -- replays -------------------------------------------------------------------------------------


def test_a_replay_is_refused_by_the_whole_fleet(fleet: Fleet) -> None:
    """One signed message sent 12 times to two replicas runs once; every other copy is
    unauthorized as a replay, whichever replica it reached."""
    request_id = rid("replay")

    async def scenario(nc: nats.NATS) -> list[dict[str, Any]]:
        body = json.dumps({"code": ECHO, "ctx": {}, "request_id": request_id}).encode()
        headers = sign(KEY_ID, SECRET.encode(), f"{PREFIX}.code", body)
        replies = []
        for _ in range(12):
            msg = await nc.request(f"{PREFIX}.code", body, headers=headers, timeout=30)
            replies.append(json.loads(msg.data))
        return replies

    replies = run(scenario, fleet.url)
    statuses = sorted(r["status"] for r in replies)
    assert statuses == ["ok"] + ["rejected"] * 11
    assert all(r["error"]["message"].endswith("(replay)") for r in replies if r["error"])
    ran = [r for r in fleet.events("request", status="ok") if r.get("request_id") == request_id]
    assert len(ran) == 1


# -- headers ---------------------------------------------------------------------------------


def raw_request(port: int, subject: str, header_lines: list[str], body: bytes) -> bytes:
    """Publish one message with exactly these header lines over a raw client connection and
    return the reply's payload (nats-py cannot send a header twice)."""
    inbox = f"_INBOX.raw{secrets.token_hex(4)}"
    block = ("NATS/1.0\r\n" + "".join(f"{line}\r\n" for line in header_lines) + "\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        stream = conn.makefile("rb")
        stream.readline()  # INFO
        conn.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        conn.sendall(f"SUB {inbox} 1\r\n".encode())
        conn.sendall(
            f"HPUB {subject} {inbox} {len(block)} {len(block) + len(body)}\r\n".encode()
            + block
            + body
            + b"\r\n"
        )
        conn.sendall(b"PING\r\n")
        while True:
            line = stream.readline()
            if line.startswith(b"PING"):
                conn.sendall(b"PONG\r\n")
            elif line.startswith(b"HMSG"):
                *_, header_size, total = line.split()
                payload = stream.read(int(total) + 2)
                return payload[int(header_size) : int(total)]
            elif line.startswith(b"MSG"):
                size = int(line.split()[-1])
                return stream.read(size + 2)[:size]
            elif not line:
                raise AssertionError("the connection closed without a reply")


def test_a_repeated_signature_header_is_refused(fleet: Fleet) -> None:
    """A request that carries a Pyexec-* header twice is unauthorized, whichever copy is right;
    the same request with each header once runs."""
    subject = f"{PREFIX}.code"
    body = json.dumps({"code": ECHO, "ctx": {"once": True}}).encode()
    headers = sign(KEY_ID, SECRET.encode(), subject, body)
    lines = [f"{name}: {value}" for name, value in headers.items()]
    repeated = [*lines, f"Pyexec-Nonce: {secrets.token_hex(16)}"]
    refused = json.loads(raw_request(fleet.server.port, subject, repeated, body))
    fresh = sign(KEY_ID, SECRET.encode(), subject, body)
    accepted = json.loads(
        raw_request(fleet.server.port, subject, [f"{k}: {v}" for k, v in fresh.items()], body)
    )
    assert refused["status"] == "rejected"
    assert refused["error"]["code"] == "unauthorized"
    assert "Pyexec-Nonce header appears more than once" in refused["error"]["message"]
    assert accepted["status"] == "ok"


def test_a_full_body_fits_through_a_default_server(fleet: Fleet) -> None:
    """A body of exactly the default EXECUTOR_MAX_REQUEST_BYTES, with its signature headers,
    passes a server with the default 1 MiB max payload and is run."""
    head = json.dumps({"code": ECHO, "ctx": {"pad": ""}})
    pad = DEFAULT_MAX_REQUEST_BYTES - len(head)
    payload = {"code": ECHO, "ctx": {"pad": "x" * pad}}
    assert len(json.dumps(payload).encode()) == DEFAULT_MAX_REQUEST_BYTES

    async def scenario(nc: nats.NATS) -> tuple[Sent, int]:
        return await request(nc, "code", payload), nc.max_payload

    sent, max_payload = run(scenario, fleet.url)
    assert max_payload == 1024 * 1024
    assert sent.reply["status"] == "error"  # the echoed ctx is too big to send back...
    assert sent.reply["error"]["code"] == "output_limit"  # ...but the request went through


def test_a_completion_can_be_read_by_direct_get(fleet: Fleet) -> None:
    """The results stream allows direct get, so one completion is read by its subject."""

    async def scenario(nc: nats.NATS) -> dict[str, Any]:
        sent = await request(nc, "code", {"code": ECHO, "ctx": {"d": 1}, "mode": "async"})
        job_id = sent.reply["job_id"]
        await completion(nc, job_id)
        msg = await nc.jetstream().get_msg(
            RESULTS_STREAM, subject=f"{PREFIX}.results.{job_id}", direct=True
        )
        return json.loads(msg.data)

    assert run(scenario, fleet.url)["result"] == {"d": 1}


def test_discovery_names_the_prefix_and_the_limits(fleet: Fleet) -> None:
    """$SRV.INFO tells replicas under different prefixes apart and gives the main limits."""

    async def scenario(nc: nats.NATS) -> dict[str, Any]:
        msg = await nc.request("$SRV.INFO.pyexec", b"", timeout=10)
        return json.loads(msg.data)

    info = run(scenario, fleet.url)
    metadata = info["metadata"]
    assert metadata["prefix"] == PREFIX
    assert metadata["max_timeout"] == "10"
    assert metadata["max_job_timeout"] == "3600"
    assert metadata["memory_mb"] == "512"
    assert metadata["max_request_bytes"] == str(DEFAULT_MAX_REQUEST_BYTES)


# -- names for a dotted prefix, and shutdown -----------------------------------------------------


def test_a_dotted_prefix_names_its_streams_and_buckets(server: NatsServer) -> None:
    """staging.pyexec gives PYEXEC_JOBS_STAGING_PYEXEC (and so on), as docs/configuration.md
    and deploy/nats.conf say."""
    replica = start_replica(server.url, "staging.pyexec")
    try:

        async def scenario(nc: nats.NATS) -> list[str]:
            return sorted(info.config.name or "" for info in await nc.jetstream().streams_info())

        names = run(scenario, server.url)
    finally:
        replica.stop()
    assert names == [
        "KV_PYEXEC_JOB_IDS_STAGING_PYEXEC",
        "KV_PYEXEC_NONCES_STAGING_PYEXEC",
        "OBJ_PYEXEC_FILES_STAGING_PYEXEC",
        "PYEXEC_JOBS_STAGING_PYEXEC",
        "PYEXEC_RESULTS_STAGING_PYEXEC",
    ]
    root = Path(__file__).resolve().parent.parent
    for doc in ("docs/configuration.md", "deploy/nats.conf"):
        text = (root / doc).read_text(encoding="utf-8")
        assert "PYEXEC_JOBS_STAGING_PYEXEC" in text
    assert "PYEXEC_FILES_STAGING_PYEXEC" in (root / "deploy/nats.conf").read_text()


def test_a_request_cut_by_shutdown_is_answered_worker_lost(server: NatsServer) -> None:
    """A sync request still running when a stopping replica's grace period ends gets a signed
    error / worker_lost reply saying the replica stopped, not silence."""
    port = free_port()
    replica = start_replica(
        server.url, PREFIX, EXECUTOR_SHUTDOWN_GRACE="1", EXECUTOR_METRICS_PORT=str(port)
    )

    def running() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            return "pyexec_runs_in_flight 1.0" in page.read().decode()

    async def scenario(nc: nats.NATS) -> tuple[Sent, float]:
        pending = asyncio.ensure_future(
            request(nc, "code", {"code": SLEEPY, "ctx": {"seconds": 8}, "timeout": 10})
        )
        await asyncio.to_thread(until, running, 30, "the run to start")
        started = time.monotonic()
        replica.process.send_signal(signal.SIGTERM)
        sent = await pending
        return sent, time.monotonic() - started

    try:
        sent, waited = run(scenario, server.url)
    finally:
        replica.stop()
    assert sent.reply["status"] == "error"
    assert sent.reply["error"]["code"] == "worker_lost"
    assert "replica stopped" in sent.reply["error"]["message"]
    assert reply_signed(SECRET, sent.subject, sent.nonce, sent.headers, sent.data)
    assert waited < 7  # answered at the end of the grace period, not when the script ended


def test_a_flood_is_refused_unread_past_what_a_replica_can_hold(server: NatsServer) -> None:
    """Past the requests a replica can hold at once (its wait queue, its workers and a margin)
    a new message is answered overloaded at once, before its signature is even checked, so a
    flood cannot make others wait behind it; once the flood is over the replica serves again."""
    replica = start_replica(
        server.url,
        PREFIX,
        EXECUTOR_WORKERS="1",
        EXECUTOR_QUEUE_LIMIT="200",
        EXECUTOR_QUEUE_WAIT="20",
        EXECUTOR_MAX_TIMEOUT="30",
    )
    held = 200 + 4 * 1 + 64  # queue limit + 4 per worker + 64

    async def scenario(nc: nats.NATS) -> tuple[list[dict[str, Any]], Sent]:
        async def one() -> dict[str, Any]:
            body = json.dumps({"code": SLEEPY, "ctx": {"seconds": 5}, "timeout": 10}).encode()
            headers = sign(KEY_ID, SECRET.encode(), f"{PREFIX}.code", body)
            msg = await nc.request(f"{PREFIX}.code", body, headers=headers, timeout=60)
            return dict(json.loads(msg.data))

        flood = [asyncio.ensure_future(one()) for _ in range(held + 30)]
        await asyncio.sleep(3)
        shed = [task.result() for task in flood if task.done()]
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
        await asyncio.sleep(1)
        while True:  # the flood's runs drain: then a request runs again
            after = await request(nc, "code", {"code": ECHO, "ctx": {"after": True}})
            if after.reply["status"] == "ok":
                return shed, after
            await asyncio.sleep(1)

    try:
        shed, after = run(scenario, server.url)
    finally:
        replica.stop()
    refused = [r for r in shed if r["error"] and "holds as many requests" in r["error"]["message"]]
    assert len(refused) >= 30
    assert all(r["error"]["code"] == "overloaded" for r in refused)
    assert after.reply["result"] == {"after": True}


def test_a_forged_completion_stored_first_is_not_the_jobs_completion(server: NatsServer) -> None:
    """A client with no key, allowed to publish on the results subjects (no permissions on
    this server), stores an unsigned 'completion' under the job's id as message id before the
    job ends: the job's real, signed completion is still stored and is the one the caller
    waits for, and the signed status reply embeds the real one, never the forgery."""
    replica = start_replica(server.url, PREFIX)
    try:

        async def scenario() -> tuple[Reply, Any, int]:
            async with await Client.connect(server.url, KEY_ID, SECRET, prefix=PREFIX) as client:
                request_id = f"forged-{time.time_ns()}"
                job_id = client.job_id(request_id)
                forger = await nats.connect(server.url)
                forged = {"request_id": request_id, "job_id": job_id, "status": "ok", "result": 1e9}
                await forger.jetstream().publish(
                    f"{PREFIX}.results.{job_id}",
                    json.dumps(forged).encode(),
                    headers={"Nats-Msg-Id": job_id},
                )
                await forger.close()
                source = "def execute(ctx):\n    return 42\n"
                await client.send(
                    f"{PREFIX}.code",
                    CodeRequest(code=source, mode="async", request_id=request_id, timeout=10),
                )
                completion = await client.wait(job_id, timeout=60)
                # The record says done just after the completion is stored.
                deadline = time.monotonic() + 30
                while (status := await client.status(job_id)).state != "done":
                    assert time.monotonic() < deadline, status
                    await asyncio.sleep(0.05)
                return completion, status.completion, 0

        completion, embedded, _ = asyncio.run(scenario())
    finally:
        replica.stop()
    assert (completion.status, completion.result) == ("ok", 42)
    assert embedded is not None
    assert embedded.result == 42
