"""The shared job worker: fetch a job when a job slot is free, admit it, run it, store its
completion, acknowledge it.

Replicas share one durable pull consumer and keep long jobs alive with progress acks; a job is
acknowledged only after its completion is stored in ``PYEXEC_RESULTS``. A job delivered more
often than ``EXECUTOR_JOB_MAX_DELIVER`` completes as ``worker_lost`` without running again.

A cancelled job is never started (its record says so at the claim) and a running one is stopped
by :class:`~consumer.jobs.stopper.RunningJobs` (its child killed); a run that ends as the cancel
lands keeps whichever completion the results stream stored first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pyexec_client.signing import MSG_ID

from consumer import logs, protocol, tracing
from consumer.config import Settings
from consumer.errors import Conflict, StoreUnavailable
from consumer.handler import AdmittedJob, Handler, request_fields
from consumer.jobs.admit import Admission, Refused
from consumer.jobs.completions import Completions
from consumer.jobs.stopper import RunningJobs
from consumer.ledger import Ledger, State, digest_of
from consumer.metrics import Metrics
from consumer.progress import ProgressRelay
from consumer.protocol import ErrorBody, Reply
from consumer.replies import Response
from consumer.streams import JOBS_STREAM
from sandbox import Capacity, Reservation

log = structlog.get_logger("pyexec.jobs")

DURABLE = "pyexec-workers"
FETCH_TIMEOUT = 1.0
BACKLOG_INTERVAL = 5.0
# Seconds before a job is offered again when the ledger could not be reached.
LEDGER_RETRY_DELAY = 2.0


class JobWorker:
    """Takes jobs from the shared pull consumer while this replica has free job slots."""

    def __init__(
        self,
        nc: NatsClient,
        settings: Settings,
        *,
        handler: Handler,
        admission: Admission,
        ledger: Ledger,
        completions: Completions,
        capacity: Capacity,
        metrics: Metrics,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.handler = handler
        self.admission = admission
        self.ledger = ledger
        self.completions = completions
        self.metrics = metrics
        self.capacity = capacity
        self._running: dict[asyncio.Task[None], tuple[Msg, Reservation]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._backlog_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._fetching = False
        self._refusals = RefusalLog()
        self.stopper = RunningJobs(nc, settings, ledger)

    async def start(self) -> None:
        self._sub = await self.js.pull_subscribe(
            self.settings.subject("jobs.>"),
            durable=DURABLE,
            stream=self.settings.stream(JOBS_STREAM),
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.settings.job_ack_wait,
                max_deliver=-1,
                deliver_policy=DeliverPolicy.ALL,
            ),
        )
        await self.stopper.start()
        self._loop_task = asyncio.create_task(self._fetch_loop())
        self._backlog_task = asyncio.create_task(self._watch_backlog())
        self.metrics.jobs_in_flight.set_function(lambda: float(len(self._running)))

    async def _watch_backlog(self) -> None:
        """Keep the backlog gauges current: jobs stored and not yet handed to any replica, and
        how long the oldest of them has waited (jobs handed back for redelivery are counted but
        not aged)."""
        stream = self.settings.stream(JOBS_STREAM)
        while True:
            try:
                info = await self.js.consumer_info(stream, DURABLE)
                waiting = info.num_pending or 0
                age = 0.0
                if waiting and info.delivered is not None:
                    oldest = await self.js.get_msg(
                        stream,
                        seq=info.delivered.stream_seq + 1,
                        subject=self.settings.subject("jobs.>"),
                        next=True,
                    )
                    if oldest.time is not None:
                        age = max(time.time() - oldest.time.timestamp(), 0.0)
            except Exception as exc:  # noqa: BLE001 - reconnecting or nothing to read: try later
                log.debug("reading the jobs backlog failed", error=repr(exc))
            else:
                self.metrics.jobs_backlog.set(waiting)
                self.metrics.jobs_oldest_age.set(age)
            await asyncio.sleep(BACKLOG_INTERVAL)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def _fetch_loop(self) -> None:
        while not self._stopping:
            # A job holds its reservation of the replica's capacity from the fetch until it is
            # settled: at most ``capacity.job_slots`` jobs at once, whatever they wait for.
            reservation = await self.capacity.reserve_job()
            self._fetching = True
            try:
                messages = await self._sub.fetch(1, timeout=FETCH_TIMEOUT)
            except (TimeoutError, NatsTimeout):
                reservation.release()
                continue
            except Exception as exc:  # noqa: BLE001 - disconnected or reconnecting: retry
                reservation.release()
                log.warning("fetching jobs failed", error=repr(exc))
                await asyncio.sleep(1)
                continue
            finally:
                self._fetching = False
            if self._stopping:
                for message in messages:
                    with contextlib.suppress(Exception):
                        await message.nak()
                reservation.release()
                return
            for message in messages:
                task = asyncio.create_task(self._process(message))
                self._running[task] = (message, reservation)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        _message, reservation = self._running.pop(task, (None, None))
        if reservation is not None:
            reservation.release()

    async def _process(self, msg: Msg) -> None:
        structlog.contextvars.clear_contextvars()
        try:
            meta = msg.metadata
        except Exception:  # noqa: BLE001 - not a JetStream delivery: nothing to settle
            self.metrics.jobs_refused.labels(reason="not_jetstream").inc()
            self._refusals.log("a message without JetStream delivery metadata", "not_jetstream")
            return
        started = time.perf_counter()
        # For the log only: the id the message claims, in whatever case it came.
        given = protocol.header(msg.headers, MSG_ID) or ""
        # The job carries its caller's trace context: every line of the job, refusals
        # included, has the trace id the caller's request had.
        trace = tracing.continue_from(msg.headers)
        structlog.contextvars.bind_contextvars(job_id=given[:64], **trace.log_fields())
        job = await self._take(msg, meta)
        if job is None:
            return
        if meta.num_delivered == 1:
            self.metrics.jobs_taken.inc()
        fields = request_fields(job.request) if job.request is not None else {}
        structlog.contextvars.bind_contextvars(key_id=job.caller.key_id, **fields)
        log.info("job started", deliveries=meta.num_delivered, subject=msg.subject)
        alive = asyncio.create_task(_keep_alive(msg, self.settings.job_ack_wait))
        try:
            if meta.num_delivered > 1:
                self.metrics.jobs_redelivered.inc()
                found = await self.completions.find(job)
                if found is not None:
                    # Its completion was stored but the acknowledgement was lost: do not run
                    # the script a second time.
                    await self.ledger.settle(job.job_id, found.state, found.seq)
                    await self._settle(msg, nak=False)
                    log.info("job already completed; acknowledged", deliveries=meta.num_delivered)
                    return
            if meta.num_delivered > self.settings.job_max_deliver:
                response = self._worker_lost(job, meta.num_delivered)
                self.metrics.jobs_lost.inc()
            else:
                ran = await self._run(job, trace)
                if ran is None or await self.ledger.state_of(job.job_id) == "cancelled":
                    await self._complete_cancelled(job, msg)
                    return
                response = ran
            state = await self._complete(job, msg, response)
            # The job's canonical line.
            logs.canonical(
                log,
                "job completed",
                subject=msg.subject,
                **response.log_fields(),
                total_ms=round((time.perf_counter() - started) * 1000, 3),
                state=state,
                deliveries=meta.num_delivered,
            )
        finally:
            alive.cancel()

    async def _run(self, job: AdmittedJob, trace: tracing.Trace) -> Response | None:
        """Run the job; None when it was cancelled while it ran (its child is killed). Its
        progress reports are published, the last one before this returns."""
        relay = ProgressRelay(
            self.nc,
            self.settings.subject(f"progress.{job.job_id}"),
            job_id=job.job_id,
            caller=job.caller,
            ledger=self.ledger,
            metrics=self.metrics,
        )
        finished = False
        try:
            response = await self.stopper.run(
                job.job_id, self.handler.run_job(job, relay.offer, trace=trace)
            )
            finished = response is not None
            return response
        finally:
            # A cancelled job's last report is dropped; a finished one's goes out first.
            await relay.close(flush=finished)

    async def _complete(self, job: AdmittedJob, msg: Msg, response: Response) -> State | None:
        """Store the job's completion unless one is stored, acknowledge, and record the state
        the stored one gives it (a completion stored first, a cancel's say, is the job's one).
        None: it could not be stored, and the job is handed back."""
        stored = await self.completions.store(job, response)
        if stored.found is None:
            await self._settle(msg, nak=True)
            return None
        # The record first, then the acknowledgement: a replica lost between the two leaves
        # the job to be delivered again, and the next one finds the completion and acks.
        await self.ledger.settle(job.job_id, stored.found.state, stored.found.seq)
        await self._settle(msg, nak=False)
        if stored.outcome == "stored":
            self.metrics.jobs_completed.labels(status=response.reply.status).inc()
        return stored.found.state

    async def _complete_cancelled(self, job: AdmittedJob, msg: Msg) -> None:
        """Store the job's ``cancelled`` completion unless one is stored, then acknowledge."""
        state = await self._complete(job, msg, self.completions.cancelled(job))
        log.info("job cancelled; acknowledged without a run", state=state)

    async def _take(self, msg: Msg, meta: Msg.Metadata) -> AdmittedJob | None:
        """The job to run, once admitted and claimed; None when the message was settled
        instead (refused, a duplicate, completed already, or handed back)."""
        try:
            job = self.admission.admit(msg)
            claim = await self.ledger.claim(
                job.job_id, job.caller.key_id, digest_of(job.kind, msg.data), meta.sequence.stream
            )
        except Refused as refused:
            await self._refuse(msg, refused.reason, str(refused))
            return None
        except Conflict as exc:
            await self._refuse(msg, "conflict", str(exc))
            return None
        except StoreUnavailable as exc:
            log.warning("the job ledger cannot be reached; job handed back", error=str(exc))
            await self._settle(msg, nak=True, delay=LEDGER_RETRY_DELAY)
            return None
        if claim == "duplicate":
            await self._refuse(msg, "duplicate", "another message owns this job id")
            return None
        if claim == "done":
            # Its completion was stored (and the job recorded done) but the acknowledgement
            # was lost: do not run the script a second time.
            await self._settle(msg, nak=False)
            log.info("job already completed; acknowledged", deliveries=meta.num_delivered)
            return None
        if claim == "cancelled":
            await self._complete_cancelled(job, msg)
            return None
        return job

    async def _refuse(self, msg: Msg, reason: str, message: str) -> None:
        self.metrics.jobs_refused.labels(reason=reason).inc()
        self._refusals.log(message, reason)
        await self._settle(msg, nak=False)

    @staticmethod
    async def _settle(msg: Msg, *, nak: bool, delay: float | None = None) -> None:
        """Acknowledge (or hand back) a job; a lost acknowledgement only means the job comes
        back, and its stored completion is then found instead of running it again."""
        try:
            await (msg.nak(delay=delay) if nak else msg.ack())
        except Exception as exc:  # noqa: BLE001 - disconnected: JetStream redelivers it
            log.warning("settling the job failed", nak=nak, error=repr(exc))

    def _worker_lost(self, job: AdmittedJob, deliveries: int) -> Response:
        reply = Reply(
            request_id=job.request_id,
            job_id=job.job_id,
            status="error",
            error=ErrorBody(
                code="worker_lost",
                type="WorkerLost",
                message=f"the job was delivered {deliveries} times and never completed; "
                "the replicas running it were lost",
            ),
        )
        log.warning("job lost", deliveries=deliveries)
        return self.completions.signed_for(job, reply)

    async def stop_fetching(self) -> None:
        """Take no more jobs; those running go on."""
        self._stopping = True
        if self._backlog_task is not None:
            self._backlog_task.cancel()
        if self._loop_task is not None:
            # A fetch returns within its one-second timeout and the loop then ends by itself;
            # cancelling it inside a fetch would leave the client's futures unretrieved. A loop
            # waiting for a job slot instead is cancelled at once, which is clean.
            if self._fetching:
                await asyncio.wait({self._loop_task}, timeout=FETCH_TIMEOUT * 3)
            if not self._loop_task.done():
                self._loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._loop_task
        # Its inbox would otherwise hold up draining the connection.
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
        await self.stopper.stop()

    @property
    def running(self) -> set[asyncio.Task[None]]:
        return set(self._running)

    async def hand_back(self) -> None:
        """Stop the jobs still running and give them back (nak) for another replica to run."""
        for task, (message, _reservation) in list(self._running.items()):
            task.cancel()
            with contextlib.suppress(Exception):
                await message.nak()
            log.info("job handed back", job_id=(message.headers or {}).get(MSG_ID, "")[:64])


class RefusalLog:
    """Logs refused job messages, at most ``per_second`` lines a second (a flood of junk must
    not flood the logs); the count of lines left out goes with the next one. Every refusal is
    counted in the metrics whatever the log shows."""

    def __init__(self, per_second: int = 10) -> None:
        self.per_second = per_second
        self._second = 0
        self._logged = 0
        self._left_out = 0

    def log(self, detail: str, reason: str) -> None:
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._logged = second, 0
        if self._logged >= self.per_second:
            self._left_out += 1
            return
        self._logged += 1
        log.warning(
            "job refused; acknowledged without running",
            reason=reason,
            detail=detail,
            refusals_not_logged=self._left_out,
        )
        self._left_out = 0


async def wait_within(
    tasks: set[asyncio.Task[None]], grace: float, now: asyncio.Event | None = None
) -> None:
    """Wait for ``tasks`` for at most ``grace`` seconds, or until ``now`` is set."""
    if not tasks:
        return
    waiters: set[asyncio.Future[object]] = {asyncio.ensure_future(asyncio.wait(tasks))}
    if now is not None:
        waiters.add(asyncio.ensure_future(now.wait()))
    await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()


async def _keep_alive(msg: Msg, ack_wait: float) -> None:
    """Tell JetStream the job is still being worked on, well inside its ack wait."""
    while True:
        await asyncio.sleep(ack_wait / 3)
        with contextlib.suppress(Exception):
            await msg.in_progress()
