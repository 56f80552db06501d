"""Job lifecycle over request-reply: ``<prefix>.job.status`` and ``<prefix>.job.cancel``.

Any replica answers from the job ledger (the job's record: queued, running, done, cancelled),
its last progress event, and once the job is final its completion in the results stream. A key
sees only its own jobs: another key's job id is ``unknown``, exactly like an id that never
existed. Answers are signed for the request like every reply.

Cancel marks the record ``cancelled`` by compare-and-set (so it wins or loses against a
worker's claim, never both), stores the job's ``cancelled`` completion (signed for the job's
own request, which it reads from the jobs stream) and tells every replica on
``<prefix>.job.cancelled`` so the one running it kills its child. If that completion cannot be
stored now, the worker that holds or next receives the job stores it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping

import msgspec
import structlog
from nats.aio.client import Client as NatsClient

from consumer import logs, protocol
from consumer.auth import KEY_ID_HEADER, Caller, Verifier
from consumer.config import Settings
from consumer.errors import InvalidRequest, Rejected
from consumer.jobs import CANCEL_NOTICE
from consumer.jobs.admit import Admission
from consumer.jobs.completions import Completions
from consumer.ledger import Ledger, State
from consumer.metrics import Metrics
from consumer.nonces import NonceStore, authenticate
from consumer.protocol import JobCancel, JobStatus, Reply
from consumer.replies import REPLY_OVERHEAD, Replies, Response
from consumer.streams import JOBS_STREAM

log = structlog.get_logger("pyexec.request")
MAX_BODY = 1024
# What job_id_for gives: 32 lowercase hex digits.
JOB_ID = re.compile(r"[0-9a-f]{32}")


Answer = JobStatus | JobCancel
# A cancel stores the completion itself for a second or so; after that the worker does.
CANCEL_STORE_DELAYS = (0.2, 0.5)


class LifecycleDesk:
    """Answers ``<prefix>.job.status`` and ``<prefix>.job.cancel`` for the caller's own jobs."""

    def __init__(
        self,
        settings: Settings,
        *,
        nc: NatsClient,
        verifier: Verifier,
        nonces: NonceStore,
        ledger: Ledger,
        replies: Replies,
        completions: Completions,
        admission: Admission,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = nc.jetstream()
        self.verifier = verifier
        self.nonces = nonces
        self.ledger = ledger
        self.replies = replies
        self.completions = completions
        self.admission = admission
        self.metrics = metrics

    async def status(
        self, subject: str, headers: Mapping[str, str] | None, body: bytes
    ) -> Response:
        """The signed status of the caller's job; counted with the other requests."""
        return await self._observed(subject, headers, body, self._status)

    async def cancel(
        self, subject: str, headers: Mapping[str, str] | None, body: bytes
    ) -> Response:
        """Cancel the caller's job; the signed answer says the state it is in now."""
        return await self._observed(subject, headers, body, self._cancel)

    async def _observed(
        self,
        subject: str,
        headers: Mapping[str, str] | None,
        body: bytes,
        act: Callable[[str, str], Awaitable[Answer]],
    ) -> Response:
        started = time.perf_counter()
        response = await self._answer(subject, headers, body, started, act)
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
        self,
        subject: str,
        headers: Mapping[str, str] | None,
        body: bytes,
        started: float,
        act: Callable[[str, str], Awaitable[Answer]],
    ) -> Response:
        content_type = protocol.header(headers, "Content-Type")
        encoding = protocol.reply_encoding(content_type)
        caller: Caller | None = None
        try:
            if len(body) > MAX_BODY:
                # A job reference is some 80 bytes: a big body is not hashed to find that out.
                raise InvalidRequest(f"a job status or cancel body is at most {MAX_BODY} bytes")
            caller, refused = await authenticate(self.verifier, self.nonces, subject, headers, body)
            if refused is not None:
                raise refused
            assert caller is not None
            protocol.encoding_of(content_type)
            ref = protocol.decode_job_ref(body, encoding)
            status = await act(ref.job_id, caller.key_id)
        except Rejected as exc:
            response = self.replies.rejected(
                exc, encoding, request_id=None, caller=caller, started=started
            )
            failure = response.auth_failure
            if failure is not None:
                self.metrics.auth_failures.labels(reason=failure).inc()
            logs.canonical(
                log, subject, status="rejected", error_code=exc.code, auth_failure=failure
            )
            return response
        log.info(subject, job_id=status.job_id, state=status.state)
        data = protocol.encode(status, encoding)
        if isinstance(status, JobStatus) and len(data) + REPLY_OVERHEAD > self.replies.max_payload:
            # A completion near the size limit does not fit inside a status reply: the caller
            # reads it from the results stream instead.
            data = protocol.encode(msgspec.structs.replace(status, completion=None), encoding)
        answer = Reply(request_id=status.job_id, job_id=status.job_id, status="ok")
        return self.replies.signed(data, answer, encoding, caller=caller, started=started)

    async def _status(self, job_id: str, key_id: str) -> JobStatus:
        if not JOB_ID.fullmatch(job_id):
            # Not of the form every job id has: no job of anyone's, and no store is asked.
            return JobStatus(job_id=job_id, state="unknown")
        # Both reads at once: the progress of a job that is not the caller's is dropped.
        record, progress = await asyncio.gather(
            self.ledger.lookup(job_id, key_id), self.ledger.progress(job_id)
        )
        if record is None:
            return JobStatus(job_id=job_id, state="unknown")
        if record.state == "queued":
            progress = None
        if record.state in ("queued", "running"):
            return JobStatus(job_id=job_id, state=record.state, progress=progress)
        completion = await self.completions.body_at(record.completion)
        return JobStatus(
            job_id=job_id, state=record.state, progress=progress, completion=completion
        )

    async def _cancel(self, job_id: str, key_id: str) -> JobCancel:
        if not JOB_ID.fullmatch(job_id):
            return JobCancel(job_id=job_id, state="unknown")
        record, cancelled_now = await self.ledger.cancel(job_id, key_id)
        if record is None:
            return JobCancel(job_id=job_id, state="unknown")
        if not cancelled_now:
            return JobCancel(job_id=job_id, state=record.state)  # done, or cancelled before
        log.info("job cancelled", job_id=job_id, was=record.state)
        self.metrics.jobs_cancelled.labels(was=record.state).inc()
        if record.state == "running":
            try:
                await self.nc.publish(self.settings.subject(CANCEL_NOTICE), job_id.encode())
            except Exception as exc:  # noqa: BLE001 - the worker's own check finds it
                log.warning("telling the replicas of a cancel failed", error=repr(exc))
        return JobCancel(job_id=job_id, state=await self._complete(job_id, record.seq))

    async def _complete(self, job_id: str, seq: int) -> State:
        """Store the cancelled job's completion; the state the job ends in ("done" when its
        own completion was stored first)."""
        if not seq:
            return "cancelled"  # its message is not known yet: the worker completes it
        try:
            stored = await self.js.get_msg(self.settings.stream(JOBS_STREAM), seq=seq)
            job = self.admission.check(
                stored.subject or "",
                stored.headers,
                stored.data or b"",
                stored_at=stored.time.timestamp() if stored.time else None,
            )
        except Exception:  # noqa: BLE001 - acknowledged meanwhile, refused, or unreadable
            return "cancelled"
        if job.job_id != job_id:
            return "cancelled"
        found = await self.completions.find(job)
        if found is not None:
            # Its run ended and its completion is stored (the record said running because
            # the replica that stored it was lost before writing it): the job is done.
            await self.ledger.settle(job_id, found.state, found.seq)
            return found.state
        outcome = await self.completions.store(
            job, self.completions.cancelled(job), retry_delays=CANCEL_STORE_DELAYS
        )
        if outcome.found is None:
            return "cancelled"  # left to the worker that holds or next receives the job
        # "done" if the run ended and its completion was stored just before this one.
        await self.ledger.settle(job_id, outcome.found.state, outcome.found.seq)
        return outcome.found.state
