"""Job completions in ``PYEXEC_RESULTS``: storing one, finding the one stored, and the
``cancelled`` completion.

A job has one completion: it is published with the job id as ``Nats-Msg-Id``, so of two
replicas that publish for the same job inside the results stream's duplicate window (a worker
finishing as a cancel lands, a redelivered job) the stream keeps the first and drops the
other. Whoever publishes second learns it from the acknowledgement and reads which one was kept;
the job's state in the ledger always follows the stored completion, and the ledger notes its
stream sequence, which is what a status reply embeds.

Only a message signed as the answer to the job's request and naming the job is its completion.
A message someone else put on the subject first (anyone allowed to publish there) does not
count: the completion is then published again under a second message id (and, should that be
taken too, with none), so the job's real completion is stored and found whatever sits beside it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from nats.js import JetStreamContext
from nats.js.api import PubAck
from pyexec_client.signing import MSG_ID

from consumer import protocol, tracing
from consumer.config import Settings
from consumer.handler import AdmittedJob
from consumer.ledger import State
from consumer.protocol import ErrorBody, Reply
from consumer.replies import Replies, Response
from consumer.streams import RESULTS_STREAM

log = structlog.get_logger("pyexec.jobs")

# Seconds between attempts to store a completion (about a minute in all).
STORE_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
Outcome = Literal["stored", "duplicate", "failed"]
# How many messages on one job's subject are looked at for its completion.
SCAN_LIMIT = 16


@dataclass(frozen=True)
class Found:
    """The job's completion as stored: the state it gives the job and its stream sequence."""

    state: State
    seq: int


@dataclass(frozen=True)
class Stored:
    """What storing a completion came to. ``found`` is the job's completion in the stream
    (this one if "stored"; the one stored before if "duplicate"; None if "failed")."""

    outcome: Outcome
    found: Found | None


class Completions:
    """Reads and writes the completions of one fleet's jobs."""

    def __init__(self, js: JetStreamContext, settings: Settings, replies: Replies) -> None:
        self.js = js
        self.settings = settings
        self.replies = replies
        self.stream = settings.stream(RESULTS_STREAM)

    def subject(self, job_id: str) -> str:
        return self.settings.subject(f"results.{job_id}")

    async def store(
        self,
        job: AdmittedJob,
        response: Response,
        *,
        retry_delays: tuple[float, ...] = STORE_RETRY_DELAYS,
    ) -> Stored:
        """Publish the job's completion ``response``, retrying through leader elections and
        reconnections. "duplicate": the stream holds a completion of this job already (this
        one is dropped); "failed": it could not be stored in time."""
        state: State = "cancelled" if response.reply.status == "cancelled" else "done"
        for msg_id in (job.job_id, f"{job.job_id}.2", None):
            headers = dict(response.headers or {})
            if msg_id is not None:
                headers[MSG_ID] = msg_id
            ack = await self._publish(job.job_id, response.data, headers, retry_delays)
            if ack is None:
                return Stored("failed", None)
            if not ack.duplicate:
                return Stored("stored", Found(state, ack.seq))
            # The id is taken: by this job's completion (ours, retried, or another replica's),
            # or by a message that is not one.
            found = await self.find(job)
            if found is not None:
                return Stored("duplicate", found)
            log.warning("a message that is not the job's completion holds its id; stored again")
        return Stored("failed", None)

    async def _publish(
        self, job_id: str, data: bytes, headers: dict[str, str], retry_delays: tuple[float, ...]
    ) -> PubAck | None:
        for attempt, delay in enumerate((*retry_delays, None), start=1):
            try:
                return await self.js.publish(self.subject(job_id), data, headers=headers, timeout=5)
            except Exception as exc:  # noqa: BLE001 - no stream leader, disconnected, timeout
                if delay is None:
                    log.error("storing the completion failed", error=repr(exc))
                    return None
                log.warning(
                    "storing the completion failed; retrying",
                    attempt=attempt,
                    retry_in_s=delay,
                    error=repr(exc),
                )
                await asyncio.sleep(delay)
        return None

    async def find(self, job: AdmittedJob) -> Found | None:
        """The job's completion in the stream: the first message on its subject that is
        signed as the answer to the job's request and names the job; None if there is none."""
        seq = 1
        for _ in range(SCAN_LIMIT):
            try:
                stored = await self.js.get_msg(
                    self.stream, seq=seq, subject=self.subject(job.job_id), next=True
                )
            except Exception:  # noqa: BLE001 - none left, or cannot tell
                return None
            headers, data = dict(stored.headers or {}), stored.data or b""
            if job.caller.answered_by(headers, data):
                reply = _reply_of(headers, data)
                if reply is not None and reply.job_id == job.job_id:
                    state: State = "cancelled" if reply.status == "cancelled" else "done"
                    return Found(state, stored.seq or 0)
            seq = (stored.seq or seq) + 1
        return None

    async def body_at(self, seq: int) -> Any:
        """The completion stored at ``seq`` as plain values; None once it has expired or
        cannot be read."""
        if not seq:
            return None
        try:
            stored = await self.js.get_msg(self.stream, seq=seq)
            encoding = protocol.reply_encoding((stored.headers or {}).get("Content-Type"))
            return protocol.decode_any(stored.data or b"", encoding)
        except Exception:  # noqa: BLE001 - expired or unreadable: no completion
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
        return self.signed_for(job, reply)

    def signed_for(self, job: AdmittedJob, reply: Reply) -> Response:
        """A completion the worker makes itself (not a run's), encoded and signed for the
        job's request, with the job's trace context."""
        response = self.replies.respond(
            reply, job.encoding, caller=job.caller, started=time.perf_counter()
        )
        trace = tracing.continue_from(job.headers)
        return Response(
            data=response.data,
            headers={**(response.headers or {}), **trace.headers()},
            reply=response.reply,
        )


def _reply_of(headers: dict[str, str], data: bytes) -> Reply | None:
    try:
        encoding = protocol.reply_encoding(headers.get("Content-Type"))
        return protocol.decode_reply(data, encoding)
    except Exception:  # noqa: BLE001 - not a reply body
        return None
