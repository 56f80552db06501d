"""Admitting a job message: nothing runs or is answered for a message that fails a check.

The signature must verify against the subject the caller signed (the jobs subject, or for a
job a replica stored, the request subject it came on, and then only for ``mode: "async"``);
``Nats-Msg-Id`` must be the job id of the signing key and the body's request_id. A message that
fails is :class:`Refused`: acknowledged, never run and answered nowhere (counted in
``pyexec_jobs_refused_total`` and logged), so it cannot put a completion on another caller's
subject.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

import structlog
from nats.aio.msg import Msg
from pyexec_client.signing import MSG_ID, job_id_for

from consumer import protocol
from consumer.auth import Verifier
from consumer.config import Settings
from consumer.errors import InvalidRequest, Unauthorized
from consumer.handler import AdmittedJob
from consumer.jobs import ORIGIN_SUBJECT_HEADER, REQUEST_ID_HEADER
from consumer.metrics import Metrics


class Refused(Exception):
    """A job message that is acknowledged and never run; ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Admission:
    """Checks job messages for one replica."""

    def __init__(self, settings: Settings, verifier: Verifier, metrics: Metrics) -> None:
        self.settings = settings
        self.verifier = verifier
        self.metrics = metrics
        self._kinds = {
            settings.subject("jobs.code"): "code",
            settings.subject("jobs.named"): "named",
        }

    def admit(self, msg: Msg) -> AdmittedJob:
        """Check a delivered job message before anything runs or is answered; raise
        :class:`Refused`. Its window is judged by the time the stream stored it."""
        meta = msg.metadata
        stored = meta.timestamp.timestamp() if meta.timestamp else None
        return self.check(msg.subject, msg.headers, msg.data, stored_at=stored)

    def check(
        self,
        subject: str,
        headers: Mapping[str, str] | None,
        data: bytes,
        *,
        stored_at: float | None,
    ) -> AdmittedJob:
        """Check a job message as stored on ``subject``; raise :class:`Refused`."""
        kind = self._kinds.get(subject)
        if kind is None:
            raise Refused("subject", f"'{subject}' is not a jobs subject served here")
        origin = protocol.header(headers, ORIGIN_SUBJECT_HEADER)
        if origin is not None and origin != self.settings.subject(kind):
            raise Refused("origin_subject", "the job names a subject it cannot come from")
        try:
            # A job may be delivered again: its replay protection is its job id, not the nonce.
            caller = self.verifier.check(origin or subject, headers, data, reference_time=stored_at)
        except Unauthorized as exc:
            self.metrics.auth_failures.labels(reason=exc.reason).inc()
            raise Refused("unauthorized", str(exc)) from None
        content_type = protocol.header(headers, "Content-Type")
        encoding = protocol.reply_encoding(content_type)
        request: protocol.Request | None = None
        invalid: InvalidRequest | None = None
        try:
            protocol.encoding_of(content_type)
            request = protocol.decode_request(
                kind,
                data,
                encoding,
                max_bytes=self.settings.max_request_bytes,
                max_depth=self.settings.max_ctx_depth,
            )
            request_id = request.request_id
        except InvalidRequest as exc:
            invalid = exc
            request_id = protocol.request_id_of(data, encoding)
        if request_id is None and origin is not None:
            request_id = protocol.header(headers, REQUEST_ID_HEADER)
        if not request_id:
            raise Refused("no_request_id", "a job must carry its request_id")
        job_id = job_id_for(caller.secret, request_id)
        # Exactly as JetStream reads it: the header named exactly Nats-Msg-Id (a repeated one is
        # refused with the signature check).
        given = (headers or {}).get(MSG_ID, "")
        if not hmac.compare_digest(given.encode(), job_id.encode()):
            raise Refused(
                "msg_id_mismatch", "Nats-Msg-Id is not the job id of its key and request_id"
            )
        if origin is not None and (request is None or request.mode != "async"):
            raise Refused("not_async", "only a 'mode: \"async\"' request becomes a job")
        structlog.contextvars.bind_contextvars(job_id=job_id, request_id=request_id)
        return AdmittedJob(
            subject=subject,
            headers=headers,
            kind=kind,
            caller=caller,
            request_id=request_id,
            job_id=job_id,
            encoding=encoding,
            request=request,
            invalid=invalid,
        )
