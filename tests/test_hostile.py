"""Hostile input, property-based: any bytes, headers or JSON/MessagePack shape gets a contract
reply, never an exception in the service and never a hang; any change breaks a signature.

Two layers. In-process, many examples: one real ``Handler`` (real ``Verifier``, the shipped
scripts, a real worker ``Pool`` started once) served by an event loop in a thread of its own, fed
by hypothesis. Over NATS, few examples: hand-picked hostile bodies sent to a real replica, which
must answer each and keep serving without a traceback in its log.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import pytest
import structlog
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from nats.aio.msg import Msg as NatsMsg
from pyexec_client.signing import (
    KEY_ID_HEADER,
    MSG_ID,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    SIGNATURE_HEADERS,
    TIMESTAMP_HEADER,
    job_id_for,
    sign,
)

from consumer import config, protocol
from consumer.auth import Verifier
from consumer.catalog import Catalog
from consumer.config import Keyring, Settings
from consumer.errors import InvalidRequest, Unauthorized
from consumer.handler import Handler, Submission
from consumer.jobs.admit import Admission as JobAdmission
from consumer.jobs.admit import Refused
from consumer.metrics import Metrics
from consumer.protocol import Encoding, Reply, header
from consumer.replies import REPLY_OVERHEAD, Replies, Response
from sandbox import Capacity, Pool
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

# -- the contract ------------------------------------------------------------------------------

STATUSES = {"ok", "error", "timeout", "rejected", "accepted"}
REJECTION_HTTP = {"unauthorized": 401, "invalid_request": 400, "unknown_script": 404,
                  "overloaded": 503}  # fmt: skip
ERROR_CODES = {"policy_violation", "syntax_error", "script_error", "memory_limit",
               "output_limit", "result_not_serializable", "worker_lost"}  # fmt: skip
AUTH_FAILURES = {"missing_header", "malformed_header", "unknown_key", "bad_signature",
                 "stale_timestamp", "replayed_nonce"}  # fmt: skip
REPLY_KEYS = {"request_id", "job_id", "status", "result", "error", "stdout", "duration_ms"}
ERROR_KEYS = {"code", "type", "message", "traceback"}
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
MSGPACK = "application/msgpack"
# Well-formed signature headers, as docs/protocol.md states them.
KEY_ID_RULE = re.compile(r"[A-Za-z0-9._-]{1,64}")
TIMESTAMP_RULE = re.compile(r"[0-9]{1,12}")
NONCE_RULE = re.compile(r"(?:[0-9a-f]{2}){16,64}")
SIGNATURE_RULE = re.compile(r"[0-9a-f]{64}")

# -- the in-process service's settings -----------------------------------------------------------

MAX_REQUEST_BYTES = 64 * 1024  # small, so that oversized bodies are cheap to make
MAX_CTX_DEPTH = 32
MAX_PAYLOAD = 1024 * 1024  # the NATS server's default max_payload
HANG_LIMIT = 10.0  # seconds a reply may take before the request counts as hung
PREFIX = "pyexec"
CODE, NAMED = f"{PREFIX}.code", f"{PREFIX}.named"
JOBS_CODE, JOBS_NAMED = f"{PREFIX}.jobs.code", f"{PREFIX}.jobs.named"
# Served by request-reply; the jobs subjects are served only from the jobs stream (run_job).
SERVED = (CODE, NAMED)
KEYS = {KEY_ID: SECRET, OLD_KEY_ID: OLD_SECRET}
ENVIRON = {
    "EXECUTOR_API_KEYS": ",".join(f"{key}:{secret}" for key, secret in KEYS.items()),
    "EXECUTOR_SUBJECT_PREFIX": PREFIX,
    "EXECUTOR_WORKERS": "2",
    "EXECUTOR_DEFAULT_TIMEOUT": "2",
    "EXECUTOR_MAX_TIMEOUT": "5",
    "EXECUTOR_MAX_JOB_TIMEOUT": "5",  # jobs subjects too: nothing may run long
    "EXECUTOR_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
    "EXECUTOR_MAX_CTX_DEPTH": str(MAX_CTX_DEPTH),
    "EXECUTOR_LOG_FORMAT": "json",
    "EXECUTOR_METRICS_PORT": "0",
}

ECHO = "def execute(ctx):\n    return ctx\n"
ONE = "def execute(ctx):\n    return 1\n"
# Scripts a decodable request may carry: each ends quickly, however it ends.
CHEAP_SOURCES = [
    ECHO,
    ONE,
    "def execute(ctx):\n    return len(ctx)\n",
    "def execute(ctx):\n    print(ctx)\n",
    "def execute(ctx):\n    return 1 / 0\n",
    "def execute(ctx):\n    return float('nan')\n",
    "def execute(ctx):\n    return 2 ** 70\n",
    "def execute(ctx):\n    return b'bytes'\n",
    "def execute(ctx):\n    return {1: 2, None: 3}\n",
    "execute = lambda ctx: ctx\n",
    "async def execute(ctx):\n    return 1\n",
    "import os\ndef execute(ctx):\n    return 1\n",
    "raise SystemExit(3)\ndef execute(ctx):\n    return 1\n",
    "def execute(ctx) return",
    "def execute(ctx):\n    return 1\x00",
    "\ufeffdef execute(ctx):\n    return 1\n",
    "x = 1\n",
    "",
]
NAMES = ["text.normalize", "sql.transpile", "nope", "text", "text.", ".text.normalize",
         "../etc/passwd", "text/normalize", "_private", "\x00", "a" * 300]  # fmt: skip
INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xc3",
                b"\xf0\x28\x8c\xbc", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]  # fmt: skip
# Number spellings JSON cannot hold or does not allow.
NON_JSON_NUMBERS = [b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"inf", b"1e999", b"-1e999",
                    b"1E400", b"+1", b"01", b"1.", b".5", b"0x10", b"1_000"]  # fmt: skip
HUGE_INTS = [10**400, -(2**70), 2**63, 2**64, -(2**63) - 1, int("9" * 4000)]


# -- checking a reply ----------------------------------------------------------------------------


def flat(text: str) -> str:
    """A message as the Nats-Service-Error header carries it: one printable line, 512 chars."""
    return "".join(ch if ch.isprintable() else " " for ch in text)[:512]


def assert_contract(data: bytes, headers: Mapping[str, str] | None, encoding: Encoding) -> Reply:
    """``data``/``headers`` are a reply the contract allows, in ``encoding``; returns it."""
    assert isinstance(data, bytes)
    reply = protocol.decode_reply(data, encoding)
    raw = msgspec.msgpack.decode(data) if encoding == protocol.MSGPACK else json.loads(data)
    assert set(raw) == REPLY_KEYS, raw
    assert reply.status in STATUSES
    assert isinstance(reply.request_id, str)
    assert reply.request_id
    assert (header(headers, "Content-Type") == MSGPACK) == (encoding == protocol.MSGPACK)
    code_header = header(headers, ERROR_CODE_HEADER)
    if reply.status == "rejected":
        assert reply.error is not None
        assert set(raw["error"]) == ERROR_KEYS
        assert reply.error.code in REJECTION_HTTP, reply.error
        assert reply.error.message
        assert reply.result is None
        assert code_header == str(REJECTION_HTTP[reply.error.code])
        message_header = header(headers, ERROR_HEADER)
        assert message_header is not None
        assert message_header.strip() == flat(reply.error.message).strip()
    else:
        assert code_header is None
        assert header(headers, ERROR_HEADER) is None
    if reply.status == "ok":
        assert reply.error is None
    elif reply.status == "error":
        assert reply.error is not None
        assert reply.error.code in ERROR_CODES, reply.error
        assert reply.error.type != "InternalError", reply.error  # a defect of the executor
    elif reply.status == "timeout":
        assert reply.error is not None
        assert reply.error.code == "timeout"
    elif reply.status == "accepted":
        assert reply.job_id
    assert len(data) + REPLY_OVERHEAD <= MAX_PAYLOAD
    for secret in KEYS.values():
        assert secret.encode() not in data
        assert all(secret not in value for value in (headers or {}).values())
    return reply


def is_uuid4(text: str) -> bool:
    try:
        return uuid.UUID(text).version == 4
    except ValueError:
        return False


# -- the in-process service ----------------------------------------------------------------------


class Service:
    """A real Handler over a real Pool, served by an event loop in a thread of its own."""

    def __init__(self, settings: Settings, logs: list[MutableMapping[str, Any]]) -> None:
        self.settings = settings
        self.logs = logs
        self.submitted: list[str] = []
        self.handler: Handler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="hostile-service", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(timeout=60):
            raise RuntimeError("the in-process service did not start within 60 s")
        if self._error is not None:
            raise RuntimeError("the in-process service failed to start") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the in-process service did not stop"

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - start() raises it in the test's thread
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        settings = self.settings
        result_limit = MAX_PAYLOAD - REPLY_OVERHEAD - 4 * settings.pool.stdout_limit
        capacity = Capacity(
            settings.pool.workers, queue_limit=settings.queue_limit, max_wait=settings.queue_wait
        )
        async with Pool(
            msgspec.structs.replace(settings.pool, result_limit=result_limit), capacity=capacity
        ) as pool:
            verifier = Verifier(settings.keys, capacity=settings.nonce_cache_size)
            metrics = Metrics(version="test", longest_timeout=settings.max_job_timeout)
            handler = Handler(
                settings,
                verifier=verifier,
                # The fleet-wide replay store needs JetStream; in-process, the replica's own
                # cache is the replay check (the shared store is tested in test_trust.py).
                nonces=_NoFleet(),
                catalog=Catalog(settings.scripts_dir),
                pool=pool,
                replies=Replies(MAX_PAYLOAD),
                metrics=metrics,
                capacity=capacity,
                submit=self._submit,  # so that mode "async" can be accepted
            )
            self.jobs = JobAdmission(settings, verifier, metrics)
            self.handler = handler
            self._ready.set()
            await self._stop.wait()

    async def _submit(self, submission: Submission) -> str:
        job_id = job_id_for(submission.caller.secret, submission.request_id)
        self.submitted.append(job_id)
        return job_id

    def call(self, coroutine: Callable[[], Coroutine[Any, Any, Response]]) -> Response:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(coroutine(), HANG_LIMIT), self._loop
        )
        try:
            return future.result(timeout=HANG_LIMIT + 5)
        except TimeoutError:
            future.cancel()
            pytest.fail(f"no reply within {HANG_LIMIT:g} s: the request hung")

    def handle(self, subject: str, headers: Mapping[str, str] | None, body: bytes) -> Reply:
        """Send one request; check that the reply follows the contract and nothing failed
        inside the executor; return the reply."""
        handler = self.handler
        assert handler is not None
        return self._checked(headers, lambda: handler.handle(subject, headers, body))

    def run_job(self, subject: str, headers: dict[str, str], body: bytes) -> Reply | str:
        """Admit a job message as the job worker would (a real ``Msg`` with JetStream delivery
        metadata, stored now) and run it: its completion, or the reason it was refused."""
        handler = self.handler
        assert handler is not None
        stored_ns = time.time_ns()
        ack = f"$JS.ACK.PYEXEC_JOBS.pyexec-workers.1.7.7.{stored_ns}.0"
        msg = NatsMsg(_client=None, subject=subject, reply=ack, data=body, headers=headers)  # type: ignore[arg-type]
        try:
            job = self.jobs.admit(msg)
        except Refused as refused:
            return refused.reason
        return self._checked(headers, lambda: handler.run_job(job))

    def _checked(
        self,
        headers: Mapping[str, str] | None,
        answer: Callable[[], Coroutine[Any, Any, Response]],
    ) -> Reply:
        seen = len(self.logs)
        response = self.call(answer)
        encoding = protocol.reply_encoding(header(headers, "Content-Type"))
        reply = assert_contract(response.data, response.headers, encoding)
        assert reply.status == response.reply.status
        assert reply.request_id == response.reply.request_id
        assert reply.error == response.reply.error
        if currently_in_test_context():  # for --hypothesis-show-statistics
            event(f"{reply.status} {reply.error.code if reply.error else ''}".strip())
        new = self.logs[seen:]
        failures = [e for e in new if e.get("log_level") in ("error", "critical")]
        assert not failures, failures
        assert all(secret not in repr(new) for secret in KEYS.values())
        return reply


class _NoFleet:
    """No fleet-wide replay store (in-process, without JetStream)."""

    async def claim(self, key_id: str, nonce: str) -> None:
        return None


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    """One in-process handler with a real pool for the whole module."""
    with structlog.testing.capture_logs() as logs:
        running = Service(config.load(ENVIRON), logs)
        running.start()
        try:
            yield running
        finally:
            running.stop()


def signed(
    subject: str, body: bytes, *, content_type: str | None = None, key_id: str = KEY_ID
) -> dict[str, str]:
    """Fresh signature headers (current time, new nonce), plus a Content-Type if given."""
    headers = sign(key_id, KEYS[key_id].encode(), subject, body)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


def acceptable(content_type: str | None) -> bool:
    """Whether the Content-Type names an encoding the executor reads."""
    try:
        protocol.encoding_of(content_type)
    except InvalidRequest:
        return False
    return True


def assert_rejected(reply: Reply, code: str, *words: str) -> None:
    assert reply.status == "rejected", reply
    assert reply.error is not None
    assert reply.error.code == code, reply.error
    for word in words:
        assert word in reply.error.message, reply.error


# -- strategies ----------------------------------------------------------------------------------

BASE = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


def any_case(name: str) -> st.SearchStrategy[str]:
    """``name`` with each letter upper or lower case."""
    flips = st.lists(st.booleans(), min_size=len(name), max_size=len(name))
    return flips.map(
        lambda up: "".join(c.upper() if u else c.lower() for c, u in zip(name, up, strict=True))
    )


KNOWN_HEADERS = [*SIGNATURE_HEADERS, "Content-Type", "traceparent", "tracestate", "Nats-Msg-Id",
                 ERROR_HEADER, ERROR_CODE_HEADER]  # fmt: skip
CONTENT_TYPES = ["application/json", "application/msgpack", "APPLICATION/MsgPack; charset=x",
                 " application/json ;q=1", "", "text/plain", "application/cbor", "msgpack",
                 "application/json, application/msgpack", ";", "application/x-msgpack"]  # fmt: skip
header_names = st.one_of(
    st.sampled_from(KNOWN_HEADERS).flatmap(any_case), st.text(min_size=1, max_size=30)
)
header_values = st.one_of(
    st.text(max_size=120),
    st.sampled_from(CONTENT_TYPES),
    st.sampled_from([KEY_ID, OLD_KEY_ID, "nobody", "bad id!", " ", "0", "9" * 12, "9" * 13, "-1",
                     "1e9", str(int(time.time())), "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                     "ff-" + "a" * 32 + "-" + "b" * 16 + "-01", "A" * 64, "x" * 5000]),
    st.binary(max_size=80).map(bytes.hex),
    st.integers(min_value=0, max_value=10**13).map(str),
)  # fmt: skip


def unique_names(headers: dict[str, str]) -> dict[str, str]:
    """The headers with at most one per name, names compared without regard to case."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        if header(out, name) is None:
            out[name] = value
    return out


junk_headers = st.dictionaries(header_names, header_values, max_size=8).map(unique_names)
subjects = st.one_of(
    st.sampled_from(SERVED),
    st.sampled_from(["", PREFIX, f"{CODE}.x", CODE.upper(), f"{PREFIX}.results.x", "other.code"]),
    st.text(max_size=40),
)


@st.composite
def oversized(draw: st.DrawFn) -> bytes:
    """A body around or over EXECUTOR_MAX_REQUEST_BYTES, built without drawing every byte."""
    head = draw(st.sampled_from([b"", b'{"code": "', b"\x81\xa4code\xda\xff\xff", b"["]))
    size = draw(st.integers(MAX_REQUEST_BYTES - 16, 4 * MAX_REQUEST_BYTES))
    fill = draw(st.sampled_from([b"x", b"\xff", b"{", b"[", b" ", b"\x00"]))
    return head + fill * (size - len(head))


json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(HUGE_INTS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["", "x" * 200, "x" * 201, "\x00", "\u2028", "\ud7ff\ue000", "💥" * 60]),
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=12), children, max_size=5),
    ),
    max_leaves=25,
)
long_texts = st.integers(0, 2 * MAX_REQUEST_BYTES).map(lambda n: "x" * n)
request_ids = st.one_of(
    st.text(min_size=1, max_size=200),
    st.text(min_size=201, max_size=260),
    st.just(""),
    long_texts,
    json_values,
)
timeouts = st.one_of(
    st.none(),
    st.floats(min_value=1e-3, max_value=5.0),
    st.integers(1, 5),
    st.sampled_from([5e-324, 1e-300, 0, -1, 5.000001, 61, 1e308, 2**64, 10**400, True, "5"]),
    json_values,
)
modes = st.one_of(st.none(), st.sampled_from(["sync", "async", "later", "", "SYNC"]), json_values)
ctxs = st.one_of(
    st.none(),
    st.dictionaries(st.text(max_size=12), json_values, max_size=6),
    st.fixed_dictionaries({"text": st.text(max_size=80)}),
    long_texts.map(lambda text: {"pad": text}),
    json_values,
)


def request_like(code_or_name: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects shaped like requests: every field optional, of any type, plus unknown ones."""
    fields = st.fixed_dictionaries(
        {},
        optional={
            "code": code_or_name,
            "name": st.one_of(st.sampled_from(NAMES), st.text(max_size=30), json_values),
            "ctx": ctxs,
            "timeout": timeouts,
            "mode": modes,
            "request_id": request_ids,
        },
    )
    extra = st.dictionaries(st.text(max_size=10), json_values, max_size=2)
    return st.builds(lambda known, more: {**more, **known}, fields, extra)


sources = st.one_of(st.sampled_from(CHEAP_SOURCES), st.text(max_size=80), long_texts, json_values)
requests_json = request_like(sources)


def as_json(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False).encode()


def echoed_id(value: Any, body: bytes) -> str | None:
    """The request id the reply must echo: a string of 1-200 characters under ``request_id``
    of an object body within EXECUTOR_MAX_REQUEST_BYTES."""
    if not isinstance(value, dict) or len(body) > MAX_REQUEST_BYTES:
        return None
    if not all(isinstance(key, str) for key in value):
        return None
    candidate = value.get("request_id")
    if isinstance(candidate, str) and 0 < len(candidate) <= 200:
        return candidate
    return None


msgpack_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=30),
    st.binary(max_size=30),
    # (Type -1 is MessagePack's timestamp, drawn as a datetime below.)
    st.builds(
        msgspec.msgpack.Ext,
        st.integers(-128, 127).filter(lambda c: c != -1),
        st.binary(max_size=12),
    ),
    st.datetimes(timezones=st.just(datetime.UTC)),
)
msgpack_keys = st.one_of(
    st.text(max_size=10),
    st.integers(-(2**63), 2**64 - 1),
    st.booleans(),
    st.none(),
    st.binary(max_size=6),
)
msgpack_values = st.recursive(
    msgpack_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(msgpack_keys, children, max_size=5),
    ),
    max_leaves=20,
)
msgpack_requests = st.fixed_dictionaries(
    {},
    optional={
        "code": st.one_of(st.sampled_from(CHEAP_SOURCES), msgpack_values),
        "name": st.one_of(st.sampled_from(NAMES), msgpack_values),
        "ctx": st.one_of(st.dictionaries(st.text(max_size=8), msgpack_values), msgpack_values),
        "timeout": st.one_of(st.floats(), st.integers(-(2**63), 2**64 - 1), msgpack_values),
        "mode": st.one_of(st.sampled_from(["sync", "async", "later"]), msgpack_values),
        "request_id": st.one_of(st.text(max_size=210), msgpack_values),
    },
)
msgpack_content_types = st.sampled_from(
    [MSGPACK, "Application/MsgPack", "application/msgpack; charset=binary", " application/msgpack"]
)


def for_msgpack(value: Any) -> Any:
    """``value`` with the integers MessagePack cannot hold (beyond 64 bits) as strings."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, list):
        return [for_msgpack(item) for item in value]
    if isinstance(value, dict):
        return {key: for_msgpack(item) for key, item in value.items()}
    return value


def json_view(value: Any) -> Any:
    """``value`` after the executor's conversions: binary becomes base64 and a timestamp an
    ISO-8601 string on the way in, a non-finite float null on the way out."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, list):
        return [json_view(item) for item in value]
    if isinstance(value, dict):
        return {key: json_view(item) for key, item in value.items()}
    return value


def depth(value: Any) -> int:
    """Levels of nested maps and arrays in ``value`` (a scalar is 0)."""
    if isinstance(value, list):
        return 1 + max((depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(item) for item in value.values()), default=0)
    return 0


def json_only(value: Any) -> bool:
    """Whether ``value`` has a JSON form by the MessagePack ctx rule: string-keyed maps,
    arrays, scalars, binary and timestamps (no other extension type)."""
    if isinstance(value, list):
        return all(json_only(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and json_only(v) for k, v in value.items())
    return value is None or isinstance(value, bool | int | float | str | bytes | datetime.datetime)


# -- in-process: any bytes, any headers ----------------------------------------------------------


@settings(BASE, max_examples=300)
@given(
    subject=subjects,
    junk=junk_headers,
    body=st.one_of(st.binary(max_size=2048), oversized(), st.just(b"")),
    signature=st.booleans(),
)
def test_any_bytes_and_headers_get_a_contract_reply(
    service: Service, subject: str, junk: dict[str, str], body: bytes, signature: bool
) -> None:
    """Any body and header set gets a contract reply; unsigned is 401, signed never is."""
    headers = {**junk, **signed(subject, body)} if signature else junk
    reply = service.handle(subject, headers, body)
    content_type = header(headers, "Content-Type")
    if not signature:
        assert_rejected(reply, "unauthorized")
        return
    assert reply.error is None or reply.error.code != "unauthorized", reply.error
    if not acceptable(content_type):
        assert_rejected(reply, "invalid_request", "Content-Type")
    elif subject not in SERVED:
        assert_rejected(reply, "invalid_request", "not served")
    elif len(body) > MAX_REQUEST_BYTES:
        assert_rejected(reply, "invalid_request", str(MAX_REQUEST_BYTES))
        assert is_uuid4(reply.request_id)


@settings(BASE, max_examples=150)
@given(
    subject=st.sampled_from(SERVED),
    value=st.one_of(requests_json, json_values),
    junk=st.sampled_from(INVALID_UTF8),
    data=st.data(),
)
def test_invalid_utf8_anywhere_is_invalid_request(
    service: Service, subject: str, value: Any, junk: bytes, data: st.DataObject
) -> None:
    """A signed JSON body with invalid UTF-8 spliced in anywhere is rejected as invalid."""
    text = as_json(value)  # ASCII: json.dumps escapes everything else
    at = data.draw(st.integers(0, len(text)), label="at")
    body = text[:at] + junk + text[at:]
    assert_rejected(service.handle(subject, signed(subject, body), body), "invalid_request")


# -- in-process: JSON of any shape, correctly signed ---------------------------------------------


@settings(BASE, max_examples=300)
@given(subject=st.sampled_from(SERVED), value=st.one_of(json_values, requests_json))
def test_any_json_shape_gets_a_contract_reply(service: Service, subject: str, value: Any) -> None:
    """Any JSON value, signed, gets a contract reply that echoes a usable request_id."""
    body = as_json(value)
    reply = service.handle(subject, signed(subject, body), body)
    assert reply.error is None or reply.error.code != "unauthorized", reply.error
    expected = echoed_id(value, body)
    if expected is not None:
        assert reply.request_id == expected
    if len(body) > MAX_REQUEST_BYTES:
        assert_rejected(reply, "invalid_request", str(MAX_REQUEST_BYTES))


shallow_ctxs = st.dictionaries(st.text(max_size=12), json_values, max_size=5)
valid_code_requests = st.fixed_dictionaries(
    {
        "code": st.sampled_from(CHEAP_SOURCES),
        "mode": st.sampled_from(["(absent)", None, "sync", "async"]),
    },
    optional={
        "ctx": st.one_of(st.none(), shallow_ctxs),
        "timeout": st.one_of(st.none(), st.integers(1, 5), st.floats(1e-6, 5.0)),
        "request_id": st.one_of(st.none(), st.text(min_size=1, max_size=200)),
    },
).map(lambda request: {k: v for k, v in request.items() if v != "(absent)"})
valid_named_requests = st.fixed_dictionaries(
    {"name": st.sampled_from(["text.normalize", "sql.transpile"])},
    optional={
        "ctx": st.one_of(
            shallow_ctxs,
            st.fixed_dictionaries(
                {"text": st.text(max_size=60)},
                optional={"case": st.sampled_from(["keep", "lower", "upper", "casefold", "x"])},
            ),
        ),
        "timeout": st.one_of(st.none(), st.floats(0.5, 5.0)),
        "request_id": st.one_of(st.none(), st.text(min_size=1, max_size=200)),
    },
)


@settings(BASE, max_examples=80)
@given(
    case=st.one_of(
        st.tuples(st.just(CODE), valid_code_requests),
        st.tuples(st.just(NAMED), valid_named_requests),
    ),
    content_type=st.sampled_from([None, "application/json", MSGPACK]),
)
def test_contract_valid_requests_are_run_not_refused(
    service: Service, case: tuple[str, dict[str, Any]], content_type: str | None
) -> None:
    """A request within the contract runs (async: is accepted), echoing its id; never refused."""
    # Refusals that remain possible: a script without execute, a timeout too short for a
    # worker, and (named) a ctx the script's declared input does not accept.
    subject, value = case
    msgpack = content_type == MSGPACK
    body = msgspec.msgpack.encode(for_msgpack(value)) if msgpack else as_json(value)
    reply = service.handle(subject, signed(subject, body, content_type=content_type), body)
    if reply.status == "rejected":
        assert reply.error is not None
        allowed = {("invalid_request", "MissingEntryPoint"), ("overloaded", "Overloaded")}
        if subject == NAMED and reply.error.message.startswith("invalid ctx for "):
            allowed.add(("invalid_request", "InvalidRequest"))
        assert (reply.error.code, reply.error.type) in allowed, reply.error
        if reply.error.code == "overloaded":
            assert float(value.get("timeout") or 2) < 1, reply.error
    if value.get("mode") == "async" and reply.status != "rejected":
        assert reply.status == "accepted"
        assert reply.job_id in service.submitted
    if value.get("request_id") is not None:
        assert reply.request_id == value["request_id"]


@settings(BASE, max_examples=150)
@given(
    template=st.sampled_from([
        b"@", b"[@]", b'{"code": @}', b'{"code": "#", "ctx": {"n": @}}',
        b'{"code": "#", "ctx": {"a": [1, {"b": @}]}}', b'{"code": "#", "timeout": @}',
        b'{"code": "#", "request_id": @}', b'{"code": "#", "mode": @}',
        b'{"name": "text.normalize", "ctx": {"text": @}}', b'{"code": "#", "extra": @}',
    ]),
    token=st.sampled_from(NON_JSON_NUMBERS),
    subject=st.sampled_from([CODE, NAMED]),
)  # fmt: skip
def test_numbers_json_cannot_hold_are_invalid_request(
    service: Service, template: bytes, token: bytes, subject: str
) -> None:
    """NaN, Infinity, 1e999 and other non-JSON number spellings anywhere are invalid_request."""
    body = template.replace(b"#", ECHO.replace("\n", "\\n").encode()).replace(b"@", token)
    assert_rejected(service.handle(subject, signed(subject, body), body), "invalid_request")


@settings(BASE, max_examples=25)
@given(
    ints=st.lists(
        st.one_of(
            st.sampled_from(HUGE_INTS),
            st.integers(64, 14_000).flatmap(lambda bits: st.integers(-(2**bits), 2**bits)),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_huge_integers_in_ctx_are_kept_exactly(service: Service, ints: list[int]) -> None:
    """Integers of any size (up to 4300 digits) in a JSON ctx reach the script unchanged."""
    ctx = {f"n{i}": n for i, n in enumerate(ints)}
    body = as_json({"code": ECHO, "ctx": ctx})
    reply = service.handle(CODE, signed(CODE, body), body)
    assert reply.status == "ok", reply
    assert reply.result == ctx


@settings(BASE, max_examples=40)
@given(
    where=st.sampled_from(["timeout", "request_id", "code", "mode"]),
    number=st.sampled_from(HUGE_INTS),
)
def test_huge_integers_in_typed_fields_are_invalid_request(
    service: Service, where: str, number: int
) -> None:
    """A huge integer where a timeout, a string or a mode belongs is invalid_request."""
    body = as_json({"code": ONE, where: number})
    assert_rejected(service.handle(CODE, signed(CODE, body), body), "invalid_request")


@st.composite
def nested_ctx(draw: st.DrawFn) -> tuple[bytes, int]:
    """A request whose ctx is nested some levels deep (objects and arrays mixed); the body and
    the number of levels, ctx itself being level 1."""
    depth = draw(st.one_of(st.integers(1, MAX_CTX_DEPTH + 8), st.integers(1, 3000)))
    shape = draw(st.lists(st.sampled_from("ol"), min_size=1, max_size=4))
    opens, closes = [b'{"k":'], [b"}"]
    for level in range(1, depth):
        if shape[level % len(shape)] == "o":
            opens.append(b'{"k":')
            closes.append(b"}")
        else:
            opens.append(b"[")
            closes.append(b"]")
    leaf = draw(st.sampled_from([b"1", b'"x"', b"null", b"true", b"-2.5e3", b"[]", b"{}"]))
    levels = depth + (leaf in (b"[]", b"{}"))
    ctx = b"".join(opens) + leaf + b"".join(reversed(closes))
    return b'{"request_id": "deep", "code": "' + ONE.replace("\n", "\\n").encode() + (
        b'", "ctx": ' + ctx + b"}"
    ), levels


@settings(BASE, max_examples=60)
@given(case=nested_ctx(), subject=st.sampled_from([CODE, JOBS_CODE]))
def test_ctx_depth_limit_holds_for_any_nesting(
    service: Service, case: tuple[bytes, int], subject: str
) -> None:
    """A ctx up to EXECUTOR_MAX_CTX_DEPTH levels runs; any deeper is invalid_request."""
    body, levels = case
    headers = signed(subject, body)
    if subject == CODE:
        reply = service.handle(subject, headers, body)
    else:
        headers[MSG_ID] = job_id_for(SECRET.encode(), "deep")
        answer = service.run_job(subject, headers, body)
        if isinstance(answer, str):
            # Deeper than Python's recursion limit, a body whose id comes after ctx cannot be
            # read for it: the job is refused unanswered.
            assert answer == "no_request_id"
            assert levels > 500
            return
        reply = answer
    if levels <= MAX_CTX_DEPTH:
        assert reply.status == "ok", reply
        assert reply.result == 1
    else:
        assert_rejected(reply, "invalid_request", "nested")
    if levels <= 500:  # deeper, the body cannot be read for its id (Python's recursion limit)
        assert reply.request_id == "deep"


# -- in-process: MessagePack ---------------------------------------------------------------------


@settings(BASE, max_examples=200)
@given(
    subject=st.sampled_from(SERVED),
    value=st.one_of(msgpack_values, msgpack_requests),
    content_type=msgpack_content_types,
)
def test_any_msgpack_shape_gets_a_msgpack_contract_reply(
    service: Service, subject: str, value: Any, content_type: str
) -> None:
    """Any MessagePack structure, signed, gets a contract reply in MessagePack."""
    body = msgspec.msgpack.encode(value)
    reply = service.handle(subject, signed(subject, body, content_type=content_type), body)
    assert reply.error is None or reply.error.code != "unauthorized", reply.error
    expected = echoed_id(value, body)
    if expected is not None:
        assert reply.request_id == expected


@settings(BASE, max_examples=60)
@given(ctx=st.dictionaries(st.text(max_size=8), msgpack_values, max_size=4))
def test_msgpack_ctx_is_run_if_and_only_if_json_can_hold_it(
    service: Service, ctx: dict[str, Any]
) -> None:
    """A MessagePack ctx runs iff it has a JSON form (no extension type but timestamps, no
    non-string keys), and the script sees binary as base64 and timestamps as ISO strings."""
    body = msgspec.msgpack.encode({"code": ECHO, "ctx": ctx})
    reply = service.handle(CODE, signed(CODE, body, content_type=MSGPACK), body)
    if json_only(ctx) and depth(ctx) <= MAX_CTX_DEPTH:
        assert reply.status == "ok", reply
        assert reply.result == json_view(ctx)
    else:
        assert_rejected(reply, "invalid_request")


@settings(BASE, max_examples=60)
@given(
    subject=st.sampled_from([CODE, NAMED]),
    head=st.sampled_from([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9", b"\xc7", b"\xda"]),
    length=st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\xff\xff"]),
    prefix=st.sampled_from([b"", b"\x81\xa4code", b"\x82\xa4code\xa1x\xa3ctx\x81\xa1a"]),
)
def test_msgpack_length_bombs_are_refused_at_once(
    service: Service, subject: str, head: bytes, length: bytes, prefix: bytes
) -> None:
    """MessagePack headers claiming gigabytes of data are invalid_request, nothing allocated."""
    body = prefix + head + length + b"\x00"
    reply = service.handle(subject, signed(subject, body, content_type=MSGPACK), body)
    assert_rejected(reply, "invalid_request")


# -- in-process: jobs taken from the stream ------------------------------------------------------


@settings(BASE, max_examples=40)
@given(
    subject=st.sampled_from([JOBS_CODE, JOBS_NAMED]),
    value=st.one_of(requests_json, json_values),
)
def test_any_job_body_gets_a_completion_carrying_its_job_id(
    service: Service, subject: str, value: Any
) -> None:
    """A signed job of any shape whose Nats-Msg-Id is its job id completes by the contract,
    with that job id; one without a request_id is refused (acknowledged, never answered)."""
    body = as_json(value)
    request_id = protocol.request_id_of(body, protocol.JSON)
    headers = signed(subject, body)
    if request_id is not None:
        headers[MSG_ID] = job_id_for(SECRET.encode(), request_id)
    reply = service.run_job(subject, headers, body)
    if request_id is None:
        assert reply == "no_request_id"
        return
    assert isinstance(reply, Reply)
    assert reply.job_id == headers[MSG_ID]
    assert reply.status != "accepted"  # a job runs; it is never submitted again


# -- the signature check, property by property ---------------------------------------------------

NOW = 1_767_225_600
IN_WINDOW = st.integers(NOW - 60, NOW + 60)


class FakeClock:
    def __init__(self) -> None:
        self.wall = float(NOW)
        self.mono = 1000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


def make_verifier() -> Verifier:
    clock = FakeClock()
    return Verifier(Keyring(KEYS), capacity=10_000, clock=clock.time, monotonic=clock.monotonic)


@dataclass(frozen=True)
class Message:
    subject: str
    body: bytes
    key_id: str
    timestamp: str
    nonce: str
    signature: str
    names: tuple[str, str, str, str]  # the four header names as sent (any case)

    @property
    def headers(self) -> dict[str, str]:
        values = (self.key_id, self.timestamp, self.nonce, self.signature)
        return dict(zip(self.names, values, strict=True))


@st.composite
def messages(draw: st.DrawFn, timestamps: st.SearchStrategy[int] = IN_WINDOW) -> Message:
    """A correctly signed message: any subject and body, a timestamp, a 16-64 byte nonce."""
    subject = draw(st.text(min_size=1, max_size=60), label="subject")
    body = draw(st.binary(max_size=256), label="body")
    key_id = draw(st.sampled_from(sorted(KEYS)), label="key_id")
    stamp = str(draw(timestamps, label="timestamp"))
    nonce = draw(st.binary(min_size=16, max_size=64), label="nonce").hex()
    sent = sign(key_id, KEYS[key_id].encode(), subject, body, timestamp=int(stamp), nonce=nonce)
    names = tuple(draw(any_case(name)) for name in SIGNATURE_HEADERS)
    assert len(names) == 4
    return Message(subject, body, key_id, stamp, nonce, sent[SIGNATURE_HEADER], names)


def refusal(verifier: Verifier, message: Message) -> str:
    """The reason ``verifier`` refuses ``message``; fails if it accepts it."""
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(message.subject, message.headers, message.body)
    return caught.value.reason


def header_reason(message: Message) -> str:
    """Why a message with changed headers is refused, by the documented order of checks."""
    values = (message.key_id, message.timestamp, message.nonce, message.signature)
    if not all(values):
        return "missing_header"
    for value, rule in (
        (message.key_id, KEY_ID_RULE),
        (message.timestamp, TIMESTAMP_RULE),
        (message.nonce, NONCE_RULE),
        (message.signature, SIGNATURE_RULE),
    ):
        if not rule.fullmatch(value):
            return "malformed_header"
    if message.key_id not in KEYS:
        return "unknown_key"
    return "bad_signature"


def changed(draw: st.DrawFn, text: str, alphabet: st.SearchStrategy[str]) -> str:
    """``text`` with one character replaced, inserted or deleted."""
    ops = ["replace", "insert", "delete"] if text else ["insert"]
    op = draw(st.sampled_from(ops), label="op")
    at = draw(st.integers(0, len(text) - (op != "insert")), label="at")
    if op == "delete":
        return text[:at] + text[at + 1 :]
    char = draw(alphabet.filter(lambda c: op == "insert" or c != text[at]), label="char")
    return text[:at] + char + text[at + (op == "replace") :]


@st.composite
def tampered(draw: st.DrawFn, message: Message) -> tuple[Message, str]:
    """``message`` with one byte of its body, subject, key id, timestamp, nonce or signature
    changed, and the reason the change must be refused for."""
    part = draw(st.sampled_from(["body", "subject", "key_id", "timestamp", "nonce", "signature"]))
    chars = st.one_of(st.sampled_from("0123456789abcdefABCDEF"), st.characters())
    if part == "body":
        body = bytes(message.body)
        ops = ["replace", "insert", "delete"] if body else ["insert"]
        op = draw(st.sampled_from(ops), label="op")
        at = draw(st.integers(0, len(body) - (op != "insert")), label="at")
        if op == "delete":
            new = body[:at] + body[at + 1 :]
        else:
            byte = draw(st.integers(0, 255).filter(lambda b: op == "insert" or b != body[at]))
            new = body[:at] + bytes([byte]) + body[at + (op == "replace") :]
        return replace(message, body=new), "bad_signature"
    if part == "subject":
        return replace(message, subject=changed(draw, message.subject, chars)), "bad_signature"
    if part == "key_id":
        other = draw(st.sampled_from([k for k in KEYS if k != message.key_id] + [""]))
        forged = replace(message, key_id=other or changed(draw, message.key_id, chars))
    elif part == "timestamp":
        forged = replace(message, timestamp=changed(draw, message.timestamp, chars))
    elif part == "nonce":
        forged = replace(message, nonce=changed(draw, message.nonce, chars))
    else:
        forged = replace(message, signature=changed(draw, message.signature, chars))
    return forged, header_reason(forged)


@settings(BASE, max_examples=400)
@given(message=messages(), data=st.data())
def test_any_single_change_breaks_a_signature_and_spends_no_nonce(
    message: Message, data: st.DataObject
) -> None:
    """One changed byte anywhere is refused for its documented reason; replays are refused."""
    # Also: header names match in any case, and a refused message does not spend its nonce.
    verifier = make_verifier()
    forged, reason = data.draw(tampered(message), label="forged")
    assert refusal(verifier, forged) == reason
    assert verifier.verify(message.subject, message.headers, message.body) == message.key_id
    assert refusal(verifier, message) == "replayed_nonce"
    # The signature is checked before the nonce: the forgery is still refused for its reason.
    assert refusal(verifier, forged) == reason


@settings(BASE, max_examples=200)
@given(
    message=messages(
        st.integers(0, 10**12 - 1).filter(lambda stamp: abs(stamp - NOW) > 60),
    )
)
def test_any_timestamp_outside_the_window_is_stale_and_spends_no_nonce(message: Message) -> None:
    """A timestamp more than 60 s off is stale, and does not spend the message's nonce."""
    verifier = make_verifier()
    assert refusal(verifier, message) == "stale_timestamp"
    secret = KEYS[message.key_id].encode()
    fresh = sign(message.key_id, secret, message.subject, message.body, timestamp=NOW,
                 nonce=message.nonce)  # fmt: skip
    assert verifier.verify(message.subject, fresh, message.body) == message.key_id


@settings(BASE, max_examples=300)
@given(subject=st.text(max_size=40), headers=junk_headers, body=st.binary(max_size=128))
def test_verifier_refuses_any_junk_headers_with_a_known_reason(
    subject: str, headers: dict[str, str], body: bytes
) -> None:
    """Whatever headers arrive, the verifier raises Unauthorized with a documented reason."""
    with pytest.raises(Unauthorized) as caught:
        make_verifier().verify(subject, headers, body)
    assert caught.value.reason in AUTH_FAILURES
    assert caught.value.reason != "replayed_nonce"
    assert all(secret not in str(caught.value) for secret in KEYS.values())


# -- over NATS: a real replica -------------------------------------------------------------------

OK_SOURCE = "def execute(ctx):\n    return 'alive'"
_bytes = random.Random(20260101)  # noqa: S311 - reproducible junk, not a secret
RANDOM_BYTES = _bytes.randbytes(8192)
# Both just under EXECUTOR_MAX_REQUEST_BYTES, so that the depth check is what refuses them.
DEEP_OBJECTS = b'{"code": "x", "ctx": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}"
DEEP_ARRAYS = b'{"code": "x", "ctx": {"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}"
HUGE_NUMBERS_CTX = {"big": 10**400, "neg": -(2**70), "edge": 2**64, "long": int("9" * 4000)}


@dataclass(frozen=True)
class Hostile:
    """A hostile request: body, how it is signed, and the rejection code it must get."""

    body: bytes
    kind: str = "code"
    signed: bool = True
    content_type: str | None = None
    extra: tuple[tuple[str, str], ...] = ()
    code: str | None = "invalid_request"  # None: the request runs
    words: tuple[str, ...] = ()  # in the error message


HOSTILE = {
    "oversized-json": Hostile(
        as_json({"code": OK_SOURCE, "ctx": {"pad": "x" * 300_000}}), words=(str(MAX_REQUEST_BYTES),)
    ),
    "oversized-unsigned": Hostile(b"x" * 300_000, signed=False, code="unauthorized"),
    "oversized-msgpack": Hostile(
        msgspec.msgpack.encode({"code": OK_SOURCE, "ctx": {"pad": b"\x00" * 200_000}}),
        content_type=MSGPACK,
        words=(str(MAX_REQUEST_BYTES),),
    ),
    "invalid-utf8-in-code": Hostile(b'{"code": "def execute(ctx): return \'\xed\xa0\x80\'"}'),
    "invalid-utf8-in-key": Hostile(b'{"co\xffde": "x"}', kind="named"),
    "invalid-utf8-in-ctx": Hostile(b'{"code": "x", "ctx": {"a": ["\xc3\x28"]}}'),
    "deep-objects": Hostile(DEEP_OBJECTS, words=("nested",)),
    "deep-arrays": Hostile(DEEP_ARRAYS, words=("nested",)),
    "huge-ints-in-ctx": Hostile(as_json({"code": ECHO, "ctx": HUGE_NUMBERS_CTX}), code=None),
    "huge-int-timeout": Hostile(b'{"code": "x", "timeout": 1' + b"0" * 400 + b"}"),
    "nan-in-ctx": Hostile(b'{"code": "x", "ctx": {"a": NaN}}'),
    "1e999-in-ctx": Hostile(b'{"code": "x", "ctx": {"a": 1e999}}'),
    "random-bytes": Hostile(RANDOM_BYTES),
    "random-bytes-unsigned": Hostile(RANDOM_BYTES, signed=False, code="unauthorized"),
    "random-bytes-msgpack": Hostile(RANDOM_BYTES, content_type=MSGPACK),
    "msgpack-length-bomb": Hostile(b"\x81\xa4code\xdb\xff\xff\xff\xff", content_type=MSGPACK),
    "junk-content-type": Hostile(
        as_json({"code": OK_SOURCE}), content_type="x/\u00e9;;;", words=("Content-Type",)
    ),
    "junk-signature-headers": Hostile(
        as_json({"code": OK_SOURCE}),
        signed=False,
        extra=(
            (KEY_ID_HEADER, KEY_ID),
            (TIMESTAMP_HEADER, "9" * 12),
            (NONCE_HEADER, "G" * 32),
            (SIGNATURE_HEADER, "z" * 64),
        ),
        code="unauthorized",
    ),
    "junk-trace-headers": Hostile(
        as_json({"code": OK_SOURCE}),
        extra=(("traceparent", "ff-" + "0" * 32 + "-x"), ("tracestate", "\u00e9" * 600)),
        code=None,
    ),
}


@pytest.fixture(scope="module")
def hostile_replica(nats_server: NatsServer) -> Iterator[ReplicaProcess]:
    """A replica with EXECUTOR_MAX_REQUEST_BYTES=64 KiB, so oversized bodies fit through NATS."""
    proc = start_replica(
        nats_server.url, "hostile", EXECUTOR_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES)
    )
    yield proc
    proc.stop()


def send_hostile(caller: Caller, case: Hostile) -> RawReply:
    subject = caller.subject(case.kind)
    headers = signed(subject, case.body) if case.signed else {}
    headers.update(case.extra)
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    return caller.raw(case.kind, case.body, headers=headers, timeout=HANG_LIMIT)


def assert_replica_healthy(caller: Caller, replica: ReplicaProcess) -> None:
    """The replica still answers a normal request, runs, and has logged no failure."""
    reply = caller.code(OK_SOURCE, timeout=5)
    assert reply.status == "ok", reply
    assert reply.result == "alive"
    assert replica.process.poll() is None
    log = "".join(replica.lines)
    assert "Traceback" not in log
    assert "request failed inside the executor" not in log
    assert not [r for r in replica.records() if r.get("level") in ("error", "critical")]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_replica_answers_hostile_requests_and_serves_on(
    nats_server: NatsServer, hostile_replica: ReplicaProcess, name: str
) -> None:
    """Each hostile body over NATS gets its contract reply, and the replica keeps serving."""
    case = HOSTILE[name]
    caller = Caller(nats_server.url, hostile_replica.prefix)
    raw = send_hostile(caller, case)
    encoding = protocol.reply_encoding(case.content_type)
    reply = assert_contract(raw.data, raw.headers, encoding)
    if case.code is None:
        assert reply.status == "ok", reply
    else:
        assert_rejected(reply, case.code, *case.words)
    if name == "huge-ints-in-ctx":
        assert reply.result == HUGE_NUMBERS_CTX
    assert_replica_healthy(caller, hostile_replica)
