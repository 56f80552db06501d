"""Job completions in ``PYEXEC_RESULTS``: storing one, finding the one stored, and the
``cancelled`` completion.

A job has one completion: it is published with the job id as ``Nats-Msg-Id``, so of two
replicas that publish for the same job inside the results stream's duplicate window (a worker
finishing as a cancel lands, a redelivered job) the stream keeps the first and drops the
other. Whoever publishes second learns it from the acknowledgement and reads which one was kept;
the job's state in the ledger always follows the stored completion.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import structlog
from nats.js import JetStreamContext

from consumer import protocol, tracing
from consumer.config import Settings
from consumer.handler import AdmittedJob
from consumer.jobs import MSG_ID
from consumer.ledger import State
from consumer.protocol import ErrorBody, Reply
from consumer.replies import Replies, Response
from consumer.streams import RESULTS_STREAM

log = structlog.get_logger("pyexec.jobs")

# Seconds between attempts to store a completion (about a minute in all).
STORE_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
Stored = Literal["stored", "duplicate", "failed"]


class Completions:
    """Reads and writes the completions of one fleet's jobs."""

    def __init__(self, js: JetStreamContext, settings: Settings, replies: Replies) -> None:
        self.js = js
        self.settings = settings
        self.replies = replies

    def subject(self, job_id: str) -> str:
        return self.settings.subject(f"results.{job_id}")

    async def store(
        self,
        job_id: str,
        data: bytes,
        headers: dict[str, str],
        *,
        retry_delays: tuple[float, ...] = STORE_RETRY_DELAYS,
    ) -> Stored:
        """Publish a completion, retrying through leader elections and reconnections.
        "duplicate": the stream holds a completion of this job already (this one is dropped);
        "failed": it could not be stored in time."""
        headers = {**headers, MSG_ID: job_id}
        for attempt, delay in enumerate((*retry_delays, None), start=1):
            try:
                ack = await self.js.publish(self.subject(job_id), data, headers=headers, timeout=5)
            except Exception as exc:  # noqa: BLE001 - no stream leader, disconnected, timeout
                if delay is None:
                    log.error("storing the completion failed", error=repr(exc))
                    return "failed"
                log.warning(
                    "storing the completion failed; retrying",
                    attempt=attempt,
                    retry_in_s=delay,
                    error=repr(exc),
                )
                await asyncio.sleep(delay)
            else:
                # A retry of our own that the stream had stored is a duplicate too: the caller
                # reads the stored one to know which it is.
                return "duplicate" if ack.duplicate else "stored"
        return "failed"

    async def stored_state(self, job: AdmittedJob) -> State | None:
        """The state the stored completion of ``job`` gives it ("done" or "cancelled"), or
        None when there is none: only a message stored with the job id as message id and
        signed as the answer to the job's request is taken for its completion."""
        found = await self._read(job.job_id)
        if found is None:
            return None
        headers, data = found
        if headers.get(MSG_ID) != job.job_id or not job.caller.answered_by(headers, data):
            return None
        return "cancelled" if _status_of(headers, data) == "cancelled" else "done"

    async def body(self, job_id: str) -> Any:
        """The stored completion as plain values; None once it has expired or cannot be read."""
        found = await self._read(job_id)
        if found is None:
            return None
        headers, data = found
        try:
            encoding = protocol.reply_encoding(headers.get("Content-Type"))
            return protocol.decode_any(data, encoding)
        except Exception:  # noqa: BLE001 - unreadable: no completion
            return None

    def cancelled(self, job: AdmittedJob) -> Response:
        """The job's ``cancelled`` completion, signed for its request."""
        reply = Reply(
            request_id=job.request_id,
            job_id=job.job_id,
            status="cancelled",
            error=ErrorBody(
                code="cancelled",
                type="Cancelled",
                message="the job was cancelled before it finished",
            ),
        )
        response = self.replies.respond(
            reply, job.encoding, caller=job.caller, started=time.perf_counter()
        )
        trace = tracing.continue_from(job.headers)
        return Response(
            data=response.data,
            headers={**(response.headers or {}), **trace.headers()},
            reply=response.reply,
        )

    async def _read(self, job_id: str) -> tuple[dict[str, str], bytes] | None:
        try:
            stored = await self.js.get_msg(
                self.settings.stream(RESULTS_STREAM), subject=self.subject(job_id)
            )
        except Exception:  # noqa: BLE001 - not found, or cannot tell
            return None
        return dict(stored.headers or {}), stored.data or b""


def _status_of(headers: dict[str, str], data: bytes) -> str | None:
    try:
        encoding = protocol.reply_encoding(headers.get("Content-Type"))
        return protocol.decode_reply(data, encoding).status
    except Exception:  # noqa: BLE001 - not a reply body
        return None
