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

from consumer import protocol
from consumer.auth import SIGNATURE_HEADERS
from consumer.config import Settings
from consumer.errors import Overloaded
from consumer.handler import Submission
from consumer.jobs import MSG_ID, ORIGIN_SUBJECT_HEADER, REQUEST_ID_HEADER, job_id_for
from consumer.ledger import Ledger, Record, digest_of


class Submitter:
    """Stores the job of a ``mode: "async"`` request: the caller's signed message as it came."""

    def __init__(self, js: JetStreamContext, settings: Settings, ledger: Ledger) -> None:
        self.js = js
        self.settings = settings
        self.ledger = ledger
        self._noting: set[asyncio.Task[None]] = set()

    async def __call__(self, submission: Submission) -> str:
        caller = submission.caller
        job_id = job_id_for(caller.secret, submission.request_id)
        digest = digest_of(submission.kind, submission.body)
        before, revision = await self.ledger.register(job_id, caller.key_id, digest)
        if before is not None and (before.seq or before.done):
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
        except (NatsError, TimeoutError) as exc:
            if before is None:
                await self.ledger.forget(job_id)
            raise Overloaded(f"the job could not be stored ({exc!r}); retry shortly") from None
        # Noted after the reply, off its path: best effort, since the worker that takes the job
        # claims it in the record anyway. (A copy the stream dropped as a duplicate names the
        # stored one's sequence.)
        record = before or Record(key_id=caller.key_id, digest=digest)
        task = asyncio.create_task(self.ledger.owned_by(job_id, record, revision, ack.seq))
        self._noting.add(task)
        task.add_done_callback(self._noting.discard)
        return job_id
