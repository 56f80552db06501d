"""Log pipeline: library logs as JSON with the request's context; console on a terminal."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import pty
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from textwrap import dedent
from typing import Any

import nats
import pytest
from pyexec_client.signing import sign

from consumer import logs, protocol
from consumer.protocol import Reply
from tests.conftest import (
    KEY_ID,
    ROOT,
    SECRET,
    NatsServer,
    ReplicaProcess,
    start_replica,
    until,
)


def test_library_logs_are_json_with_the_bound_request_context() -> None:
    """A stdlib logger (as nats-py uses) comes out as a JSON line carrying the request id."""
    program = dedent(
        """
        import logging, structlog
        from consumer.logs import configure
        configure("json")
        structlog.contextvars.bind_contextvars(request_id="r-1", trace_id="t" * 32)
        logging.getLogger("nats.aio.client").warning("lost %s", "connection")
        structlog.get_logger("pyexec.test").info("ours", n=1)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True
    )
    library, ours = (json.loads(line) for line in done.stderr.splitlines())
    assert library["event"] == "lost connection"
    assert library["logger"] == "nats.aio.client"
    assert library["level"] == "warning"
    assert library["request_id"] == "r-1"
    assert ours["event"] == "ours"
    assert ours["n"] == 1
    assert ours["trace_id"] == "t" * 32
    assert "timestamp" in ours


def test_log_format_defaults_to_console_on_a_terminal() -> None:
    """With stderr on a terminal the default format is console; otherwise JSON."""
    program = (
        "from consumer.config import load; "
        "print(load({'EXECUTOR_API_KEYS': 'k:" + "s" * 32 + "'}).log_format)"
    )
    main, secondary = pty.openpty()
    try:
        on_tty = subprocess.run(
            [sys.executable, "-c", program],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=secondary,
            text=True,
            check=True,
        )
    finally:
        os.close(secondary)
        os.close(main)
    piped = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert on_tty.stdout.strip() == "console"
    assert piped.stdout.strip() == "json"


# -- the canonical lines of a real replica ----------------------------------------------------

PREFIX = "logs"
SLOW = "import time\ndef execute(ctx):\n    time.sleep(ctx['seconds'])\n    return 1\n"


@dataclass(frozen=True)
class Sent:
    """A request as sent, and what came back."""

    request_id: str
    trace_id: str
    reply: Reply


@pytest.fixture(scope="module")
def logged(nats_server: NatsServer) -> Iterator[ReplicaProcess]:
    """A replica whose log lines the tests read."""
    proc = start_replica(nats_server.url, PREFIX, EXECUTOR_JOB_ACK_WAIT="5")
    yield proc
    proc.stop()


def send(
    url: str,
    kind: str,
    fields: dict[str, Any],
    *,
    prefix: str = PREFIX,
    key_id: str = KEY_ID,
    secret: str = SECRET,
) -> Sent:
    """Sign ``fields`` (plus a fresh request id) for ``<prefix>.<kind>`` and send them with a
    ``traceparent`` of a new trace."""
    request_id = f"log-{secrets.token_hex(6)}"
    trace_id = secrets.token_hex(16)
    subject = f"{prefix}.{kind}"
    body = json.dumps({**fields, "request_id": request_id}).encode()
    headers = sign(key_id, secret.encode(), subject, body)
    headers["traceparent"] = f"00-{trace_id}-{secrets.token_hex(8)}-01"

    async def go() -> Reply:
        nc = await nats.connect(url)
        try:
            msg = await nc.request(subject, body, headers=headers, timeout=30)
        finally:
            await nc.close()
        return protocol.decode_reply(msg.data, protocol.JSON)

    return Sent(request_id, trace_id, asyncio.run(go()))


def line(replica: ReplicaProcess, event: str, **match: Any) -> dict[str, Any]:
    """The replica's first ``event`` line whose fields hold ``match`` (waits for it)."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [
            record
            for record in replica.records()
            if record.get("event") == event
            and all(record.get(name) == value for name, value in match.items())
        ]
        return bool(found)

    until(seen, timeout=30, what=f"a '{event}' line with {match}")
    return found[0]


@dataclass(frozen=True)
class Case:
    """A request, and the outcome and canonical line it gets."""

    kind: str
    request: dict[str, Any]
    status: str
    code: str | None
    level: str
    script: str | None = None


RETURN_ONE = "def execute(ctx):\n    return 1\n"
SYNC_CASES = {
    "ok": Case("code", {"code": RETURN_ONE}, "ok", None, "info"),
    "script_error": Case(
        "code", {"code": "def execute(ctx):\n    return 1 / 0\n"}, "error", "script_error",
        "warning",
    ),
    "syntax_error": Case(
        "code", {"code": "def execute(ctx) return\n"}, "error", "syntax_error", "warning"
    ),
    "policy_violation": Case(
        "code", {"code": "import os\n" + RETURN_ONE}, "error", "policy_violation", "warning"
    ),
    "timeout": Case(
        "code", {"code": "def execute(ctx):\n    while True:\n        pass\n", "timeout": 1},
        "timeout", "timeout", "warning",
    ),
    "invalid_request": Case(
        "code", {"code": RETURN_ONE, "timeout": 99}, "rejected", "invalid_request", "warning"
    ),
    "named_ok": Case(
        "named", {"name": "text.normalize", "ctx": {"text": " a  b "}}, "ok", None, "info",
        "text.normalize",
    ),
    "named_invalid_ctx": Case(
        "named", {"name": "text.normalize", "ctx": {"text": 5}}, "rejected", "invalid_request",
        "warning", "text.normalize",
    ),
    "unknown_script": Case(
        "named", {"name": "no.such.script"}, "rejected", "unknown_script", "warning",
        "no.such.script",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", SYNC_CASES.values(), ids=SYNC_CASES.keys())
def test_a_requests_canonical_line_has_its_level_key_id_script_and_trace(
    nats_server: NatsServer, logged: ReplicaProcess, case: Case
) -> None:
    """One 'request' line per request: info when it went as asked, warning when the caller's
    request failed; with the signing key id, the named script's name and the caller's trace."""
    sent = send(nats_server.url, case.kind, case.request)
    assert sent.reply.status == case.status, sent.reply
    assert (sent.reply.error.code if sent.reply.error else None) == case.code
    record = line(logged, "request", request_id=sent.request_id)
    assert record["status"] == case.status
    assert record["error_code"] == case.code
    assert record["level"] == case.level
    assert record["key_id"] == KEY_ID
    assert record["trace_id"] == sent.trace_id
    assert record.get("script") == case.script


def test_a_bad_signature_names_a_known_key_and_hides_an_unknown_one(
    nats_server: NatsServer, logged: ReplicaProcess
) -> None:
    """unauthorized is a warning; its line names the key id when it is a configured one, and
    never repeats what an unknown key id header held (it may be a secret put in by mistake)."""
    wrong = send(nats_server.url, "code", {"code": "x"}, secret=secrets.token_hex(16))
    pasted = secrets.token_hex(16)
    unknown = send(nats_server.url, "code", {"code": "x"}, key_id=pasted, secret=pasted)
    assert (wrong.reply.status, unknown.reply.status) == ("rejected", "rejected")
    known_line = line(logged, "request", trace_id=wrong.trace_id)
    unknown_line = line(logged, "request", trace_id=unknown.trace_id)
    assert known_line["level"] == unknown_line["level"] == "warning"
    assert known_line["error_code"] == unknown_line["error_code"] == "unauthorized"
    assert known_line["auth_failure"] == "bad_signature"
    assert known_line["key_id"] == KEY_ID
    assert unknown_line["auth_failure"] == "unknown_key"
    assert "key_id" not in unknown_line
    assert pasted not in "".join(logged.lines)
    assert SECRET not in "".join(logged.lines)


def test_the_services_own_failures_are_errors(nats_server: NatsServer) -> None:
    """overloaded (no worker free, no queue) and worker_lost (the replica stopped before the
    run ended) are the service failing its caller: their canonical lines are errors."""
    replica = start_replica(
        nats_server.url,
        "logsfail",
        EXECUTOR_WORKERS="1",
        EXECUTOR_QUEUE_LIMIT="0",
        EXECUTOR_SHUTDOWN_GRACE="1",
    )
    quick = {"code": "def execute(ctx):\n    return 1\n"}
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:

            def hold() -> concurrent.futures.Future[Sent]:
                return pool.submit(
                    send,
                    nats_server.url,
                    "code",
                    {"code": SLOW, "ctx": {"seconds": 9}, "timeout": 10},
                    prefix="logsfail",
                )

            slow = hold()
            # Once the slow run holds the one worker, the next request is refused. Under load a
            # probe may reach the worker first and the slow request be the one refused: then
            # it is sent again.
            refused = send(nats_server.url, "code", quick, prefix="logsfail")
            deadline = time.monotonic() + 60
            while refused.reply.status == "ok" and time.monotonic() < deadline:
                if slow.done():
                    slow = hold()
                time.sleep(0.2)
                refused = send(nats_server.url, "code", quick, prefix="logsfail")
            replica.process.send_signal(signal.SIGTERM)
            cut = slow.result(timeout=60)
    finally:
        replica.stop()
    for sent, code in ((refused, "overloaded"), (cut, "worker_lost")):
        assert sent.reply.error is not None
        assert sent.reply.error.code == code
        record = line(replica, "request", request_id=sent.request_id)
        assert record["error_code"] == code
        assert record["level"] == "error"
        assert record["key_id"] == KEY_ID
        assert record["trace_id"] == sent.trace_id


def test_a_jobs_lines_carry_the_callers_trace_key_id_and_script(
    nats_server: NatsServer, logged: ReplicaProcess
) -> None:
    """An async job: its 'job started' and 'job completed' lines have the trace id of the
    request that submitted it, the key id and the script's name; the completed line is info
    for a job that went well and a warning for one whose script failed."""
    good = send(
        nats_server.url, "named", {"name": "text.normalize", "ctx": {"text": "x"}, "mode": "async"}
    )
    bad = send(
        nats_server.url,
        "code",
        {"code": "def execute(ctx):\n    raise ValueError('no')\n", "mode": "async"},
    )
    assert (good.reply.status, bad.reply.status) == ("accepted", "accepted")
    for sent, level, code, script in (
        (good, "info", None, "text.normalize"),
        (bad, "warning", "script_error", None),
    ):
        accepted = line(logged, "request", request_id=sent.request_id)
        assert accepted["level"] == "info"
        assert accepted["status"] == "accepted"
        assert accepted["job_id"] == sent.reply.job_id
        started = line(logged, "job started", job_id=sent.reply.job_id)
        completed = line(logged, "job completed", job_id=sent.reply.job_id)
        for record in (started, completed):
            assert record["trace_id"] == sent.trace_id
            assert record["key_id"] == KEY_ID
            assert record.get("script") == script
        assert completed["level"] == level
        assert completed["error_code"] == code
        assert completed["state"] == "done"
        assert "duration_ms" in completed
        assert "total_ms" in completed


def kill_tree(replica: ReplicaProcess) -> None:
    """SIGKILL the replica and every process under it (warm parents, children) at once."""
    pids, pending = [replica.process.pid], [replica.process.pid]
    while pending:
        for task in Path(f"/proc/{pending.pop()}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                children = [int(child) for child in task.read_text().split()]
                pids += children
                pending += children
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    replica.stop(signal.SIGKILL)


def test_a_lost_jobs_completed_line_is_an_error_with_its_trace(server: NatsServer) -> None:
    """A job whose replica died and that was delivered more often than allowed completes as
    worker_lost: on the replica that completes it, 'job completed' is an error with the
    submitting request's trace id and key id."""
    env = {"EXECUTOR_JOB_MAX_DELIVER": "1", "EXECUTOR_JOB_ACK_WAIT": "3"}
    doomed = start_replica(server.url, "logslost", **env)
    try:
        sent = send(
            server.url,
            "code",
            {"code": SLOW, "ctx": {"seconds": 60}, "mode": "async"},
            prefix="logslost",
        )
        assert sent.reply.status == "accepted", sent.reply
        line(doomed, "job started", job_id=sent.reply.job_id)
    finally:
        kill_tree(doomed)
    survivor = start_replica(server.url, "logslost", **env)
    try:
        record = line(survivor, "job completed", job_id=sent.reply.job_id)
    finally:
        survivor.stop()
    assert record["status"] == "error"
    assert record["error_code"] == "worker_lost"
    assert record["level"] == "error"
    assert record["trace_id"] == sent.trace_id
    assert record["key_id"] == KEY_ID
    assert record["deliveries"] >= 2


def test_the_level_table_in_the_docs_is_the_one_the_service_uses() -> None:
    """Every outcome docs/operations.md lists under Levels gets that level; an unlisted error
    code is an error."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    table = text.split("### Levels", 1)[1].split("\n\n")[2]
    rows = [row.split("|")[1:3] for row in table.splitlines()[2:]]
    listed: dict[str, str] = {}
    for level, outcomes in rows:
        for outcome in re.findall(r"`([a-z_]+)`", outcomes):
            status = outcome if outcome in ("ok", "accepted", "cancelled") else "error"
            code = None if status != "error" else outcome
            assert logging.getLevelName(logs.level_of(status, code)).lower() == level.strip(" `"), (
                outcome
            )
            listed[outcome] = level.strip(" `")
    assert {name for name, level in listed.items() if level == "warning"} == logs.CALLER_ERRORS
    assert {"ok", "worker_lost", "overloaded"} <= set(listed)
    assert logs.level_of("error", "a_code_from_a_newer_sandbox") == logging.ERROR
