"""Job lifecycle over request-reply: ``<prefix>.job.status``.

Any replica answers from the job ledger (the job's record: queued, running, done) and, once the
job is done, from its completion in the results stream. A key sees only its own jobs: another
key's job id is ``unknown``, exactly like an id that never existed. The answer is signed for the
request like every reply.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import msgspec
import structlog
from nats.js import JetStreamContext

from consumer import protocol
from consumer.auth import KEY_ID_HEADER, Caller, Verifier
from consumer.config import Settings
from consumer.errors import InvalidRequest, Rejected
from consumer.ledger import Ledger
from consumer.metrics import Metrics
from consumer.nonces import NonceStore, authenticate
from consumer.protocol import JobStatus, Reply
from consumer.replies import REPLY_OVERHEAD, Replies, Response
from consumer.streams import RESULTS_STREAM

log = structlog.get_logger("pyexec.request")
MAX_BODY = 1024
# What job_id_for gives: 32 lowercase hex digits.
JOB_ID = re.compile(r"[0-9a-f]{32}")


class StatusDesk:
    """Answers ``<prefix>.job.status`` for the caller's own jobs."""

    def __init__(
        self,
        settings: Settings,
        *,
        verifier: Verifier,
        nonces: NonceStore,
        ledger: Ledger,
        replies: Replies,
        js: JetStreamContext,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.verifier = verifier
        self.nonces = nonces
        self.ledger = ledger
        self.replies = replies
        self.js = js
        self.metrics = metrics

    async def answer(
        self, subject: str, headers: Mapping[str, str] | None, body: bytes
    ) -> Response:
        """The signed status of the caller's job; counted with the other requests."""
        started = time.perf_counter()
        response = await self._answer(subject, headers, body, started)
        error = response.reply.error
        self.metrics.request(
            subject=subject,
            status=response.reply.status,
            code=error.code if error else None,
            key_id=protocol.header(headers, KEY_ID_HEADER),
            seconds=time.perf_counter() - started,
            reply_bytes=len(response.data),
        )
        return response

    async def _answer(
        self, subject: str, headers: Mapping[str, str] | None, body: bytes, started: float
    ) -> Response:
        content_type = protocol.header(headers, "Content-Type")
        encoding = protocol.reply_encoding(content_type)
        caller: Caller | None = None
        try:
            if len(body) > MAX_BODY:
                # A job reference is some 80 bytes: a big body is not hashed to find that out.
                raise InvalidRequest(f"a job status body is at most {MAX_BODY} bytes")
            caller, refused = await authenticate(self.verifier, self.nonces, subject, headers, body)
            if refused is not None:
                raise refused
            assert caller is not None
            protocol.encoding_of(content_type)
            ref = protocol.decode_job_ref(body, encoding)
            status = await self._status(ref.job_id, caller.key_id)
        except Rejected as exc:
            response = self.replies.rejected(
                exc, encoding, request_id=None, caller=caller, started=started
            )
            failure = response.auth_failure
            if failure is not None:
                self.metrics.auth_failures.labels(reason=failure).inc()
            log.info("job status", status="rejected", error_code=exc.code, auth_failure=failure)
            return response
        log.info("job status", job_id=status.job_id, state=status.state)
        data = protocol.encode(status, encoding)
        if len(data) + REPLY_OVERHEAD > self.replies.max_payload:
            # A completion near the size limit does not fit inside a status reply: the caller
            # reads it from the results stream instead.
            data = protocol.encode(msgspec.structs.replace(status, completion=None), encoding)
        answer = Reply(request_id=status.job_id, job_id=status.job_id, status="ok")
        return self.replies.signed(data, answer, encoding, caller=caller, started=started)

    async def _status(self, job_id: str, key_id: str) -> JobStatus:
        if not JOB_ID.fullmatch(job_id):
            # Not of the form every job id has: no job of anyone's, and no store is asked.
            return JobStatus(job_id=job_id, state="unknown")
        record = await self.ledger.lookup(job_id, key_id)
        if record is None:
            return JobStatus(job_id=job_id, state="unknown")
        if record.state != "done":
            return JobStatus(job_id=job_id, state=record.state)
        return JobStatus(job_id=job_id, state="done", completion=await self._completion(job_id))

    async def _completion(self, job_id: str) -> Any:
        """The stored completion as plain values; None once it has expired or cannot be read."""
        try:
            stored = await self.js.get_msg(
                self.settings.stream(RESULTS_STREAM),
                subject=self.settings.subject(f"results.{job_id}"),
            )
            encoding = protocol.reply_encoding((stored.headers or {}).get("Content-Type"))
            return protocol.decode_any(stored.data or b"", encoding)
        except Exception:  # noqa: BLE001 - expired or unreadable: no completion
            return None
