"""Operations: metrics that move with traffic, health and readiness probes, logs, trace context."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pyexec_client.client import Client
from pyexec_client.signing import sign

from consumer import protocol
from consumer.metrics import JOB_REFUSALS, JOB_STATUSES, OUTCOMES, PARENT_EXIT_CAUSES, Metrics
from consumer.protocol import CodeRequest
from tests.conftest import (
    KEY_ID,
    OLD_SECRET,
    SECRET,
    Caller,
    NatsServer,
    ReplicaProcess,
    free_port,
    start_replica,
    until,
)

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        connection.close()


def scrape(port: int) -> Samples:
    code, text, _ = get(port, "/metrics")
    assert code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Monitored:
    """A replica with its metrics port open on loopback."""

    def __init__(self, replica: ReplicaProcess, port: int, url: str) -> None:
        self.replica = replica
        self.port = port
        self.caller = Caller(url, replica.prefix)
        self.url = url

    def subject(self, kind: str) -> str:
        return f"{self.replica.prefix}.{kind}"


@pytest.fixture(scope="module")
def monitored(nats_server: NatsServer) -> Iterator[Monitored]:
    port = free_port()
    replica = start_replica(
        nats_server.url, EXECUTOR_METRICS_PORT=str(port), EXECUTOR_METRICS_HOST="127.0.0.1"
    )
    yield Monitored(replica, port, nats_server.url)
    replica.stop()


def test_requests_and_run_times_are_counted(monitored: Monitored) -> None:
    """Known requests move the request counter by subject/status/code and the histograms."""
    subject = monitored.subject("code")
    before = scrape(monitored.port)
    for _ in range(3):
        assert monitored.caller.code("def execute(ctx):\n    return 1\n").status == "ok"
    failed = monitored.caller.code("def execute(ctx):\n    return 1 / 0\n")
    assert failed.error is not None
    assert failed.error.code == "script_error"
    after = scrape(monitored.port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("pyexec_requests_total", subject=subject, status="ok", code="") == 3
    assert moved("pyexec_requests_total", subject=subject, status="error", code="script_error") == 1
    for histogram in (
        "pyexec_request_duration_seconds",
        "pyexec_execution_duration_seconds",
        "pyexec_queue_wait_seconds",
        "pyexec_reply_size_bytes",
    ):
        assert moved(f"{histogram}_count", subject=subject) == 4, histogram
    assert moved("pyexec_reply_size_bytes_sum", subject=subject) > 4 * 50
    assert moved("pyexec_execution_duration_seconds_sum", subject=subject) > 0
    # The largest bucket is past the longest timeout (EXECUTOR_MAX_JOB_TIMEOUT, 3600 s).
    buckets = [
        float(dict(labels)["le"])
        for name, labels in after
        if name == "pyexec_execution_duration_seconds_bucket" and dict(labels)["le"] != "+Inf"
    ]
    assert max(buckets) > 3600


def test_auth_failures_are_counted_by_reason(monitored: Monitored) -> None:
    """Unsigned, wrongly signed and unknown-key requests each count under their reason."""
    subject = monitored.subject("code")
    body = b'{"code": "def execute(ctx):\\n    return 1\\n"}'
    before = scrape(monitored.port)
    monitored.caller.raw("code", body, signed=False)
    wrong = sign(KEY_ID, b"not-the-secret", subject, body)
    monitored.caller.raw("code", body, headers=wrong)
    unknown = sign("nobody-knows", SECRET.encode(), subject, body)
    monitored.caller.raw("code", body, headers=unknown)
    after = scrape(monitored.port)
    for reason in ("missing_header", "bad_signature", "unknown_key"):
        moved = value(after, "pyexec_auth_failures_total", reason=reason) - value(
            before, "pyexec_auth_failures_total", reason=reason
        )
        assert moved == 1, reason
    rejected = {"subject": subject, "status": "rejected", "code": "unauthorized"}
    assert (
        value(after, "pyexec_requests_total", **rejected)
        - value(before, "pyexec_requests_total", **rejected)
        == 3
    )
    # Key ids are not a label unless EXECUTOR_METRICS_KEY_IDS=1.
    assert not any(dict(labels).get("key_id") for _, labels in after)


def test_timeouts_policy_violations_and_memory_kills_are_counted(monitored: Monitored) -> None:
    """Each kind of stopped run moves its own counter."""
    before = scrape(monitored.port)
    slow = monitored.caller.code("def execute(ctx):\n    while True:\n        pass\n", timeout=0.5)
    assert slow.status == "timeout"
    refused = monitored.caller.code("import os\ndef execute(ctx):\n    return 1\n")
    assert refused.error is not None
    assert refused.error.code == "policy_violation"
    big = monitored.caller.code(
        "def execute(ctx):\n    return len(bytearray(64 * 1024 ** 3))\n", timeout=10
    )
    assert big.error is not None
    assert big.error.code == "memory_limit"
    after = scrape(monitored.port)
    for name in (
        "pyexec_timeouts_total",
        "pyexec_policy_violations_total",
        "pyexec_memory_limit_kills_total",
    ):
        assert value(after, name) - value(before, name) == 1, name


def test_pool_and_connection_gauges(monitored: Monitored) -> None:
    """An idle replica shows its workers idle, warm children waiting, NATS up, and its version."""
    # Children used by earlier tests are replaced in the background: wait for one to be back.
    deadline = time.monotonic() + 30
    while value(samples := scrape(monitored.port), "pyexec_warm_children") < 1:
        assert time.monotonic() < deadline, "no warm child came back"
        time.sleep(0.05)
    assert value(samples, "pyexec_workers", state="idle") == 2
    assert value(samples, "pyexec_workers", state="busy") == 0
    assert value(samples, "pyexec_warm_children") >= 1
    assert value(samples, "pyexec_ready") == 1
    assert value(samples, "pyexec_nats_connected") == 1
    assert value(samples, "pyexec_runs_in_flight") == 0
    build = [dict(labels) for name, labels in samples if name == "pyexec_build_info"]
    assert build
    assert build[0]["version"]


def test_each_warm_parent_tier_is_shown(monitored: Monitored) -> None:
    """Both tiers are up with their memory shown; a script that imports only the standard
    library counts as a run of the stdlib tier, one that imports pandas of the full tier."""
    before = scrape(monitored.port)
    for tier in ("stdlib", "full"):
        assert value(before, "pyexec_tier_up", tier=tier) == 1
        assert value(before, "pyexec_tier_parent_memory_bytes", tier=tier, kind="pss") > 1e6
    stdlib = "import math\ndef execute(ctx):\n    return math.floor(2.5)\n"
    pandas = "import pandas as pd\ndef execute(ctx):\n    return int(pd.Series([2]).sum())\n"
    assert monitored.caller.code(stdlib).result == 2
    assert monitored.caller.code(pandas).result == 2
    after = scrape(monitored.port)
    for tier in ("stdlib", "full"):
        runs = "pyexec_tier_runs_total"
        assert value(after, runs, tier=tier) - value(before, runs, tier=tier) == 1, tier
    small = value(after, "pyexec_tier_parent_memory_bytes", tier="stdlib", kind="pss")
    large = value(after, "pyexec_tier_parent_memory_bytes", tier="full", kind="pss")
    assert small < large


def test_probes_and_unknown_paths(monitored: Monitored) -> None:
    """/healthz and /readyz answer 200 when serving; other paths and methods are refused."""
    assert get(monitored.port, "/healthz")[0] == 200
    code, text, _ = get(monitored.port, "/readyz")
    assert (code, text) == (200, "ready\n")
    assert get(monitored.port, "/metrics")[2]["Content-Type"].startswith("text/plain; version=")
    assert get(monitored.port, "/nope")[0] == 404
    assert get(monitored.port, "/metrics", method="POST")[0] == 405
    assert get(monitored.port, "/healthz", method="HEAD")[0] == 200


def test_job_metrics(monitored: Monitored) -> None:
    """A submitted job counts as submitted and completed, and leaves no backlog."""
    before = scrape(monitored.port)

    subject = monitored.subject("code")
    body, headers = _signed(subject, "def execute(ctx):\n    return 2\n", mode="async")
    accepted, _ = _request(monitored.url, subject, body, headers)
    assert accepted.status == "accepted"
    assert accepted.job_id is not None
    job_id = accepted.job_id

    async def go() -> None:
        async with await Client.connect(
            monitored.url, KEY_ID, SECRET, prefix=monitored.replica.prefix
        ) as client:
            done = await client.wait(job_id, timeout=30)
            assert done.result == 2

    asyncio.run(go())
    deadline = time.monotonic() + 10
    while True:
        after = scrape(monitored.port)
        completed = value(after, "pyexec_jobs_completed_total", status="ok") - value(
            before, "pyexec_jobs_completed_total", status="ok"
        )
        if completed == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert completed == 1
    assert (
        value(after, "pyexec_jobs_submitted_total") - value(before, "pyexec_jobs_submitted_total")
        == 1
    )
    job_subject = monitored.subject("jobs.code")
    assert value(after, "pyexec_requests_total", subject=job_subject, status="ok", code="") >= 1
    assert value(after, "pyexec_jobs_taken_total") - value(before, "pyexec_jobs_taken_total") == 1
    assert value(after, "pyexec_jobs_backlog") == 0
    assert value(after, "pyexec_jobs_lost_total") == 0


# -- trace context ---------------------------------------------------------------------------


def _request(
    url: str, subject: str, body: bytes, headers: dict[str, str]
) -> tuple[protocol.Reply, dict[str, str]]:
    async def go() -> tuple[protocol.Reply, dict[str, str]]:
        nc = await nats.connect(url)
        try:
            msg = await nc.request(subject, body, timeout=20, headers=headers)
        finally:
            await nc.close()
        return protocol.decode_reply(msg.data, protocol.JSON), dict(msg.headers or {})

    return asyncio.run(go())


def _signed(subject: str, source: str, **fields: Any) -> tuple[bytes, dict[str, str]]:
    body = protocol.encode(CodeRequest(code=source, **fields), protocol.JSON)
    return body, sign(KEY_ID, SECRET.encode(), subject, body)


def test_traceparent_in_traceparent_out(monitored: Monitored) -> None:
    """The reply continues the caller's trace with a span of its own; logs carry the ids."""
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    request_id = f"trace-{secrets.token_hex(4)}"
    subject = monitored.subject("code")
    body, headers = _signed(subject, "def execute(ctx):\n    return 1\n", request_id=request_id)
    headers["traceparent"] = f"00-{trace_id}-{parent_id}-01"
    headers["tracestate"] = "vendor=abc"
    reply, got = _request(monitored.url, subject, body, headers)
    assert reply.status == "ok"
    version, got_trace, span_id, flags = got["traceparent"].split("-")
    assert (version, got_trace, flags) == ("00", trace_id, "01")
    assert len(span_id) == 16
    assert span_id != parent_id
    assert got["tracestate"] == "vendor=abc"
    line = _canonical_line(monitored.replica, request_id)
    assert (line["trace_id"], line["span_id"], line["parent_span_id"]) == (
        trace_id,
        span_id,
        parent_id,
    )


@pytest.mark.parametrize(
    "given",
    [None, "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",
     "not a traceparent"],
    ids=["absent", "zero-trace-id", "version-ff", "garbage"],
)  # fmt: skip
def test_a_request_without_a_valid_traceparent_starts_a_trace(
    monitored: Monitored, given: str | None
) -> None:
    """Absent or invalid trace context: the reply carries a fresh, valid traceparent."""
    subject = monitored.subject("code")
    body, headers = _signed(subject, "def execute(ctx):\n    return 1\n")
    if given is not None:
        headers["traceparent"] = given
    reply, got = _request(monitored.url, subject, body, headers)
    assert reply.status == "ok"
    version, trace_id, span_id, flags = got["traceparent"].split("-")
    assert version == "00"
    assert len(trace_id) == 32
    assert trace_id != "0" * 32
    assert given is None or trace_id not in given
    assert len(span_id) == 16
    assert flags == "00"


def test_rejections_carry_the_trace_too(monitored: Monitored) -> None:
    """An unauthorized request is answered with the caller's trace id."""
    trace_id = secrets.token_hex(16)
    subject = monitored.subject("code")
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    reply, got = _request(monitored.url, subject, b"{}", headers)
    assert reply.status == "rejected"
    assert got["traceparent"].split("-")[1] == trace_id


def test_an_async_job_keeps_the_trace_to_its_completion(monitored: Monitored) -> None:
    """traceparent on a mode=async request: the acceptance and the stored completion share
    its trace id."""
    trace_id = secrets.token_hex(16)
    subject = monitored.subject("code")
    body, headers = _signed(
        subject, "def execute(ctx):\n    return 3\n", mode="async", request_id=secrets.token_hex(8)
    )
    headers["traceparent"] = f"00-{trace_id}-{secrets.token_hex(8)}-01"

    async def go() -> tuple[protocol.Reply, dict[str, str], dict[str, str]]:
        nc = await nats.connect(monitored.url)
        try:
            msg = await nc.request(subject, body, timeout=20, headers=headers)
            accepted = protocol.decode_reply(msg.data, protocol.JSON)
            assert accepted.job_id is not None
            js = nc.jetstream()
            sub = await js.subscribe(
                f"{monitored.replica.prefix}.results.{accepted.job_id}", ordered_consumer=True
            )
            done = await sub.next_msg(timeout=30)
            await sub.unsubscribe()
            return accepted, dict(msg.headers or {}), dict(done.headers or {})
        finally:
            await nc.close()

    accepted, accepted_headers, completion_headers = asyncio.run(go())
    assert accepted.status == "accepted"
    assert accepted_headers["traceparent"].split("-")[1] == trace_id
    assert completion_headers["traceparent"].split("-")[1] == trace_id
    assert completion_headers["traceparent"] != accepted_headers["traceparent"]


# -- logs ------------------------------------------------------------------------------------


def _canonical_line(replica: ReplicaProcess, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for record in replica.records():
            if record.get("event") == "request" and record.get("request_id") == request_id:
                return record
        time.sleep(0.05)
    raise AssertionError(f"no canonical line for {request_id}")


def test_logs_are_json_with_request_ids_and_no_secrets_or_stdout(monitored: Monitored) -> None:
    """Every line is JSON; a request's canonical line has its outcome and timings; neither the
    signing secrets nor the script's stdout ever reach the log."""
    marker = f"stdout-marker-{secrets.token_hex(6)}"
    request_id = f"logs-{secrets.token_hex(4)}"
    reply = monitored.caller.code(
        f"def execute(ctx):\n    print('{marker}')\n    return ctx['secret']\n",
        {"secret": f"ctx-{marker}"},
        request_id=request_id,
    )
    assert reply.stdout.strip() == marker
    line = _canonical_line(monitored.replica, request_id)
    assert line["subject"] == monitored.subject("code")
    assert line["status"] == "ok"
    assert line["error_code"] is None
    assert line["tier"] == "stdlib"  # the script imports no library
    for field in ("duration_ms", "wait_ms", "total_ms", "reply_bytes", "trace_id", "timestamp"):
        assert field in line, field
    assert line["level"] == "info"
    text = "".join(monitored.replica.lines)
    for secret in (SECRET, OLD_SECRET, marker):
        assert secret not in text
    for raw in monitored.replica.lines:
        assert isinstance(json.loads(raw), dict), raw


def test_readyz_waits_for_nats_and_follows_the_connection(tmp_path: Any) -> None:
    """/readyz is 503 while NATS is unreachable (/healthz is 200), 200 once connected, and
    503 again when the connection is lost."""
    server = NatsServer(port=free_port(), store=tmp_path / "js")
    port = free_port()
    replica = start_replica(
        server.url,
        wait=False,
        EXECUTOR_METRICS_PORT=str(port),
        EXECUTOR_METRICS_HOST="127.0.0.1",
    )
    try:
        until(lambda: status(port, "/healthz") == 200, timeout=60)
        code, text, _ = get(port, "/readyz")
        assert code == 503
        assert "not connected to NATS" in text
        assert value(scrape(port), "pyexec_ready") == 0
        server.start()
        replica.wait_for("replica ready")
        until(lambda: status(port, "/readyz") == 200, timeout=60)
        server.stop()
        until(lambda: status(port, "/readyz") == 503, timeout=60)
        assert value(scrape(port), "pyexec_nats_connected") == 0
        assert value(scrape(port), "pyexec_nats_disconnects_total") >= 1
        # Regression: every failed reconnection attempt used to count as a client error.
        until(lambda: value(scrape(port), "pyexec_nats_connect_failures_total") >= 2, timeout=60)
        assert value(scrape(port), "pyexec_nats_errors_total") == 0
    finally:
        server.stop()
        replica.stop()


def test_a_metrics_port_in_use_stops_start_up_with_a_clear_error(nats_server: NatsServer) -> None:
    """A replica that cannot open its metrics port exits non-zero naming the variable."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        replica = start_replica(
            nats_server.url,
            wait=False,
            EXECUTOR_METRICS_PORT=str(port),
            EXECUTOR_METRICS_HOST="127.0.0.1",
        )
        code = replica.process.wait(timeout=60)
    replica.stop()
    output = "".join(replica.lines)
    assert code != 0
    assert f"EXECUTOR_METRICS_PORT: cannot listen on 127.0.0.1:{port}" in output
    assert "Traceback" not in output


def test_key_id_labels_only_take_known_ids() -> None:
    """With key id labels on, ids outside the keyring are counted as 'unknown'."""
    metrics = Metrics(version="test", longest_timeout=60, key_ids=["backend"])
    for key_id in ("backend", "made-up-1", "made-up-2", None):
        metrics.request(
            subject="pyexec.code", status="ok", code=None, key_id=key_id, seconds=0.1,
            reply_bytes=10,
        )  # fmt: skip
    samples = {
        dict(s.labels)["key_id"]: s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
        if s.name == "pyexec_requests_total" and s.value
    }
    assert samples == {"backend": 1, "unknown": 3}


def status(port: int, path: str) -> int:
    """The HTTP status of a GET on loopback, or 0 if nothing answers."""
    try:
        return get(port, path)[0]
    except OSError:
        return 0


# -- series from zero ------------------------------------------------------------------------


def test_a_fresh_replica_shows_every_closed_label_set_at_zero(nats_server: NatsServer) -> None:
    """Before its first request a replica exports, at 0, every requests series of the
    contract's statuses and codes, every auth failure reason, job status, job refusal reason,
    warm-parent exit cause, and the busy-seconds and jobs-taken counters: rate() sees the first
    worker_lost or overloaded, and a fresh fleet shows 0 rather than no data."""
    port = free_port()
    replica = start_replica(
        nats_server.url, EXECUTOR_METRICS_PORT=str(port), EXECUTOR_METRICS_HOST="127.0.0.1"
    )
    try:
        samples = scrape(port)
    finally:
        replica.stop()
    prefix = replica.prefix

    def zero(name: str, **labels: str) -> bool:
        return samples.get((name, frozenset(labels.items()))) == 0

    for kind, outcomes in OUTCOMES.items():
        for status, code in outcomes:
            subject = f"{prefix}.{kind}"
            assert zero("pyexec_requests_total", subject=subject, status=status, code=code), (
                subject,
                status,
                code,
            )
    # Every error code of docs/protocol.md's table is among them, with its status.
    protocol_doc = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    documented = re.findall(
        r"^\| `([a-z_]+)` \| `(error|timeout|rejected|cancelled)` \|", protocol_doc, re.M
    )
    assert len(documented) >= 10
    ran = set(OUTCOMES["jobs.code"]) | set(OUTCOMES["code"])
    for code, status in documented:
        assert (status, code) in ran, (status, code)
    for reason in ("missing_header", "bad_signature", "unknown_key", "replayed_nonce"):
        assert zero("pyexec_auth_failures_total", reason=reason), reason
    for status in JOB_STATUSES:
        assert zero("pyexec_jobs_completed_total", status=status), status
    for reason in JOB_REFUSALS:
        assert zero("pyexec_jobs_refused_total", reason=reason), reason
    for tier in ("stdlib", "full"):
        for cause in PARENT_EXIT_CAUSES:
            assert zero("pyexec_warm_parent_exits_total", tier=tier, cause=cause), (tier, cause)
    for direction in ("in", "out"):
        assert zero("pyexec_files_total", direction=direction)
    for name in ("pyexec_jobs_taken_total", "pyexec_nats_connect_failures_total"):
        assert zero(name), name
    assert ("pyexec_worker_busy_seconds_total", frozenset()) in samples


def test_busy_seconds_count_the_time_runs_hold_their_slots(monitored: Monitored) -> None:
    """A run that works for half a second adds at least that to the busy-seconds counter,
    whenever the scrapes fall."""
    before = scrape(monitored.port)
    busy = (
        "import time\n"
        "def execute(ctx):\n"
        "    end = time.monotonic() + 0.5\n"
        "    while time.monotonic() < end:\n"
        "        pass\n"
        "    return 1\n"
    )
    reply = monitored.caller.code(busy)
    assert reply.status == "ok", reply.error
    after = scrape(monitored.port)
    moved = value(after, "pyexec_worker_busy_seconds_total") - value(
        before, "pyexec_worker_busy_seconds_total"
    )
    assert moved >= 0.5
