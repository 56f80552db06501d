"""The request and reply bodies on the wire: validation, request ids, encodings, reply shape."""

from __future__ import annotations

import asyncio
import datetime
import json
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import nats
import pytest
from pyexec_client.signing import sign

from tests.conftest import KEY_ID, SECRET, Caller, NatsServer, RawReply, start_replica

OK_SOURCE = "def execute(ctx):\n    return 'alive'"
ECHO_SOURCE = "def execute(ctx):\n    return ctx"
REPLY_KEYS = {"request_id", "job_id", "status", "result", "error", "stdout", "duration_ms"}
ERROR_KEYS = {"code", "type", "message", "traceback"}
MSGPACK = "application/msgpack"
SHARED_MAX_TIMEOUT = 10  # EXECUTOR_MAX_TIMEOUT of the shared replica (tests/conftest.py)
DEFAULT_MAX_CTX_DEPTH = 32
SMALL_MAX_REQUEST_BYTES = 2048


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def signed(caller: Caller, kind: str, body: bytes, **extra: str) -> dict[str, str]:
    """Signature headers for ``body`` on ``kind``'s subject, plus ``extra`` headers."""
    return {**sign(KEY_ID, SECRET.encode(), caller.subject(kind), body), **extra}


def send_msgpack(caller: Caller, kind: str, value: Any) -> RawReply:
    body = msgspec.msgpack.encode(value)
    headers = signed(caller, kind, body, **{"Content-Type": MSGPACK})
    return caller.raw(kind, body, headers=headers)


def assert_invalid(raw: RawReply) -> None:
    """A rejection for a malformed request, as the caller sees it."""
    assert raw.reply.status == "rejected", raw.reply
    assert raw.reply.error is not None
    assert raw.reply.error.code == "invalid_request"
    assert raw.reply.error.message
    assert raw.reply.result is None
    assert raw.headers.get("Nats-Service-Error")
    assert raw.headers.get("Nats-Service-Error-Code") == "400"


def assert_still_serving(caller: Caller) -> None:
    reply = caller.code(OK_SOURCE)
    assert reply.status == "ok"
    assert reply.result == "alive"


def nesting(levels: int) -> dict[str, Any]:
    """A ctx object ``levels`` objects deep, counting ctx itself as the first."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def connection_max_payload(url: str) -> int:
    async def go() -> int:
        nc = await nats.connect(url)
        try:
            return int(nc.max_payload)
        finally:
            await nc.close()

    return asyncio.run(go())


# -- invalid requests -------------------------------------------------------------------------

INVALID_CODE_BODIES = [
    pytest.param(b"{not json", id="not-json"),
    pytest.param(b"", id="empty-body"),
    pytest.param(b'{"code": "def execute(ctx): pass"', id="truncated-json"),
    pytest.param(b"[1, 2]", id="json-array"),
    pytest.param(b'"def execute(ctx): pass"', id="json-string"),
    pytest.param(b"42", id="json-number"),
    pytest.param(b"null", id="json-null"),
    pytest.param(as_json({"code": OK_SOURCE, "extra": 1}), id="unknown-field"),
    pytest.param(as_json({"code": OK_SOURCE, "name": "text.normalize"}), id="name-with-code"),
    pytest.param(as_json({"name": "text.normalize"}), id="name-instead-of-code"),
    pytest.param(as_json({"ctx": {}}), id="missing-code"),
    pytest.param(as_json({"code": 123}), id="code-not-a-string"),
    pytest.param(as_json({"code": None}), id="code-null"),
    pytest.param(as_json({"code": OK_SOURCE, "ctx": [1, 2]}), id="ctx-list"),
    pytest.param(as_json({"code": OK_SOURCE, "ctx": "{}"}), id="ctx-string"),
    pytest.param(as_json({"code": OK_SOURCE, "timeout": "5"}), id="timeout-string"),
    pytest.param(as_json({"code": OK_SOURCE, "timeout": True}), id="timeout-bool"),
    pytest.param(as_json({"code": OK_SOURCE, "timeout": 0}), id="timeout-zero"),
    pytest.param(as_json({"code": OK_SOURCE, "timeout": -1}), id="timeout-negative"),
    pytest.param(b'{"code": "def execute(ctx): pass", "timeout": 1e400}', id="timeout-huge"),
    pytest.param(as_json({"code": OK_SOURCE, "mode": "later"}), id="mode-later"),
    pytest.param(as_json({"code": OK_SOURCE, "request_id": 5}), id="request-id-number"),
    pytest.param(as_json({"code": OK_SOURCE, "request_id": ""}), id="request-id-empty"),
]


@pytest.mark.parametrize("body", INVALID_CODE_BODIES)
def test_malformed_code_request_is_invalid(caller: Caller, body: bytes) -> None:
    """A body on ``<prefix>.code`` breaking the contract is rejected with 400; serving goes on."""
    assert_invalid(caller.raw("code", body))
    assert_still_serving(caller)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(as_json({"ctx": {}}), id="missing-name"),
        pytest.param(as_json({"code": OK_SOURCE}), id="code-instead-of-name"),
        pytest.param(as_json({"name": ""}), id="name-empty"),
        pytest.param(as_json({"name": ["text.normalize"]}), id="name-list"),
    ],
)
def test_malformed_named_request_is_invalid(caller: Caller, body: bytes) -> None:
    """A body on ``<prefix>.named`` that breaks the contract is rejected with 400."""
    assert_invalid(caller.raw("named", body))
    assert_still_serving(caller)


def test_timeout_over_the_cap_is_rejected_not_clamped(caller: Caller) -> None:
    """A timeout over EXECUTOR_MAX_TIMEOUT is invalid_request naming the limit, never clamped."""
    raw = caller.raw("code", as_json({"code": OK_SOURCE, "timeout": SHARED_MAX_TIMEOUT + 1}))
    assert_invalid(raw)
    assert raw.reply.error is not None
    assert str(SHARED_MAX_TIMEOUT) in raw.reply.error.message
    assert_still_serving(caller)


def test_timeout_at_the_cap_is_accepted(caller: Caller) -> None:
    """A timeout equal to EXECUTOR_MAX_TIMEOUT is allowed."""
    reply = caller.code(OK_SOURCE, timeout=float(SHARED_MAX_TIMEOUT))
    assert reply.status == "ok"


def test_async_mode_is_accepted_with_a_job_id(caller: Caller) -> None:
    """``mode: "async"`` is answered at once with status accepted and a job id."""
    raw = caller.raw("code", as_json({"code": OK_SOURCE, "mode": "async"}))
    assert raw.reply.status == "accepted", raw.reply
    assert raw.reply.job_id
    assert raw.reply.error is None
    assert_still_serving(caller)


def test_sync_mode_given_explicitly_is_accepted(caller: Caller) -> None:
    """``mode: "sync"`` spelled out behaves as the default."""
    raw = caller.raw("code", as_json({"code": OK_SOURCE, "mode": "sync"}))
    assert raw.reply.status == "ok"
    assert raw.reply.result == "alive"


def test_ctx_deeper_than_the_limit_is_invalid(caller: Caller) -> None:
    """A ctx nested one level past EXECUTOR_MAX_CTX_DEPTH is rejected with a message saying so."""
    body = as_json({"code": ECHO_SOURCE, "ctx": nesting(DEFAULT_MAX_CTX_DEPTH + 1)})
    raw = caller.raw("code", body)
    assert_invalid(raw)
    assert raw.reply.error is not None
    assert "nested" in raw.reply.error.message
    assert_still_serving(caller)


def test_ctx_at_the_depth_limit_is_accepted(caller: Caller) -> None:
    """A ctx exactly EXECUTOR_MAX_CTX_DEPTH levels deep (ctx itself is level 1) runs."""
    ctx = nesting(DEFAULT_MAX_CTX_DEPTH)
    raw = caller.raw("code", as_json({"code": ECHO_SOURCE, "ctx": ctx}))
    assert raw.reply.status == "ok", raw.reply
    assert raw.reply.result == ctx


def test_extremely_deep_ctx_is_invalid(caller: Caller) -> None:
    """A ctx nested thousands of levels deep (well under the size limit) is invalid_request."""
    levels = 5000
    body = b'{"code": "def execute(ctx): pass", "ctx": ' + b'{"a":' * levels + b"1"
    body += b"}" * levels + b"}"
    assert_invalid(caller.raw("code", body, timeout=5))
    assert_still_serving(caller)


def test_invalid_utf8_is_invalid(caller: Caller) -> None:
    """A body that is not valid UTF-8 is rejected with invalid_request."""
    body = b'{"code": "def execute(ctx):\\n    return \'\xff\xfe\'"}'
    assert_invalid(caller.raw("code", body, timeout=5))
    assert_still_serving(caller)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/cbor"])
def test_unsupported_content_type_is_invalid(caller: Caller, content_type: str) -> None:
    """A Content-Type other than JSON or MessagePack is rejected with 400."""
    body = as_json({"code": OK_SOURCE})
    raw = caller.raw(
        "code", body, headers=signed(caller, "code", body, **{"Content-Type": content_type})
    )
    assert_invalid(raw)
    assert raw.reply.error is not None
    assert content_type in raw.reply.error.message
    assert_still_serving(caller)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_json_content_type_is_accepted(caller: Caller, content_type: str) -> None:
    """An explicit JSON Content-Type (with or without parameters) is served as JSON."""
    body = as_json({"code": OK_SOURCE})
    raw = caller.raw(
        "code", body, headers=signed(caller, "code", body, **{"Content-Type": content_type})
    )
    assert raw.reply.status == "ok"
    assert json.loads(raw.data)["result"] == "alive"


@pytest.fixture(scope="module")
def small_caller(nats_server: NatsServer) -> Iterator[Caller]:
    """A replica whose EXECUTOR_MAX_REQUEST_BYTES is 2048."""
    proc = start_replica(
        nats_server.url, "wirelimit", EXECUTOR_MAX_REQUEST_BYTES=str(SMALL_MAX_REQUEST_BYTES)
    )
    yield Caller(nats_server.url, proc.prefix)
    proc.stop()


def test_body_over_the_size_limit_is_invalid(small_caller: Caller) -> None:
    """A body larger than EXECUTOR_MAX_REQUEST_BYTES is rejected with 400; serving goes on."""
    body = as_json({"code": OK_SOURCE, "ctx": {"pad": "x" * SMALL_MAX_REQUEST_BYTES}})
    assert len(body) > SMALL_MAX_REQUEST_BYTES
    raw = small_caller.raw("code", body)
    assert_invalid(raw)
    assert raw.reply.error is not None
    assert str(SMALL_MAX_REQUEST_BYTES) in raw.reply.error.message
    assert_still_serving(small_caller)


def test_body_at_the_size_limit_is_accepted(small_caller: Caller) -> None:
    """A body of exactly EXECUTOR_MAX_REQUEST_BYTES is served."""
    empty = as_json({"code": OK_SOURCE, "ctx": {"pad": ""}})
    pad = "x" * (SMALL_MAX_REQUEST_BYTES - len(empty))
    body = as_json({"code": OK_SOURCE, "ctx": {"pad": pad}})
    assert len(body) == SMALL_MAX_REQUEST_BYTES
    raw = small_caller.raw("code", body)
    assert raw.reply.status == "ok", raw.reply


def test_script_without_execute_is_invalid(caller: Caller) -> None:
    """Source that defines no ``execute`` is rejected with invalid_request and a 400 header."""
    raw = caller.raw("code", as_json({"code": "def run(ctx):\n    return 1\n"}))
    assert_invalid(raw)
    assert raw.reply.error is not None
    assert "execute" in raw.reply.error.message
    assert_still_serving(caller)


# -- request ids ------------------------------------------------------------------------------


def test_request_id_is_echoed(caller: Caller) -> None:
    """A request_id sent by the caller comes back unchanged in the reply."""
    reply = caller.code(OK_SOURCE, request_id="order-42/attempt-1")
    assert reply.status == "ok"
    assert reply.request_id == "order-42/attempt-1"


def test_request_id_is_a_fresh_uuid_when_absent(caller: Caller) -> None:
    """Without a request_id the reply carries a UUID, a different one for each request."""
    first = caller.raw("code", as_json({"code": OK_SOURCE}))
    second = caller.raw("code", as_json({"code": OK_SOURCE}))
    assert str(uuid.UUID(first.reply.request_id)) == first.reply.request_id
    assert str(uuid.UUID(second.reply.request_id)) == second.reply.request_id
    assert first.reply.request_id != second.reply.request_id


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"code": 123, "request_id": "bad-1"}, id="wrong-type"),
        pytest.param({"code": OK_SOURCE, "unknown": 1, "request_id": "bad-1"}, id="unknown-field"),
        pytest.param({"code": OK_SOURCE, "timeout": 99, "request_id": "bad-1"}, id="over-cap"),
        pytest.param({"code": OK_SOURCE, "mode": "later", "request_id": "bad-1"}, id="bad-mode"),
        pytest.param({"request_id": "bad-1"}, id="missing-code"),
    ],
)
def test_request_id_is_echoed_on_an_invalid_body(caller: Caller, body: dict[str, Any]) -> None:
    """An invalid body that still carries a usable request_id gets it back in the rejection."""
    raw = caller.raw("code", as_json(body))
    assert_invalid(raw)
    assert raw.reply.request_id == "bad-1"


def test_unusable_request_id_is_replaced_by_a_uuid(caller: Caller) -> None:
    """A request_id that is not a usable string is not echoed: the rejection carries a UUID."""
    raw = caller.raw("code", as_json({"code": OK_SOURCE, "request_id": ["x"]}))
    assert_invalid(raw)
    assert str(uuid.UUID(raw.reply.request_id)) == raw.reply.request_id


# -- accepted forms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"code": ECHO_SOURCE}, id="omitted"),
        pytest.param({"code": ECHO_SOURCE, "ctx": None}, id="null"),
        pytest.param({"code": ECHO_SOURCE, "ctx": {}}, id="empty"),
    ],
)
def test_missing_or_null_ctx_means_an_empty_object(caller: Caller, body: dict[str, Any]) -> None:
    """``ctx`` omitted or null reaches the script as ``{}``."""
    raw = caller.raw("code", as_json(body))
    assert raw.reply.status == "ok"
    assert raw.reply.result == {}


def test_integer_timeout_is_accepted(caller: Caller) -> None:
    """A whole-number ``timeout`` (JSON integer) is a valid number of seconds."""
    raw = caller.raw("code", as_json({"code": OK_SOURCE, "timeout": 5}))
    assert raw.reply.status == "ok"
    assert raw.reply.result == "alive"


def test_ctx_values_of_every_json_type_reach_the_script(caller: Caller) -> None:
    """ctx holding null, bool, int, float, str, lists and objects arrives unchanged."""
    ctx = {"n": None, "b": True, "i": -7, "f": 2.5, "s": "żółw", "l": [1, "a", [None]], "o": {}}
    reply = caller.code(ECHO_SOURCE, ctx)
    assert reply.status == "ok"
    assert reply.result == ctx


# -- MessagePack --------------------------------------------------------------------------------


def test_msgpack_request_gets_a_msgpack_reply(caller: Caller) -> None:
    """A request with Content-Type application/msgpack is answered in MessagePack."""
    raw = send_msgpack(caller, "code", {"code": ECHO_SOURCE, "ctx": {"x": [1, 2]}})
    assert raw.headers.get("Content-Type") == MSGPACK
    decoded = msgspec.msgpack.decode(raw.data)
    assert set(decoded) == REPLY_KEYS
    assert decoded["status"] == "ok"
    assert decoded["result"] == {"x": [1, 2]}


def test_msgpack_rejection_is_msgpack_too(caller: Caller) -> None:
    """A rejected MessagePack request gets its rejection in MessagePack, with the 400 header."""
    raw = send_msgpack(caller, "code", {"code": OK_SOURCE, "bogus": 1, "request_id": "mp-1"})
    assert raw.headers.get("Content-Type") == MSGPACK
    assert raw.headers.get("Nats-Service-Error-Code") == "400"
    decoded = msgspec.msgpack.decode(raw.data)
    assert decoded["status"] == "rejected"
    assert decoded["error"]["code"] == "invalid_request"
    assert decoded["request_id"] == "mp-1"


def test_undecodable_msgpack_is_invalid_in_msgpack(caller: Caller) -> None:
    """A body that is not MessagePack, sent as MessagePack, is invalid_request in MessagePack."""
    body = b"\xc1not msgpack"
    raw = caller.raw(
        "code", body, headers=signed(caller, "code", body, **{"Content-Type": MSGPACK})
    )
    assert raw.headers.get("Content-Type") == MSGPACK
    assert_invalid(raw)
    assert msgspec.msgpack.decode(raw.data)["error"]["code"] == "invalid_request"


def test_msgpack_huge_int_result_is_not_serializable(caller: Caller) -> None:
    """An int that MessagePack cannot hold, returned to a MessagePack caller, is an error."""
    raw = send_msgpack(caller, "code", {"code": "def execute(ctx):\n    return 2 ** 100"})
    assert raw.headers.get("Content-Type") == MSGPACK
    decoded = msgspec.msgpack.decode(raw.data)
    assert decoded["status"] == "error"
    assert decoded["result"] is None
    assert decoded["error"]["code"] == "result_not_serializable"
    assert "Nats-Service-Error-Code" not in raw.headers
    assert_still_serving(caller)


# -- reply shape --------------------------------------------------------------------------------


def test_ok_reply_has_exactly_the_contract_keys(caller: Caller) -> None:
    """A sync ok reply has exactly the contract's keys, job_id null and error null."""
    raw = caller.raw("code", as_json({"code": "def execute(ctx):\n    print('hi')\n    return 3"}))
    decoded = json.loads(raw.data)
    assert set(decoded) == REPLY_KEYS
    assert decoded["status"] == "ok"
    assert decoded["job_id"] is None
    assert decoded["error"] is None
    assert decoded["result"] == 3
    assert decoded["stdout"] == "hi\n"
    assert isinstance(decoded["duration_ms"], int | float)
    assert isinstance(decoded["request_id"], str)


def test_error_reply_has_exactly_the_contract_error_keys(caller: Caller) -> None:
    """A failed script's reply has the same keys and an error with code/type/message/traceback."""
    source = "def execute(ctx):\n    raise ValueError('nope')"
    decoded = json.loads(caller.raw("code", as_json({"code": source})).data)
    assert set(decoded) == REPLY_KEYS
    assert decoded["status"] == "error"
    assert decoded["job_id"] is None
    assert decoded["result"] is None
    assert set(decoded["error"]) == ERROR_KEYS
    assert decoded["error"]["code"] == "script_error"
    assert decoded["error"]["type"] == "ValueError"
    assert decoded["error"]["message"] == "nope"
    assert isinstance(decoded["error"]["traceback"], str)


def test_rejected_reply_has_exactly_the_contract_keys(caller: Caller) -> None:
    """A rejection has the same keys, job_id and result null, error.traceback null."""
    decoded = json.loads(caller.raw("code", b"[]").data)
    assert set(decoded) == REPLY_KEYS
    assert decoded["status"] == "rejected"
    assert decoded["job_id"] is None
    assert decoded["result"] is None
    assert set(decoded["error"]) == ERROR_KEYS
    assert decoded["error"]["code"] == "invalid_request"
    assert decoded["error"]["traceback"] is None


# -- replies too large for the connection --------------------------------------------------------


def test_result_larger_than_max_payload_is_output_limit(
    caller: Caller, nats_server: NatsServer
) -> None:
    """A result as big as the connection's max payload becomes an output_limit error."""
    size = connection_max_payload(nats_server.url)
    raw = caller.raw("code", as_json({"code": f"def execute(ctx):\n    return 'x' * {size}"}))
    assert raw.reply.status == "error"
    assert raw.reply.result is None
    assert raw.reply.error is not None
    assert raw.reply.error.code == "output_limit"
    assert len(raw.data) < size
    assert_still_serving(caller)


BIG_RESULT_SOURCE = "def execute(ctx):\n    return 'x' * 2_000_000"


def test_replica_serves_on_after_a_result_far_too_large(caller: Caller) -> None:
    """A 2 MB result gets an error reply (not silence) and the replica keeps serving."""
    raw = caller.raw("code", as_json({"code": BIG_RESULT_SOURCE}))
    assert raw.reply.status == "error"
    assert raw.reply.result is None
    assert_still_serving(caller)


def test_result_far_larger_than_max_payload_is_output_limit(caller: Caller) -> None:
    """A 2 MB result (twice the default max payload) is reported as output_limit."""
    raw = caller.raw("code", as_json({"code": BIG_RESULT_SOURCE}))
    assert raw.reply.status == "error"
    assert raw.reply.error is not None
    assert raw.reply.error.code == "output_limit"
    assert_still_serving(caller)


def test_msgpack_ctx_binary_and_timestamps_arrive_as_json_would(caller: Caller) -> None:
    """The one rule for MessagePack ctx: binary arrives as base64, timestamps as ISO-8601."""
    when = datetime.datetime(2026, 12, 1, 8, 30, tzinfo=datetime.UTC)
    raw = send_msgpack(
        caller,
        "code",
        {"code": ECHO_SOURCE, "ctx": {"blob": b"\x00\xffpy", "at": when, "list": [b"a"]}},
    )
    decoded = msgspec.msgpack.decode(raw.data)
    assert decoded["status"] == "ok", decoded
    assert decoded["result"] == {
        "blob": "AP9weQ==",
        "at": "2026-12-01T08:30:00+00:00",
        "list": ["YQ=="],
    }


@pytest.mark.parametrize(
    "ctx",
    [{"ext": msgspec.msgpack.Ext(7, b"raw")}, {"nested": {1: "int key"}}],
    ids=["extension type", "non-string key"],
)
def test_msgpack_ctx_without_a_json_form_is_invalid(caller: Caller, ctx: dict[str, Any]) -> None:
    """Other extension types and non-string map keys are invalid_request, in MessagePack."""
    raw = send_msgpack(caller, "code", {"code": ECHO_SOURCE, "ctx": ctx})
    decoded = msgspec.msgpack.decode(raw.data)
    assert decoded["status"] == "rejected"
    assert decoded["error"]["code"] == "invalid_request"
