"""Signed API keys: every way a request is refused as ``unauthorized``, and the signing rules.

The requests in this file are signed by :func:`hmac_headers`, written here from the contract
with ``hashlib``/``hmac`` alone, so the service is checked against the contract rather than
against its own signing code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from pyexec_client.signing import canonical, sign_reply, signature, verify_reply

from consumer.auth import Verifier
from consumer.config import Keyring
from consumer.errors import Unauthorized
from consumer.transport import Headers, repeated_names
from tests.conftest import (
    KEY_ID,
    OLD_KEY_ID,
    OLD_SECRET,
    SECRET,
    Caller,
    NatsServer,
    RawReply,
    ReplicaProcess,
    start_replica,
)

KEY_ID_HEADER = "Pyexec-Key-Id"
TIMESTAMP_HEADER = "Pyexec-Timestamp"
NONCE_HEADER = "Pyexec-Nonce"
SIGNATURE_HEADER = "Pyexec-Signature"
SIGNATURE_HEADERS = (KEY_ID_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)
SOURCE = "def execute(ctx):\n    return ctx.get('x', 0) + 1"
CLIENT_SECRETS = (SECRET, OLD_SECRET)


def hmac_headers(
    key_id: str,
    secret: str,
    subject: str,
    body: bytes,
    *,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The four signature headers, computed from the contract's text with hashlib and hmac."""
    stamp = str(int(time.time())) if timestamp is None else timestamp
    nonce = secrets.token_hex(16) if nonce is None else nonce
    text = "\n".join(("v1", subject, stamp, nonce, hashlib.sha256(body).hexdigest()))
    mac = hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()
    return {
        KEY_ID_HEADER: key_id,
        TIMESTAMP_HEADER: stamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: mac,
    }


def code_body(x: int = 1) -> bytes:
    return json.dumps({"code": SOURCE, "ctx": {"x": x}}).encode()


# -- through a real replica -------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_replica(nats_server: NatsServer) -> Iterator[ReplicaProcess]:
    """A replica of this module's own, so its log lines belong to these tests alone."""
    proc = start_replica(nats_server.url, "authsuite")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def auth_caller(nats_server: NatsServer, auth_replica: ReplicaProcess) -> Caller:
    """Calls this module's replica."""
    return Caller(nats_server.url, auth_replica.prefix)


def request_records(replica: ReplicaProcess) -> list[dict[str, Any]]:
    return [r for r in replica.records() if r.get("event") == "request"]


def send(
    caller: Caller, replica: ReplicaProcess, kind: str, body: bytes, **options: Any
) -> tuple[RawReply, str | None]:
    """Send one raw request; return its reply and the auth failure the replica logged for it."""
    before = len(request_records(replica))
    raw = caller.raw(kind, body, **options)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = request_records(replica)
        if len(records) > before:
            reason = records[before].get("auth_failure")
            return raw, None if reason is None else str(reason)
        time.sleep(0.02)
    raise AssertionError("the replica logged no line for the request")


def assert_unauthorized(raw: RawReply) -> None:
    """The reply a caller gets for a refused signature: rejected, 401, nothing ran."""
    assert raw.reply.status == "rejected"
    assert raw.reply.error is not None
    assert raw.reply.error.code == "unauthorized"
    assert raw.reply.result is None
    assert raw.reply.stdout == ""
    assert raw.headers.get("Nats-Service-Error")
    assert raw.headers.get("Nats-Service-Error-Code") == "401"
    for secret in CLIENT_SECRETS:
        assert secret.encode() not in raw.data
        assert all(secret not in value for value in raw.headers.values())


def test_request_signed_by_the_contract_rules_is_served(
    auth_caller: Caller, auth_replica: ReplicaProcess
) -> None:
    """A request signed exactly as the contract describes runs and returns its result."""
    body = code_body(41)
    subject = auth_caller.subject("code")
    raw, reason = send(
        auth_caller,
        auth_replica,
        "code",
        body,
        headers=hmac_headers(KEY_ID, SECRET, subject, body),
    )
    assert raw.reply.status == "ok"
    assert raw.reply.result == 42
    assert reason is None
    assert "Nats-Service-Error-Code" not in raw.headers


@pytest.mark.parametrize("missing", SIGNATURE_HEADERS)
def test_each_missing_header_is_unauthorized(
    auth_caller: Caller, auth_replica: ReplicaProcess, missing: str
) -> None:
    """Leaving out any one of the four signature headers gets ``unauthorized``."""
    body = code_body()
    headers = hmac_headers(KEY_ID, SECRET, auth_caller.subject("code"), body)
    del headers[missing]
    raw, reason = send(auth_caller, auth_replica, "code", body, headers=headers)
    assert_unauthorized(raw)
    assert reason == "missing_header"
    assert raw.reply.error is not None
    assert missing in raw.reply.error.message


def test_request_without_any_header_is_unauthorized(
    auth_caller: Caller, auth_replica: ReplicaProcess
) -> None:
    """An unsigned request (no headers at all) gets ``unauthorized``."""
    raw, reason = send(auth_caller, auth_replica, "code", code_body(), signed=False)
    assert_unauthorized(raw)
    assert reason == "missing_header"


def test_unknown_key_id_is_unauthorized(auth_caller: Caller, auth_replica: ReplicaProcess) -> None:
    """A key id the executor does not hold gets ``unauthorized``, even with a good-looking MAC."""
    body = code_body()
    headers = hmac_headers("nobody", SECRET, auth_caller.subject("code"), body)
    raw, reason = send(auth_caller, auth_replica, "code", body, headers=headers)
    assert_unauthorized(raw)
    assert reason == "unknown_key"


def test_signature_made_with_the_wrong_secret_is_unauthorized(
    auth_caller: Caller, auth_replica: ReplicaProcess
) -> None:
    """A known key id with a MAC made from another secret gets ``unauthorized``."""
    body = code_body()
    headers = hmac_headers(KEY_ID, secrets.token_hex(32), auth_caller.subject("code"), body)
    raw, reason = send(auth_caller, auth_replica, "code", body, headers=headers)
    assert_unauthorized(raw)
    assert reason == "bad_signature"


def test_body_changed_after_signing_is_unauthorized(
    auth_caller: Caller, auth_replica: ReplicaProcess
) -> None:
    """Changing the body after it was signed gets ``unauthorized``: the MAC covers the body."""
    headers = hmac_headers(KEY_ID, SECRET, auth_caller.subject("code"), code_body(1))
    raw, reason = send(auth_caller, auth_replica, "code", code_body(2), headers=headers)
    assert_unauthorized(raw)
    assert reason == "bad_signature"


def test_signature_made_for_another_subject_is_unauthorized(
    auth_caller: Caller, auth_replica: ReplicaProcess
) -> None:
    """A request signed for ``<prefix>.named`` but sent to ``<prefix>.code`` is refused."""
    body = code_body()
    headers = hmac_headers(KEY_ID, SECRET, auth_caller.subject("named"), body)
    raw, reason = send(auth_caller, auth_replica, "code", body, headers=headers)
    assert_unauthorized(raw)
    assert reason == "bad_signature"


@pytest.mark.parametrize("offset", [-120, 120], ids=["past", "future"])
def test_timestamp_far_from_the_executor_clock_is_unauthorized(
    auth_caller: Caller, auth_replica: ReplicaProcess, offset: int
) -> None:
    """A correctly signed request stamped more than 60 s before or after now is refused."""
    body = code_body()
    stamp = str(int(time.time()) + offset)
    headers = hmac_headers(KEY_ID, SECRET, auth_caller.subject("code"), body, timestamp=stamp)
    raw, reason = send(auth_caller, auth_replica, "code", body, headers=headers)
    assert_unauthorized(raw)
    assert reason == "stale_timestamp"


def test_replayed_request_is_unauthorized(
    auth_caller: Caller, auth_replica: ReplicaProcess
) -> None:
    """The same signed message sent twice runs once; the copy is refused as a replay."""
    body = code_body(7)
    headers = hmac_headers(KEY_ID, SECRET, auth_caller.subject("code"), body)
    first, first_reason = send(auth_caller, auth_replica, "code", body, headers=dict(headers))
    second, second_reason = send(auth_caller, auth_replica, "code", body, headers=dict(headers))
    assert first.reply.status == "ok"
    assert first.reply.result == 8
    assert first_reason is None
    assert_unauthorized(second)
    assert second_reason == "replayed_nonce"


def _uppercase_nonce() -> str:
    return secrets.token_hex(16).upper()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param(NONCE_HEADER, lambda: secrets.token_hex(15), id="nonce-15-bytes"),
        pytest.param(NONCE_HEADER, _uppercase_nonce, id="nonce-uppercase-hex"),
        pytest.param(NONCE_HEADER, lambda: "zz" * 16, id="nonce-not-hex"),
        pytest.param(NONCE_HEADER, lambda: secrets.token_hex(16) + "a", id="nonce-odd-length"),
        pytest.param(TIMESTAMP_HEADER, lambda: f"{time.time():.3f}", id="timestamp-fraction"),
        pytest.param(TIMESTAMP_HEADER, lambda: f"{int(time.time())}s", id="timestamp-letters"),
        pytest.param(TIMESTAMP_HEADER, lambda: f"+{int(time.time())}", id="timestamp-sign"),
    ],
)
def test_malformed_header_is_unauthorized(
    auth_caller: Caller, auth_replica: ReplicaProcess, field: str, value: Callable[[], str]
) -> None:
    """A nonce or timestamp not in the contract's format is refused even when correctly signed."""
    body = code_body()
    subject = auth_caller.subject("code")
    if field == NONCE_HEADER:
        headers = hmac_headers(KEY_ID, SECRET, subject, body, nonce=value())
    else:
        headers = hmac_headers(KEY_ID, SECRET, subject, body, timestamp=value())
    raw, reason = send(auth_caller, auth_replica, "code", body, headers=headers)
    assert_unauthorized(raw)
    assert reason == "malformed_header"


def test_uppercase_signature_is_unauthorized(
    auth_caller: Caller, auth_replica: ReplicaProcess
) -> None:
    """The signature must be lowercase hex; the right MAC in uppercase is refused."""
    body = code_body()
    headers = hmac_headers(KEY_ID, SECRET, auth_caller.subject("code"), body)
    headers[SIGNATURE_HEADER] = headers[SIGNATURE_HEADER].upper()
    raw, reason = send(auth_caller, auth_replica, "code", body, headers=headers)
    assert_unauthorized(raw)
    assert reason == "malformed_header"


def test_msgpack_request_is_refused_in_msgpack(
    auth_caller: Caller, auth_replica: ReplicaProcess
) -> None:
    """A MessagePack caller with a bad signature gets its ``unauthorized`` reply in MessagePack."""
    body = msgspec.msgpack.encode({"code": SOURCE})
    headers = hmac_headers(KEY_ID, OLD_SECRET, auth_caller.subject("code"), body)
    headers["Content-Type"] = "application/msgpack"
    raw, reason = send(auth_caller, auth_replica, "code", body, headers=headers)
    assert raw.headers.get("Content-Type") == "application/msgpack"
    assert msgspec.msgpack.decode(raw.data)["error"]["code"] == "unauthorized"
    assert_unauthorized(raw)
    assert reason == "bad_signature"


def test_unsigned_request_is_unauthorized_whatever_its_content_type(
    auth_caller: Caller, auth_replica: ReplicaProcess
) -> None:
    """A request without signature headers is ``unauthorized`` before anything else is judged."""
    raw, reason = send(
        auth_caller, auth_replica, "code", code_body(), headers={"Content-Type": "text/plain"}
    )
    assert_unauthorized(raw)
    assert reason == "missing_header"


@pytest.mark.parametrize(
    ("key_id", "secret"), [(KEY_ID, SECRET), (OLD_KEY_ID, OLD_SECRET)], ids=["new", "old"]
)
def test_every_configured_key_is_accepted(
    auth_caller: Caller, auth_replica: ReplicaProcess, key_id: str, secret: str
) -> None:
    """Both keys in EXECUTOR_API_KEYS sign valid requests, so a key can be rotated live."""
    for kind, payload in (
        ("code", {"code": SOURCE, "ctx": {"x": 1}}),
        ("named", {"name": "text.normalize", "ctx": {"text": "  A  b "}}),
    ):
        body = json.dumps(payload).encode()
        headers = hmac_headers(key_id, secret, auth_caller.subject(kind), body)
        raw, reason = send(auth_caller, auth_replica, kind, body, headers=headers)
        assert raw.reply.status == "ok", raw.reply
        assert reason is None


def test_no_secret_in_any_reply_or_log_line(
    auth_caller: Caller, auth_replica: ReplicaProcess
) -> None:
    """Neither configured secret appears in replies, reply headers or the replica's logs."""
    subject = auth_caller.subject("code")
    body = code_body()
    attempts: list[dict[str, str] | None] = [
        hmac_headers(KEY_ID, SECRET, subject, body),
        hmac_headers(OLD_KEY_ID, OLD_SECRET, subject, body),
        hmac_headers(KEY_ID, OLD_SECRET, subject, body),
        hmac_headers(OLD_KEY_ID, SECRET, subject, body),
        hmac_headers("nobody", SECRET, subject, body),
        hmac_headers(KEY_ID, SECRET, subject, body, timestamp="0"),
        None,
    ]
    replies = []
    for headers in attempts:
        raw, _ = send(auth_caller, auth_replica, "code", body, headers=headers, signed=False)
        replies.append(raw)
    assert [r.reply.status for r in replies] == ["ok", "ok"] + ["rejected"] * 5
    logged = "".join(auth_replica.lines)
    assert logged
    for secret in CLIENT_SECRETS:
        assert secret not in logged
        for raw in replies:
            assert secret.encode() not in raw.data
            assert all(secret not in value for value in raw.headers.values())


# -- canonical string and signature -----------------------------------------------------------

VECTOR_SECRET = b"pyexec-test-vector-secret-0001"
VECTOR_SUBJECT = "pyexec.code"
VECTOR_TIMESTAMP = "1700000000"
VECTOR_NONCE = "00112233445566778899aabbccddeeff"
VECTOR_BODY = b'{"code":"def execute(ctx):\\n    return 1"}'
# Computed outside Python with: printf 'v1\npyexec.code\n1700000000\n<nonce>\n<sha256 of body>'
#   | openssl dgst -sha256 -hmac pyexec-test-vector-secret-0001
VECTOR_BODY_SHA256 = "a0c267ef903da148e791c660a9e8bad59e86bc000139f8cf65adc05b4ecc3e07"
VECTOR_SIGNATURE = "c153753388df465e7b5d2d62237a73ecc02731fe994d98d812cffe530affbc64"


def test_canonical_string_follows_the_contract() -> None:
    """canonical() is "v1", subject, timestamp, nonce and the body's SHA-256 hex, one per line."""
    expected = (
        b"v1\n"
        + VECTOR_SUBJECT.encode()
        + b"\n"
        + VECTOR_TIMESTAMP.encode()
        + b"\n"
        + VECTOR_NONCE.encode()
        + b"\n"
        + hashlib.sha256(VECTOR_BODY).hexdigest().encode()
    )
    assert hashlib.sha256(VECTOR_BODY).hexdigest() == VECTOR_BODY_SHA256
    assert canonical(VECTOR_SUBJECT, VECTOR_TIMESTAMP, VECTOR_NONCE, VECTOR_BODY) == expected


def test_signature_is_lowercase_hex_hmac_sha256_of_canonical() -> None:
    """signature() equals HMAC-SHA256(secret, canonical) in lowercase hex (fixed test vector)."""
    text = f"v1\n{VECTOR_SUBJECT}\n{VECTOR_TIMESTAMP}\n{VECTOR_NONCE}\n{VECTOR_BODY_SHA256}"
    independent = hmac.new(VECTOR_SECRET, text.encode(), hashlib.sha256).hexdigest()
    got = signature(VECTOR_SECRET, VECTOR_SUBJECT, VECTOR_TIMESTAMP, VECTOR_NONCE, VECTOR_BODY)
    assert independent == VECTOR_SIGNATURE
    assert got == VECTOR_SIGNATURE


@pytest.mark.parametrize("field", ["secret", "subject", "timestamp", "nonce", "body"])
def test_signature_depends_on_every_input(field: str) -> None:
    """Changing any one signed input (or the secret) changes the signature."""
    inputs: dict[str, Any] = {
        "secret": VECTOR_SECRET,
        "subject": VECTOR_SUBJECT,
        "timestamp": VECTOR_TIMESTAMP,
        "nonce": VECTOR_NONCE,
        "body": VECTOR_BODY,
    }
    changed = {
        "secret": b"another-secret-of-enough-length",
        "subject": "pyexec.named",
        "timestamp": "1700000001",
        "nonce": "ffeeddccbbaa99887766554433221100",
        "body": VECTOR_BODY + b" ",
    }
    inputs[field] = changed[field]
    assert signature(**inputs) != VECTOR_SIGNATURE


# -- Verifier with an injected clock ----------------------------------------------------------

NOW = 1_700_000_000
UNIT_KEY_ID = "unit"
UNIT_SECRET = "unit-test-secret-0123456789abcdef"  # noqa: S105 - a test key
UNIT_SUBJECT = "pyexec.code"


class FakeClock:
    """Wall clock and monotonic clock that move only when a test says so."""

    def __init__(self) -> None:
        self.wall = float(NOW)
        self.mono = 1000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def make_verifier(clock: FakeClock, capacity: int = 1000) -> Verifier:
    return Verifier(
        Keyring({UNIT_KEY_ID: UNIT_SECRET}),
        capacity=capacity,
        clock=clock.time,
        monotonic=clock.monotonic,
    )


def unit_headers(
    body: bytes = b"{}", *, timestamp: int = NOW, nonce: str | None = None
) -> dict[str, str]:
    return hmac_headers(
        UNIT_KEY_ID, UNIT_SECRET, UNIT_SUBJECT, body, timestamp=str(timestamp), nonce=nonce
    )


@pytest.mark.parametrize("offset", [-60, 60])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.999])
def test_the_clock_window_is_symmetric_in_whole_seconds(offset: int, fraction: float) -> None:
    """With the executor's clock between whole seconds, 60 s ahead and 60 s behind are both
    accepted and 61 s either way is not: the clock is truncated before comparing."""
    clock = FakeClock()
    clock.wall += fraction
    verifier = make_verifier(clock)
    assert verifier.verify(UNIT_SUBJECT, unit_headers(timestamp=NOW + offset), b"{}")
    step = 1 if offset > 0 else -1
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(UNIT_SUBJECT, unit_headers(timestamp=NOW + offset + step), b"{}")
    assert caught.value.reason == "stale_timestamp"


def test_a_repeated_pyexec_header_in_the_raw_block_is_found() -> None:
    """The replica's connection marks Pyexec-* names a raw header block repeats, in any case;
    other repeated names and single ones are not marked."""
    raw = (
        b"NATS/1.0\r\nPyexec-Nonce: aa\r\npyexec-nonce: bb\r\nPyexec-Key-Id: k\r\n"
        b"X-Other: 1\r\nX-Other: 2\r\n\r\n"
    )
    assert repeated_names(raw) == frozenset({"pyexec-nonce"})
    ids = b"NATS/1.0\r\nNats-Msg-Id: a\r\nnats-msg-id: b\r\n\r\n"
    assert repeated_names(ids) == frozenset({"nats-msg-id"})
    headers = Headers({"Pyexec-Nonce": "bb"})
    headers.repeated = repeated_names(raw)
    verifier = make_verifier(FakeClock())
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(UNIT_SUBJECT, headers, b"{}")
    assert caught.value.reason == "repeated_header"
    assert str(caught.value) == "the Pyexec-Nonce header appears more than once"


def test_a_reply_signature_binds_the_request_and_the_body() -> None:
    """sign_reply / verify_reply: the reply verifies for its request's subject and nonce with
    the caller's key only; another nonce, subject, body, key id or key does not."""
    secret = UNIT_SECRET.encode()
    nonce = secrets.token_hex(16)
    body = b'{"status":"ok"}'
    headers = sign_reply(UNIT_KEY_ID, secret, UNIT_SUBJECT, nonce, body)

    def valid(**changed: Any) -> bool:
        args: dict[str, Any] = {
            "secret": secret,
            "key_id": UNIT_KEY_ID,
            "headers": headers,
            "body": body,
            "request_subject": UNIT_SUBJECT,
            "request_nonce": nonce,
        }
        args.update(changed)
        return verify_reply(**args)

    assert valid()
    assert not valid(request_nonce=secrets.token_hex(16))
    assert not valid(request_subject="pyexec.named")
    assert not valid(body=body + b" ")
    assert not valid(key_id="other")
    assert not valid(secret=b"another-secret-0123456789abcdef")
    assert not valid(headers={k: v for k, v in headers.items() if k != "Pyexec-Signature"})


@pytest.mark.parametrize("offset", [-60, 0, 60])
def test_verifier_accepts_timestamps_within_60_seconds(offset: int) -> None:
    """A timestamp up to exactly 60 s before or after the executor's clock is accepted."""
    verifier = make_verifier(FakeClock())
    headers = unit_headers(timestamp=NOW + offset)
    assert verifier.verify(UNIT_SUBJECT, headers, b"{}") == UNIT_KEY_ID


@pytest.mark.parametrize("offset", [-61, 61])
def test_verifier_refuses_timestamps_61_seconds_away(offset: int) -> None:
    """A timestamp 61 s before or after the executor's clock is refused as stale."""
    verifier = make_verifier(FakeClock())
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(UNIT_SUBJECT, unit_headers(timestamp=NOW + offset), b"{}")
    assert caught.value.reason == "stale_timestamp"
    assert caught.value.code == "unauthorized"
    assert caught.value.http == 401


def test_verifier_judges_a_job_by_its_reference_time() -> None:
    """With a reference time (a job's stored time), the window is measured from it, not now."""
    clock = FakeClock()
    verifier = make_verifier(clock)
    stored = NOW - 3600
    headers = unit_headers(timestamp=stored - 30)
    assert verifier.verify(UNIT_SUBJECT, headers, b"{}", reference_time=stored) == UNIT_KEY_ID
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(UNIT_SUBJECT, unit_headers(timestamp=stored), b"{}")
    assert caught.value.reason == "stale_timestamp"


def test_verifier_refuses_a_replayed_nonce() -> None:
    """A nonce accepted once is refused the second time, even on a different, signed body."""
    clock = FakeClock()
    verifier = make_verifier(clock)
    nonce = secrets.token_hex(16)
    verifier.verify(UNIT_SUBJECT, unit_headers(b"{}", nonce=nonce), b"{}")
    clock.advance(30)
    for body in (b"{}", b'{"other": 1}'):
        with pytest.raises(Unauthorized) as caught:
            verifier.verify(UNIT_SUBJECT, unit_headers(body, nonce=nonce), body)
        assert caught.value.reason == "replayed_nonce"


def test_verifier_does_not_spend_a_nonce_on_a_refused_message() -> None:
    """A forged message does not use up its nonce: the genuine one with it is still accepted."""
    verifier = make_verifier(FakeClock())
    nonce = secrets.token_hex(16)
    forged = unit_headers(b"{}", nonce=nonce)
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(UNIT_SUBJECT, forged, b'{"forged": true}')
    assert caught.value.reason == "bad_signature"
    assert verifier.verify(UNIT_SUBJECT, forged, b"{}") == UNIT_KEY_ID


def test_a_full_nonce_cache_forgets_its_oldest_instead_of_refusing_everyone() -> None:
    """A replica's own cache, full, forgets its oldest nonce rather than answering everyone
    overloaded (one caller filling it must not lock the others out); the newer ones are still
    refused as replays. The fleet-wide store still refuses the forgotten one (test_trust)."""
    clock = FakeClock()
    verifier = make_verifier(clock, capacity=2)
    oldest, middle, newest = (unit_headers() for _ in range(3))
    for headers in (oldest, middle, newest):
        assert verifier.verify(UNIT_SUBJECT, headers, b"{}") == UNIT_KEY_ID
    for headers in (middle, newest):
        with pytest.raises(Unauthorized) as caught:
            verifier.verify(UNIT_SUBJECT, headers, b"{}")
        assert caught.value.reason == "replayed_nonce"
    assert verifier.verify(UNIT_SUBJECT, oldest, b"{}") == UNIT_KEY_ID  # forgotten locally


def test_verifier_forgets_nonces_after_twice_the_window() -> None:
    """A nonce is remembered for twice the window, then forgotten (no message can be valid
    that long)."""
    clock = FakeClock()
    verifier = make_verifier(clock, capacity=10)
    headers = unit_headers()
    verifier.verify(UNIT_SUBJECT, headers, b"{}")
    clock.advance(119)
    with pytest.raises(Unauthorized):
        verifier.verify(UNIT_SUBJECT, headers, b"{}", reference_time=NOW)
    clock.advance(2)
    assert verifier.verify(UNIT_SUBJECT, headers, b"{}", reference_time=NOW) == UNIT_KEY_ID


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param(None, "missing_header", id="no-headers"),
        pytest.param({KEY_ID_HEADER: ""}, "missing_header", id="empty-key-id"),
        pytest.param({KEY_ID_HEADER: "nobody"}, "unknown_key", id="unknown-key"),
        pytest.param({KEY_ID_HEADER: "bad id!"}, "malformed_header", id="bad-key-id"),
        pytest.param({SIGNATURE_HEADER: "ab" * 32}, "bad_signature", id="wrong-mac"),
        pytest.param({SIGNATURE_HEADER: "ab" * 31}, "malformed_header", id="short-mac"),
    ],
)
def test_verifier_names_why_it_refused(headers: dict[str, str] | None, reason: str) -> None:
    """Each refusal carries the reason operators see in the logs."""
    verifier = make_verifier(FakeClock())
    sent = None if headers is None else {**unit_headers(), **headers}
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(UNIT_SUBJECT, sent, b"{}")
    assert caught.value.reason == reason
