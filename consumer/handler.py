"""One request from bytes to a reply: verify, decide (reject, run, submit), answer.

Knows no NATS objects. Request-reply messages come in through :meth:`Handler.handle`; jobs the
job worker took from the jobs stream and admitted come in through :meth:`Handler.run_job`. The
reply bytes, their headers and their signature come from :mod:`consumer.replies`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

import msgspec
import structlog

from consumer import logs, protocol, tracing
from consumer.auth import KEY_ID_HEADER, Caller, Verifier
from consumer.catalog import Catalog, shown
from consumer.config import Settings
from consumer.errors import InvalidRequest, Overloaded, Rejected
from consumer.files import FileStore
from consumer.metrics import Metrics
from consumer.nonces import NonceStore, authenticate
from consumer.protocol import Encoding, ErrorBody, Reply
from consumer.replies import Replies, Response, from_outcome
from sandbox import Capacity, CapacityFull, Job, OnProgress, Outcome, Pool, PoolError, Slot

log = structlog.get_logger("pyexec.request")


@dataclass(frozen=True)
class Submission:
    """A verified ``mode: "async"`` request to store as a job."""

    kind: str
    body: bytes
    headers: Mapping[str, str]
    caller: Caller
    request_id: str
    generated_id: bool  # the executor made the request id: the body carries none
    trace: dict[str, str]


@dataclass(frozen=True)
class Ran:
    """A run's reply, how long it waited for a worker, and the warm parent it was forked from."""

    reply: Reply
    wait_ms: float
    tier: str | None


def request_fields(request: protocol.Request) -> dict[str, str]:
    """What a request adds to its log lines: the named script's name, on named runs."""
    if isinstance(request, protocol.NamedRequest):
        return {"script": shown(request.name)}
    return {}


# Stores the job (or finds it stored before) and returns its job id; raises Rejected.
Submit = Callable[[Submission], Awaitable[str]]


@dataclass(frozen=True)
class AdmittedJob:
    """A job taken from the jobs stream whose signature and job id the job worker checked."""

    subject: str
    headers: Mapping[str, str] | None
    kind: str
    caller: Caller
    request_id: str
    job_id: str
    encoding: Encoding
    request: protocol.Request | None  # None: the body is invalid (``invalid``)
    invalid: Rejected | None = None


class Handler:
    """Turns one request on ``<prefix>.code`` or ``<prefix>.named`` into its reply."""

    def __init__(
        self,
        settings: Settings,
        *,
        verifier: Verifier,
        nonces: NonceStore,
        catalog: Catalog,
        pool: Pool,
        replies: Replies,
        metrics: Metrics,
        capacity: Capacity,
        submit: Submit | None,
        files: FileStore | None = None,
    ) -> None:
        self.settings = settings
        self.verifier = verifier
        self.nonces = nonces
        self.catalog = catalog
        self.pool = pool
        self.replies = replies
        self.metrics = metrics
        self.capacity = capacity
        self.submit = submit
        self.files = files
        self._kinds = {settings.subject("code"): "code", settings.subject("named"): "named"}
        # Set when a stopping replica's grace period is over: sync runs still going are cut
        # and answered 'worker_lost'.
        self.cut = asyncio.Event()

    async def handle(
        self, subject: str, headers: Mapping[str, str] | None, body: bytes
    ) -> Response:
        """Answer one request-reply message and log its canonical line; never raises for
        anything a caller sends."""
        started = time.perf_counter()
        trace = tracing.continue_from(headers)
        structlog.contextvars.bind_contextvars(**trace.log_fields())
        claimed = protocol.header(headers, KEY_ID_HEADER)
        if claimed in self.settings.keys.ids:
            # A configured id only: whatever else the header holds is the caller's text.
            structlog.contextvars.bind_contextvars(key_id=claimed)
        response = await self._observed(
            subject, headers, trace, started, self._request(subject, headers, body, trace, started)
        )
        structlog.contextvars.bind_contextvars(request_id=response.reply.request_id)
        logs.canonical(
            log,
            "request",
            subject=subject,
            **response.log_fields(),
            total_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return response

    async def run_job(
        self,
        job: AdmittedJob,
        on_progress: OnProgress | None = None,
        *,
        trace: tracing.Trace | None = None,
    ) -> Response:
        """Run an admitted job and return its completion; ``on_progress`` gets the script's
        progress reports, ``trace`` is the job's span. The job worker writes its canonical
        line."""
        started = time.perf_counter()
        trace = trace or tracing.continue_from(job.headers)
        return await self._observed(
            job.subject, job.headers, trace, started, self._job(job, started, on_progress)
        )

    async def _observed(
        self,
        subject: str,
        headers: Mapping[str, str] | None,
        trace: tracing.Trace,
        started: float,
        answer: Awaitable[Response],
    ) -> Response:
        """Count, and answer with the ``traceparent`` of the executor's span."""
        response = await answer
        response = replace(response, headers={**(response.headers or {}), **trace.headers()})
        reply = response.reply
        code = reply.error.code if reply.error else None
        known = subject in self._kinds or subject.startswith(self.settings.subject("jobs."))
        self.metrics.request(
            subject=subject if known else "other",
            status=reply.status,
            code=code,
            key_id=protocol.header(headers, KEY_ID_HEADER),
            seconds=time.perf_counter() - started,
            reply_bytes=len(response.data),
        )
        if response.auth_failure is not None:
            self.metrics.auth_failures.labels(reason=response.auth_failure).inc()
        if response.ran:
            self.metrics.run(
                subject=subject,
                wait_seconds=response.wait_ms / 1000,
                run_seconds=(reply.duration_ms or 0.0) / 1000,
            )
        return response

    async def _request(
        self,
        subject: str,
        headers: Mapping[str, str] | None,
        body: bytes,
        trace: tracing.Trace,
        started: float,
    ) -> Response:
        content_type = protocol.header(headers, "Content-Type")
        # The reply's encoding; whether the request's Content-Type is acceptable is checked
        # after the signature, so that an unsigned request is always 'unauthorized'.
        encoding = protocol.reply_encoding(content_type)
        caller: Caller | None = None
        request_id: str | None = None
        try:
            caller, refused = await authenticate(self.verifier, self.nonces, subject, headers, body)
            if refused is not None:
                raise refused
            assert caller is not None
            protocol.encoding_of(content_type)
            kind = self._kinds.get(subject)
            if kind is None:
                raise InvalidRequest(f"subject '{subject}' is not served here")
            request = protocol.decode_request(
                kind,
                body,
                encoding,
                max_bytes=self.settings.max_request_bytes,
                max_depth=self.settings.max_ctx_depth,
            )
            request_id = request.request_id or str(uuid.uuid4())
            structlog.contextvars.bind_contextvars(request_id=request_id, **request_fields(request))
            if request.mode == "async":
                job_id = await self._submit(
                    kind, body, headers, request, caller=caller, request_id=request_id, trace=trace
                )
                accepted = Reply(request_id=request_id, job_id=job_id, status="accepted")
                return self.replies.respond(accepted, encoding, caller=caller, started=started)
            ran = await self._execute(
                request, caller, request_id, None, cap=self.settings.max_timeout
            )
        except Rejected as exc:
            return self._rejected(
                exc,
                body,
                encoding,
                request_id=request_id,
                job_id=None,
                caller=caller,
                started=started,
            )
        except Exception:  # noqa: BLE001 - a defect of ours: log it, and still answer
            return self._failed(request_id, None, encoding, caller, started)
        if ran is None:
            return self._cut(request_id, encoding, caller, started)
        return self._ran(ran, encoding, caller, started)

    async def _execute(
        self,
        request: protocol.Request,
        caller: Caller,
        request_id: str,
        job_id: str | None,
        *,
        cap: float,
        on_progress: OnProgress | None = None,
    ) -> Ran | None:
        """Stage the request's files, run it, store what it left in ``out/``: its reply, the
        milliseconds it waited and its tier; None if a sync run was cut (the replica is stopping).
        The files are fetched and stored while the request holds its worker slot, so what a
        replica holds of them is bounded by its workers, as runs are."""
        job = self._job_of(request, cap)
        if request.files:
            self._files().check_names(caller.key_id, request.files)
        async with self._slot(is_job=job_id is not None) as slot:
            staged = None
            if request.files:
                staged = await self._files().stage(caller.key_id, request.files)
                job = msgspec.structs.replace(job, inputs=staged.inputs)
            try:
                outcome = await self._run(
                    job, slot, is_job=job_id is not None, on_progress=on_progress
                )
            finally:
                if staged is not None:
                    staged.close()
            if outcome is None:
                return None
            reply = from_outcome(request_id, outcome, job_id)
            if outcome.files or request.files is not None:
                reply = await self._with_outputs(reply, outcome, caller, job_id or request_id)
        return Ran(reply, slot.waited * 1000 + outcome.wait_ms, outcome.tier or None)

    async def _with_outputs(
        self, reply: Reply, outcome: Outcome, caller: Caller, run_id: str
    ) -> Reply:
        """The reply listing the run's ``out/`` files, once stored."""
        try:
            stored = await self._files().put_outputs(caller.key_id, run_id, outcome.files)
        except Exception as exc:  # noqa: BLE001 - the store failed: the outputs are lost
            log.warning("storing the run's output files failed", error=repr(exc))
            return msgspec.structs.replace(
                reply,
                status="error",
                result=None,
                error=ErrorBody(
                    code="worker_lost",
                    type="WorkerLost",
                    message="the script's files in out/ could not be stored; run it again",
                ),
            )
        return msgspec.structs.replace(reply, files=stored)

    def _files(self) -> FileStore:
        if self.files is None:
            raise InvalidRequest("files are not enabled on this executor")
        return self.files

    async def _submit(
        self,
        kind: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        request: protocol.Request,
        *,
        caller: Caller,
        request_id: str,
        trace: tracing.Trace,
    ) -> str:
        if self.submit is None:
            raise InvalidRequest("mode 'async' is not enabled on this executor")
        self._job_of(request, self.settings.max_job_timeout)  # refuse now what would fail
        if request.files:
            await self._files().check(caller.key_id, request.files)
        job_id = await self.submit(
            Submission(
                kind=kind,
                body=body,
                headers=headers or {},
                caller=caller,
                request_id=request_id,
                generated_id=request.request_id is None,
                trace=trace.headers(),
            )
        )
        structlog.contextvars.bind_contextvars(job_id=job_id)
        self.metrics.jobs_submitted.inc()
        return job_id

    async def _job(
        self, job: AdmittedJob, started: float, on_progress: OnProgress | None
    ) -> Response:
        caller, encoding = job.caller, job.encoding
        try:
            if job.request is None:
                raise job.invalid or InvalidRequest("the job's body is not a valid request")
            ran = await self._execute(
                job.request,
                caller,
                job.request_id,
                job.job_id,
                cap=self.settings.max_job_timeout,
                on_progress=on_progress,
            )
        except Rejected as exc:
            return self._rejected(
                exc,
                b"",
                encoding,
                request_id=job.request_id,
                job_id=job.job_id,
                caller=caller,
                started=started,
            )
        except Exception:  # noqa: BLE001 - a defect of ours: log it, and still complete
            return self._failed(job.request_id, job.job_id, encoding, caller, started)
        assert ran is not None  # a job is never cut: it is handed back instead
        return self._ran(ran, encoding, caller, started)

    def _ran(self, ran: Ran, encoding: Encoding, caller: Caller, started: float) -> Response:
        response = self.replies.respond(
            ran.reply, encoding, caller=caller, started=started, wait_ms=ran.wait_ms, ran=True
        )
        return replace(response, tier=ran.tier)

    def _job_of(self, request: protocol.Request, cap: float) -> Job:
        timeout = self.settings.default_timeout if request.timeout is None else request.timeout
        if timeout > cap:
            raise InvalidRequest(f"timeout {timeout:g} s is over the limit of {cap:g} s")
        ctx = request.ctx or {}
        if isinstance(request, protocol.CodeRequest):
            source = request.code
        else:
            script = self.catalog.load(request.name)
            source, ctx = script.source, script.check(request.name, ctx)
        return Job(source=source, ctx=ctx, timeout=timeout)

    @contextlib.asynccontextmanager
    async def _slot(self, *, is_job: bool) -> AsyncIterator[Slot]:
        """A worker slot for one request, counted in flight. A synchronous request waits a
        bounded time in a bounded queue, else is refused ``overloaded``; a job waits."""
        self.metrics.runs_in_flight.inc()
        try:
            async with self.capacity.slot(bounded=not is_job) as slot:
                yield slot
        except CapacityFull as exc:
            raise Overloaded(str(exc)) from None
        finally:
            self.metrics.runs_in_flight.dec()

    async def _run(
        self, job: Job, slot: Slot, *, is_job: bool, on_progress: OnProgress | None = None
    ) -> Outcome | None:
        """Run ``job`` in the pool (the caller holds a worker slot). A sync run still going
        when :attr:`cut` is set is stopped (its child killed): None."""
        running = asyncio.ensure_future(self.pool.run(job, on_progress, slot=slot))
        try:
            if is_job:
                return await running
            cut = asyncio.ensure_future(self.cut.wait())
            try:
                await asyncio.wait({running, cut}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                cut.cancel()
            if not running.done():
                return None
            return running.result()
        except PoolError as exc:
            raise Overloaded(f"the executor cannot run scripts right now: {exc}") from None
        finally:
            # Cut, or this request cancelled: the run ends before its slot is given back.
            if not running.done():
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)

    def _rejected(
        self,
        exc: Rejected,
        body: bytes,
        encoding: Encoding,
        *,
        request_id: str | None,
        job_id: str | None,
        caller: Caller | None,
        started: float,
    ) -> Response:
        if request_id is None and body and len(body) <= self.settings.max_request_bytes:
            # Echo the caller's id where the body carries a usable one.
            request_id = protocol.request_id_of(body, encoding)
        return self.replies.rejected(
            exc, encoding, request_id=request_id, job_id=job_id, caller=caller, started=started
        )

    def _failed(
        self,
        request_id: str | None,
        job_id: str | None,
        encoding: Encoding,
        caller: Caller | None,
        started: float,
    ) -> Response:
        log.exception("request failed inside the executor")
        reply = Reply(
            request_id=request_id or str(uuid.uuid4()),
            job_id=job_id,
            status="error",
            error=ErrorBody(
                code="worker_lost",
                type="InternalError",
                message="the executor failed while handling the request; see its logs",
            ),
        )
        return self.replies.respond(reply, encoding, caller=caller, started=started)

    def _cut(
        self, request_id: str, encoding: Encoding, caller: Caller | None, started: float
    ) -> Response:
        log.warning("run cut short: the replica is stopping")
        reply = Reply(
            request_id=request_id,
            status="error",
            error=ErrorBody(
                code="worker_lost",
                type="WorkerLost",
                message="the replica stopped before the script finished; nothing was kept, "
                "send the request again",
            ),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return self.replies.respond(reply, encoding, caller=caller, started=started)
