"""Durable async jobs over JetStream: submission, admission and the shared worker.

- :mod:`consumer.jobs.submit` stores the job of a ``mode: "async"`` request;
- :mod:`consumer.jobs.admit` checks a job message before anything runs or is answered;
- :mod:`consumer.jobs.worker` takes jobs from the shared pull consumer, runs them and stores
  their completions.

Job ids and the message id header are the contract's (:mod:`pyexec_client.signing`).
Streams and buckets are set up by :mod:`consumer.streams`; the idempotency records live in
:mod:`consumer.ledger`.
"""

from __future__ import annotations

# Core NATS, replicas only: "this job was cancelled", so the replica running it stops it.
CANCEL_NOTICE = "job.cancelled"
# A job stored by a replica for a 'mode: "async"' request carries the caller's own signature
# headers, so the subject the caller signed (``<prefix>.code`` / ``.named``) goes with it...
ORIGIN_SUBJECT_HEADER = "Pyexec-Origin-Subject"
# ...and, when the caller's body has no request_id, the one the replica made for it.
REQUEST_ID_HEADER = "Pyexec-Request-Id"
