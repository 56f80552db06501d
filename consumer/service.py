"""A replica's life: connect, start the pool, serve the queue group, stop gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import msgspec
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from consumer import protocol
from consumer.auth import Verifier
from consumer.catalog import Catalog
from consumer.config import HEADER_ROOM, Settings
from consumer.discovery import Discovery, EndpointStats, elapsed_ns
from consumer.errors import ConfigError, Overloaded
from consumer.files import FileStore
from consumer.handler import Handler
from consumer.jobs.admit import Admission as JobAdmission
from consumer.jobs.completions import Completions
from consumer.jobs.submit import Submitter
from consumer.jobs.worker import JobWorker, wait_within
from consumer.ledger import Ledger
from consumer.lifecycle import LifecycleDesk
from consumer.metrics import Metrics
from consumer.monitor import Monitor
from consumer.nonces import SharedNonces
from consumer.replies import REPLY_OVERHEAD, Replies, Response
from consumer.streams import STORE_TIMEOUT, ensure_buckets, ensure_streams
from consumer.subjects import ReplySubjects
from consumer.transport import connect
from sandbox import Capacity, LayerStatus, ParentExit, Pool

log = structlog.get_logger("pyexec.service")
MIN_RESULT_LIMIT = 64 * 1024
DRAIN_STEP_TIMEOUT = 5.0
SHED_MESSAGE = "the replica holds as many requests as it can; retry shortly"
# Seconds the requests cut at the end of the grace period get to send their worker_lost reply.
CUT_REPLY_TIMEOUT = 5.0
T = TypeVar("T")
# Answers one request-reply message: subject, headers, body.
Answer = Callable[[str, Mapping[str, str] | None, bytes], Awaitable[Response]]


def package_version() -> str:
    try:
        return version("pyexec")
    except PackageNotFoundError:
        return "0.0.0"


class Replica:
    """One executor replica. ``await Replica(settings, urls).run()`` serves until stopped."""

    def __init__(self, settings: Settings, urls: list[str]) -> None:
        self.settings = settings
        self.urls = urls
        self._stop = asyncio.Event()
        self._stop_now = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriptions: list[Subscription] = []
        self.started = asyncio.Event()
        self.metrics = Metrics(
            version=package_version(),
            longest_timeout=max(settings.max_timeout, settings.max_job_timeout),
            key_ids=settings.keys.ids if settings.metrics_key_ids else None,
            prefix=settings.prefix,
        )
        self._nc: NatsClient | None = None
        self._pool: Pool | None = None
        self.metrics.ready.set_function(lambda: float(self.not_ready() is None))
        self.metrics.nats_connected.set_function(
            lambda: float(self._nc is not None and self._nc.is_connected)
        )
        self.monitor_port: int | None = None
        # Requests held at once (running, waiting for a worker, being checked) past which new
        # ones are refused unread.
        self._max_in_flight = settings.queue_limit + 4 * settings.pool.workers + 64
        self.reply_subjects = ReplySubjects(
            settings.prefix, settings.inbox_prefix, settings.reply_prefixes
        )

    def not_ready(self) -> str | None:
        """None while the replica takes requests; otherwise why it does not."""
        if self._stop.is_set():
            return "stopping"
        if self._nc is None or not self._nc.is_connected:
            return "not connected to NATS"
        if self._pool is None or not self.started.is_set():
            return "starting"
        halted = self._pool.halted
        if halted:
            return halted
        if not self._pool.live:
            return "the worker pool is restarting its warm parent"
        return None

    def broken(self) -> str | None:
        """Why the replica cannot recover on its own (a warm parent crash-looped), else None."""
        return self._pool.halted if self._pool is not None else None

    def _parent_exited(self, exit_: ParentExit) -> None:
        """Log each warm-parent exit with its cause, and count it."""
        fields = {
            "tier": exit_.tier,
            "pid": exit_.pid,
            "returncode": exit_.returncode,
            "cause": exit_.cause,
            "uptime_s": exit_.uptime_s,
        }
        if exit_.halted:
            self.metrics.parent_exits.labels(tier=exit_.tier, cause="halted").inc()
            log.error("warm parent crash loop: restarts stopped", reason=exit_.halted, **fields)
        elif exit_.expected:
            self.metrics.parent_exits.labels(tier=exit_.tier, cause="stopped").inc()
            log.info("warm parent stopped", **fields)
        else:
            self.metrics.parent_exits.labels(tier=exit_.tier, cause="crashed").inc()
            log.warning("warm parent exited; restarting it", **fields)

    def request_stop(self) -> None:
        """Begin a graceful stop; a second call stops without waiting for in-flight work."""
        if self._stop.is_set():
            self._stop_now.set()
        self._stop.set()

    async def run(self) -> None:
        """Serve until :meth:`request_stop`, then finish in-flight requests and exit."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        monitor = None
        try:
            if self.settings.metrics_port:
                monitor = Monitor(
                    self.metrics,
                    self.not_ready,
                    host=self.settings.metrics_host,
                    port=self.settings.metrics_port,
                    broken=self.broken,
                )
                try:
                    self.monitor_port = await monitor.start()
                except OSError as exc:
                    raise ConfigError(
                        f"EXECUTOR_METRICS_PORT: cannot listen on {self.settings.metrics_host}:"
                        f"{self.settings.metrics_port}: {exc.strerror}"
                    ) from None
            await self._run()
        finally:
            if monitor is not None:
                await monitor.stop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        log.info("stopped")

    async def _unless_stopped(self, step: Coroutine[Any, Any, T]) -> T | None:
        """Run a start-up step, abandoning it if a stop is requested meanwhile."""
        task = asyncio.create_task(step)
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("stop requested during start-up")
        return None

    async def _run(self) -> None:
        startup = time.perf_counter()
        service_id = uuid.uuid4().hex
        nc = await self._unless_stopped(self._connect(name=f"pyexec-{service_id[:8]}"))
        if nc is None:
            return
        pool: Pool | None = None
        try:
            result_limit = nc.max_payload - REPLY_OVERHEAD - 4 * self.settings.pool.stdout_limit
            if result_limit < MIN_RESULT_LIMIT:
                raise ConfigError(
                    f"EXECUTOR_STDOUT_LIMIT ({self.settings.pool.stdout_limit}) leaves no room "
                    f"for a result in the server's max payload of {nc.max_payload} bytes"
                )
            settings = self.settings
            capacity = Capacity(
                settings.pool.workers,
                queue_limit=settings.queue_limit,
                max_wait=settings.queue_wait,
                job_share=settings.job_share,
            )
            pool = Pool(
                msgspec.structs.replace(settings.pool, result_limit=result_limit),
                capacity=capacity,
                on_parent_exit=self._parent_exited,
            )
            if await self._unless_stopped(pool.start()) is None:
                return
            self._pool = pool
            self.metrics.watch_pool(
                workers=self.settings.pool.workers,
                busy=lambda: pool.busy,
                warm=lambda: pool.warm,
                restarts=lambda: pool.parent_restarts,
                tiers=pool.states,
                busy_seconds=pool.capacity.busy_seconds,
            )
            if pool.failed_imports:
                log.warning("some allowed modules failed to import", modules=pool.failed_imports)
            check_isolation(self.settings, pool.layers)
            handler, status, jobs = await self._wire(nc, pool)
            discovery = self._discovery(service_id, handler.catalog)
            await discovery.start(nc)
            await jobs.start()
            await self._subscribe(nc, handler, status, discovery)
            log.info(
                "replica ready",
                service_id=service_id,
                subjects=[self.settings.subject("code"), self.settings.subject("named")],
                queue_group=self.settings.queue_group,
                workers=self.settings.pool.workers,
                startup_ms=round((time.perf_counter() - startup) * 1000, 1),
            )
            self.started.set()
            await self._stop.wait()
            log.info("stopping", in_flight=len(self._tasks), jobs_in_flight=jobs.in_flight)
            await self._drain(nc, handler, discovery, jobs)
        finally:
            await self.reply_subjects.stop()
            if pool is not None:
                await pool.close()
            if not nc.is_closed:
                await _bounded(nc.close(), "connection close")

    async def _connect(self, name: str) -> NatsClient:
        """Connect, making the connection visible to readiness as soon as it exists."""
        self._nc = await connect(
            self.urls, name=name, inbox_prefix=self.settings.inbox_prefix, metrics=self.metrics
        )
        return self._nc

    async def _wire(self, nc: NatsClient, pool: Pool) -> tuple[Handler, LifecycleDesk, JobWorker]:
        """Every part of a serving replica, built once, each given what it uses."""
        settings = self.settings
        if settings.max_request_bytes + HEADER_ROOM > nc.max_payload:
            log.warning(
                "EXECUTOR_MAX_REQUEST_BYTES leaves less room for headers than requests need",
                max_request_bytes=settings.max_request_bytes,
                server_max_payload=nc.max_payload,
                largest_body=nc.max_payload - HEADER_ROOM,
            )
        js = nc.jetstream()
        await ensure_streams(js, settings)
        await self.reply_subjects.start(js)
        stores = await ensure_buckets(nc.jetstream(timeout=STORE_TIMEOUT), settings)
        ledger = Ledger(stores.job_ids, timeout=STORE_TIMEOUT)
        files = FileStore(nc.jetstream(timeout=STORE_TIMEOUT), settings, self.metrics)
        await files.open()
        verifier = Verifier(settings.keys, capacity=settings.nonce_cache_size)
        replies = Replies(nc.max_payload)
        job_admission = JobAdmission(settings, verifier, self.metrics)
        capacity = pool.capacity
        self.metrics.runs_waiting.set_function(lambda: float(capacity.waiting))
        nonces = SharedNonces(stores.nonces, timeout=STORE_TIMEOUT)
        handler = Handler(
            settings,
            verifier=verifier,
            nonces=nonces,
            catalog=Catalog(settings.scripts_dir),
            pool=pool,
            replies=replies,
            metrics=self.metrics,
            capacity=capacity,
            submit=Submitter(js, settings, ledger, job_admission),
            files=files,
        )
        completions = Completions(js, settings, replies)
        jobs = JobWorker(
            nc,
            settings,
            handler=handler,
            admission=job_admission,
            ledger=ledger,
            completions=completions,
            capacity=capacity,
            metrics=self.metrics,
        )
        status = LifecycleDesk(
            settings,
            nc=nc,
            verifier=verifier,
            nonces=nonces,
            ledger=ledger,
            replies=replies,
            completions=completions,
            admission=job_admission,
            metrics=self.metrics,
        )
        return handler, status, jobs

    def _discovery(self, service_id: str, catalog: Catalog) -> Discovery:
        endpoints = {
            kind: EndpointStats(
                name=kind.replace(".", "_"),  # micro endpoint names have no dots
                subject=self.settings.subject(kind),
                queue_group=self.settings.queue_group,
            )
            for kind in ("code", "named", "job.status", "job.cancel")
        }
        settings = self.settings
        return Discovery(
            service_id=service_id,
            version=package_version(),
            description="Runs sandboxed Python scripts",
            metadata={
                "prefix": settings.prefix,
                "default_timeout": f"{settings.default_timeout:g}",
                "max_timeout": f"{settings.max_timeout:g}",
                "max_job_timeout": f"{settings.max_job_timeout:g}",
                "memory_mb": str(settings.pool.memory_mb),
                "max_request_bytes": str(settings.max_request_bytes),
                "workers": str(settings.pool.workers),
                "scripts": ",".join(s.name for s in catalog.scripts()),
            },
            endpoints=endpoints,
            reply_subjects=self.reply_subjects,
            on_refused=self._refused_reply,
        )

    def _refused_reply(self, subject: str, reply: str) -> None:
        self.metrics.refused_reply_subjects.inc()
        log.warning(
            "request dropped: its reply subject is refused", subject=subject, reply=reply[:200]
        )

    async def _subscribe(
        self, nc: NatsClient, handler: Handler, status: LifecycleDesk, discovery: Discovery
    ) -> None:
        answers: dict[str, Answer] = {
            "code": handler.handle,
            "named": handler.handle,
            "job.status": status.status,
            "job.cancel": status.cancel,
        }
        for kind, answer in answers.items():

            async def on_message(msg: Msg, kind: str = kind, answer: Answer = answer) -> None:
                if len(self._tasks) >= self._max_in_flight:
                    await self._shed(nc, msg, handler.replies)
                    return
                task = asyncio.create_task(self._serve(nc, answer, discovery, kind, msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

            self._subscriptions.append(
                await nc.subscribe(
                    self.settings.subject(kind), queue=self.settings.queue_group, cb=on_message
                )
            )
        await nc.flush()

    async def _serve(
        self, nc: NatsClient, answer: Answer, discovery: Discovery, kind: str, msg: Msg
    ) -> None:
        started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        if msg.reply and self.reply_subjects.refused(msg.reply):
            # Answering there could plant a message in the executor's own streams (a forged
            # completion) or call a server API in the replica's name: nothing runs.
            self._refused_reply(msg.subject, msg.reply)
            return
        try:
            response = await answer(msg.subject, msg.headers, msg.data)
            if msg.reply:
                if self.reply_subjects.refused(msg.reply):
                    # A stream created while the script ran may capture it now.
                    self._refused_reply(msg.subject, msg.reply)
                    return
                await nc.publish(msg.reply, response.data, headers=response.headers)
        except Exception:
            log.exception("request failed inside the executor", subject=msg.subject)
            return
        reply = response.reply
        error = reply.error
        discovery.record(
            kind,
            elapsed_ns(started),
            error.message if reply.status == "rejected" and error else None,
        )

    async def _shed(self, nc: NatsClient, msg: Msg, replies: Replies) -> None:
        """Refuse a message at once, before even its signature is checked, when the replica
        already holds as many requests as it can: a flood, signed or not, cannot make the
        requests of others wait behind it. Unsigned (nothing was verified); counted."""
        self.metrics.request(
            subject=msg.subject,
            status="rejected",
            code="overloaded",
            key_id=None,
            seconds=0.0,
            reply_bytes=0,
        )
        if not msg.reply or self.reply_subjects.refused(msg.reply):
            return
        response = replies.rejected(
            Overloaded(SHED_MESSAGE),
            protocol.JSON,
            request_id=None,
            caller=None,
            started=time.perf_counter(),
        )
        with contextlib.suppress(Exception):
            await nc.publish(msg.reply, response.data, headers=response.headers)

    async def _drain(
        self, nc: NatsClient, handler: Handler, discovery: Discovery, jobs: JobWorker
    ) -> None:
        """Stop taking requests and jobs at once, give in-flight ones one grace period, answer
        the sync requests still running ``worker_lost``, hand unfinished jobs back, then drain
        NATS.

        Every step that talks to the server is bounded: with the server gone, a drain would
        wait for a reconnection that may never come.
        """
        await jobs.stop_fetching()
        for subscription in self._subscriptions:
            await _bounded(subscription.drain(), "unsubscribe")  # type: ignore[no-untyped-call]
        await _bounded(discovery.stop(), "discovery stop")
        await wait_within(
            set(self._tasks) | jobs.running, self.settings.shutdown_grace, self._stop_now
        )
        await jobs.hand_back()
        if self._tasks:
            log.warning("grace period over; cutting in-flight requests", count=len(self._tasks))
            handler.cut.set()
            await wait_within(set(self._tasks), CUT_REPLY_TIMEOUT)
            for task in self._tasks:
                task.cancel()
        await _bounded(nc.drain(), "connection drain")


def check_isolation(settings: Settings, layers: list[LayerStatus]) -> None:
    """Log every isolation layer; refuse to serve with one missing if isolation is required."""
    missing = [layer for layer in layers if not layer.active]
    for layer in layers:
        log.info("isolation layer", layer=layer.name, active=layer.active, detail=layer.detail)
    if not missing:
        return
    names = ", ".join(layer.name for layer in missing)
    if settings.require_isolation:
        raise ConfigError(
            f"EXECUTOR_REQUIRE_ISOLATION=1 but these isolation layers are not active on this "
            f"host: {names} (run 'pyexec doctor' for details)"
        )
    log.warning(
        "ISOLATION INCOMPLETE: scripts run without some layers",
        missing=names,
        hint="run 'pyexec doctor'; set EXECUTOR_REQUIRE_ISOLATION=1 to refuse to start",
    )


async def _bounded(step: Coroutine[Any, Any, Any], what: str) -> None:
    """Await a shutdown step for at most DRAIN_STEP_TIMEOUT seconds; log if it fails."""
    try:
        async with asyncio.timeout(DRAIN_STEP_TIMEOUT):
            await step
    except Exception as exc:  # noqa: BLE001 - shutdown goes on whatever a step raised
        log.warning("shutdown step did not finish", step=what, error=repr(exc))
