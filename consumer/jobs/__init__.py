"""Durable async jobs over JetStream: job ids, submission, admission and the shared worker.

- :mod:`consumer.jobs.submit` stores the job of a ``mode: "async"`` request;
- :mod:`consumer.jobs.admit` checks a job message before anything runs or is answered;
- :mod:`consumer.jobs.worker` takes jobs from the shared pull consumer, runs them and stores
  their completions.

Streams and buckets are set up by :mod:`consumer.streams`; the idempotency records live in
:mod:`consumer.ledger`.
"""

from __future__ import annotations

import hashlib
import hmac

MSG_ID = "Nats-Msg-Id"
# Core NATS, replicas only: "this job was cancelled", so the replica running it stops it.
CANCEL_NOTICE = "job.cancelled"
# A job stored by a replica for a 'mode: "async"' request carries the caller's own signature
# headers, so the subject the caller signed (``<prefix>.code`` / ``.named``) goes with it...
ORIGIN_SUBJECT_HEADER = "Pyexec-Origin-Subject"
# ...and, when the caller's body has no request_id, the one the replica made for it.
REQUEST_ID_HEADER = "Pyexec-Request-Id"


def job_id_for(secret: bytes, request_id: str) -> str:
    """The contract's job id: the first 32 hex digits of HMAC-SHA256(secret, "v1-job\\n" +
    request_id). Per key, and unguessable without the key's secret."""
    mac = hmac.new(secret, b"v1-job\n" + request_id.encode(), hashlib.sha256)
    return mac.hexdigest()[:32]
