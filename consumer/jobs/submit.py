"""Storing the job of a ``mode: "async"`` request: the caller's signed message, as it came.

The job message carries the caller's own signature headers and the subject it signed, so the
replica that runs it checks the caller's signature, not one this replica made; the job id is the
caller's (per key), and the ledger makes a repeated submission with the same body ``accepted``
without storing it again, and one with a different body a ``conflict``.
"""

from __future__ import annotations

import asyncio

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pyexec_client.signing import MSG_ID, job_id_for

from consumer import protocol
from consumer.auth import SIGNATURE_HEADERS
from consumer.config import Settings
from consumer.errors import Conflict, Overloaded, Rejected
from consumer.handler import Submission
from consumer.jobs import ORIGIN_SUBJECT_HEADER, REQUEST_ID_HEADER
from consumer.jobs.admit import Admission, Refused
from consumer.ledger import Ledger, digest_of
from consumer.streams import JOBS_STREAM


class Submitter:
    """Stores the job of a ``mode: "async"`` request: the caller's signed message as it came."""

    def __init__(
        self, js: JetStreamContext, settings: Settings, ledger: Ledger, admission: Admission
    ) -> None:
        self.js = js
        self.settings = settings
        self.ledger = ledger
        self.admission = admission
        self._noting: set[asyncio.Task[None]] = set()

    async def __call__(self, submission: Submission) -> str:
        caller = submission.caller
        job_id = job_id_for(caller.secret, submission.request_id)
        digest = digest_of(submission.kind, submission.body)
        before, revision = await self.ledger.register(job_id, caller.key_id, digest)
        if before is not None and (before.seq or before.state != "queued"):
            return job_id  # stored before: answered accepted, never run again
        subject = self.settings.subject(f"jobs.{submission.kind}")
        headers = {**submission.trace, ORIGIN_SUBJECT_HEADER: caller.subject, MSG_ID: job_id}
        for name in SIGNATURE_HEADERS:
            headers[name] = protocol.header(submission.headers, name) or ""
        content_type = protocol.header(submission.headers, "Content-Type")
        if content_type:
            headers["Content-Type"] = content_type
        if submission.generated_id:
            headers[REQUEST_ID_HEADER] = submission.request_id
        try:
            ack = await self.js.publish(subject, submission.body, headers=headers, timeout=5)
            if ack.duplicate:
                # Inside the duplicate window the stream kept another message with this id:
                # accepted only if it is this very job (same key, same body, a valid signature).
                await self._check_stored(ack.seq, submission, digest, fresh=before is None)
        except (NatsError, TimeoutError) as exc:
            if before is None:
                await self.ledger.forget(job_id)
            raise Overloaded(f"the job could not be stored ({exc!r}); retry shortly") from None
        except Rejected:
            if before is None:
                await self.ledger.forget(job_id)
            raise
        # Noted after the reply, off its path: best effort, since the worker that takes the job
        # claims it in the record anyway. (A copy the stream dropped as a duplicate names the
        # stored one's sequence.)
        task = asyncio.create_task(self.ledger.owned_by(job_id, revision, ack.seq))
        self._noting.add(task)
        task.add_done_callback(self._noting.discard)
        return job_id

    async def _check_stored(
        self, seq: int, submission: Submission, digest: str, *, fresh: bool
    ) -> None:
        """Raise unless the job message stored at ``seq`` is the one this submission would
        have stored: a job the replicas admit (see :mod:`consumer.jobs.admit`), of the same key,
        kind and body."""
        try:
            stored = await self.js.get_msg(self.settings.stream(JOBS_STREAM), seq=seq)
        except NotFoundError:
            if fresh:
                # Taken and settled already, and never recorded as this job's: it was not it.
                raise Overloaded(
                    "another message held this job id in the jobs stream's duplicate window; "
                    "retry after it"
                ) from None
            return  # recorded as this job's before: it ran or runs
        try:
            held = self.admission.check(
                stored.subject or "",
                stored.headers,
                stored.data or b"",
                stored_at=stored.time.timestamp() if stored.time else None,
            )
        except Refused:
            held = None  # not a job any replica would run
        same = (
            held is not None
            and held.caller.key_id == submission.caller.key_id
            and held.kind == submission.kind
            and digest_of(submission.kind, stored.data or b"") == digest
        )
        if not same:
            raise Conflict(
                "another message holds this job id in the jobs stream; use a new request_id"
            )
