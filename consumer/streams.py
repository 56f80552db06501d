"""The JetStream streams and key-value buckets a replica uses, and their set-up.

- ``PYEXEC_JOBS`` (work queue) holds submitted jobs on ``<prefix>.jobs.code`` / ``.named``.
- ``PYEXEC_RESULTS`` holds one completion per job on ``<prefix>.results.<job_id>``,
  deduplicated by job id, with direct get on so a caller can read one completion by subject.
- ``PYEXEC_NONCES`` (bucket) is the fleet-wide replay store: one key per accepted nonce, kept
  for twice the clock window.
- ``PYEXEC_JOB_IDS`` (bucket) is the idempotency ledger: one record per job id, kept as long as
  completions are.

A prefix other than ``pyexec`` is appended to every name (see ``Settings.stream``). Streams and
buckets that exist already are left as operators set them, except that the results stream gets
direct get switched on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import (
    BucketNotFoundError,
    InvalidKeyError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from consumer.auth import WINDOW_SECONDS
from consumer.config import Settings

log = structlog.get_logger("pyexec.jobs")

JOBS_STREAM = "PYEXEC_JOBS"
RESULTS_STREAM = "PYEXEC_RESULTS"
NONCES_BUCKET = "PYEXEC_NONCES"
JOB_IDS_BUCKET = "PYEXEC_JOB_IDS"
# A nonce accepted at t came with a timestamp of at least t - 60 s, so it is valid until at most
# t + 120 s; the margin covers clocks of replicas that differ by up to a minute.
NONCE_TTL = 2 * WINDOW_SECONDS + 60.0
# Seconds a replica keeps trying the shared stores (through a stream leader election, say)
# before it answers 'overloaded'.
STORE_TIMEOUT = 5.0
# Answers from a bucket that are final, not a passing failure.
_FINAL = (KeyWrongLastSequenceError, KeyNotFoundError, InvalidKeyError)
T = TypeVar("T")


@dataclass(frozen=True)
class Stores:
    """The two buckets, opened."""

    nonces: KeyValue
    job_ids: KeyValue


def stream_configs(settings: Settings) -> tuple[StreamConfig, StreamConfig]:
    jobs = StreamConfig(
        name=settings.stream(JOBS_STREAM),
        subjects=[settings.subject("jobs.>")],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        duplicate_window=min(settings.jobs_duplicate_window, settings.results_max_age),
        # A flood of junk cannot grow the queue without bound: past the limit a new submission
        # is refused (the caller gets an error, through a replica 'overloaded'), none is lost.
        max_msgs=settings.jobs_max_msgs,
        discard=DiscardPolicy.NEW,
    )
    results = StreamConfig(
        name=settings.stream(RESULTS_STREAM),
        subjects=[settings.subject("results.>")],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        max_age=settings.results_max_age,
        allow_direct=True,
        # A job's completion may be published again after a redelivery, at most the job
        # timeout cap (times the deliveries) later: keep its id long enough to drop it.
        # (JetStream wants the window no longer than the maximum age.)
        duplicate_window=min(
            settings.results_max_age,
            max(120.0, settings.max_job_timeout * (settings.job_max_deliver + 1)),
        ),
    )
    return jobs, results


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create both streams if they are missing; switch on direct get on the results stream."""
    for config in stream_configs(settings):
        name = config.name or ""
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(config)
            log.info("stream created", stream=name)
            continue
        if config.allow_direct and not info.config.allow_direct:
            info.config.allow_direct = True
            await js.update_stream(info.config)
            log.info("direct get switched on", stream=name)


async def ensure_buckets(js: JetStreamContext, settings: Settings) -> Stores:
    """Open the replay store and the idempotency ledger, creating them if they are missing."""
    wanted = (
        KeyValueConfig(
            bucket=settings.stream(NONCES_BUCKET),
            description="pyexec: accepted request nonces (replay store)",
            history=1,
            ttl=NONCE_TTL,
            storage=StorageType.FILE,
            replicas=settings.stream_replicas,
        ),
        KeyValueConfig(
            bucket=settings.stream(JOB_IDS_BUCKET),
            description="pyexec: one record per job id (idempotent submissions)",
            history=1,
            ttl=settings.results_max_age,
            storage=StorageType.FILE,
            replicas=settings.stream_replicas,
        ),
    )
    opened = []
    for config in wanted:
        try:
            opened.append(await js.key_value(config.bucket))
        except BucketNotFoundError:
            opened.append(await js.create_key_value(config))
            log.info("bucket created", bucket=config.bucket)
    return Stores(nonces=opened[0], job_ids=opened[1])


async def patiently(step: Callable[[], Awaitable[T]], *, within: float) -> T:
    """Run one bucket operation, retrying passing failures (no stream leader during an
    election, a timeout, a reconnection) with a doubling delay for up to ``within`` seconds;
    then the last failure is raised. A final answer (the key exists, the key is missing) is
    raised at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.05
    while True:
        try:
            async with asyncio.timeout(max(deadline - loop.time(), delay)):
                return await step()
        except _FINAL:
            raise
        except (TimeoutError, NatsError):
            if loop.time() + delay >= deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
