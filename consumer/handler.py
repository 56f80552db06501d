"""One request from bytes to reply bytes: verify, decode, run, encode. Knows no NATS objects."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import msgspec
import structlog

from consumer import protocol, tracing
from consumer.admission import Admission
from consumer.auth import KEY_ID_HEADER, Verifier
from consumer.catalog import Catalog
from consumer.config import Settings
from consumer.errors import InvalidRequest, Overloaded, Rejected, Unauthorized
from consumer.metrics import Metrics
from consumer.protocol import Encoding, ErrorBody, Reply
from sandbox import Job, Outcome, Pool, PoolError

log = structlog.get_logger("pyexec.request")

SERVICE_ERROR_HEADER = "Nats-Service-Error"
SERVICE_ERROR_CODE_HEADER = "Nats-Service-Error-Code"
# Room left in a message for the reply's own fields and headers around the result.
REPLY_OVERHEAD = 16 * 1024


@dataclass(frozen=True)
class Response:
    """What goes back on the reply subject, plus what the service counts and logs."""

    data: bytes
    headers: dict[str, str] | None
    reply: Reply
    auth_failure: str | None = None
    wait_ms: float = 0.0
    handling_ms: float = 0.0
    ran: bool = False  # a script ran (its wait and run times are real)


class Handler:
    """Turns one request on ``<prefix>.code`` or ``<prefix>.named`` into its reply."""

    def __init__(
        self,
        settings: Settings,
        verifier: Verifier,
        catalog: Catalog,
        pool: Pool,
        *,
        max_payload: int,
        metrics: Metrics,
        admission: Admission,
    ) -> None:
        self.settings = settings
        self.verifier = verifier
        self.catalog = catalog
        self.pool = pool
        self.max_payload = max_payload
        self.metrics = metrics
        self.admission = admission
        self._kinds = {
            settings.subject("code"): ("code", False),
            settings.subject("named"): ("named", False),
            settings.subject("jobs.code"): ("code", True),
            settings.subject("jobs.named"): ("named", True),
        }
        self.submit: Submit | None = None

    async def handle(
        self,
        subject: str,
        headers: Mapping[str, str] | None,
        body: bytes,
        *,
        stored_at: float | None = None,
        job_id: str | None = None,
    ) -> Response:
        """Answer one request, or run one job taken from the jobs stream (``job_id`` set,
        ``stored_at`` the time the stream stored it); never raises for anything a caller sends.

        Every request is counted, logged in one canonical line, and answered with the
        ``traceparent`` of the executor's span.
        """
        started = time.perf_counter()
        trace = tracing.continue_from(headers)
        structlog.contextvars.bind_contextvars(**trace.log_fields())
        response = await self._handle(
            subject, headers, body, stored_at=stored_at, job_id=job_id, trace=trace, started=started
        )
        response = dataclasses.replace(
            response, headers={**(response.headers or {}), **trace.headers()}
        )
        reply = response.reply
        code = reply.error.code if reply.error else None
        structlog.contextvars.bind_contextvars(request_id=reply.request_id)
        self.metrics.request(
            subject=subject if subject in self._kinds else "other",
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
        log.info(
            "request",
            subject=subject,
            status=reply.status,
            error_code=code,
            auth_failure=response.auth_failure,
            duration_ms=reply.duration_ms,
            wait_ms=round(response.wait_ms, 3),
            total_ms=round((time.perf_counter() - started) * 1000, 3),
            reply_bytes=len(response.data),
        )
        return response

    async def _handle(
        self,
        subject: str,
        headers: Mapping[str, str] | None,
        body: bytes,
        *,
        stored_at: float | None,
        job_id: str | None,
        trace: tracing.Trace,
        started: float,
    ) -> Response:
        content_type = protocol.header(headers, "Content-Type")
        # The reply's encoding; whether the request's Content-Type is acceptable is checked
        # after the signature, so that an unsigned request is always 'unauthorized'.
        encoding = protocol.reply_encoding(content_type)
        request_id: str | None = None
        try:
            # A job may be delivered again: its replay protection is the job id, not the nonce.
            self.verifier.verify(
                subject, headers, body, reference_time=stored_at, remember=job_id is None
            )
            protocol.encoding_of(content_type)
            if subject not in self._kinds:
                raise InvalidRequest(f"subject '{subject}' is not served here")
            kind, is_job = self._kinds[subject]
            request = protocol.decode_request(
                kind,
                body,
                encoding,
                max_bytes=self.settings.max_request_bytes,
                max_depth=self.settings.max_ctx_depth,
            )
            request_id = request.request_id or str(uuid.uuid4())
            structlog.contextvars.bind_contextvars(request_id=request_id)
            if request.mode == "async" and not is_job:
                if self.submit is None:
                    raise InvalidRequest("mode 'async' is not enabled on this executor")
                self._job(request, self.settings.max_job_timeout)  # refuse now what would fail
                new_job = job_id_for(request.request_id)
                structlog.contextvars.bind_contextvars(job_id=new_job)
                await self.submit(kind, body, content_type, new_job, trace.headers())
                self.metrics.jobs_submitted.inc()
                accepted = Reply(request_id=request_id, job_id=new_job, status="accepted")
                return self._respond(accepted, encoding, None, started)
            cap = self.settings.max_job_timeout if is_job else self.settings.max_timeout
            job = self._job(request, cap)
            self.metrics.runs_in_flight.inc()
            try:
                async with self.admission.slot(job=is_job) as waited:
                    outcome = await self.pool.run(job)
            except PoolError as exc:
                raise Overloaded(f"the executor cannot run scripts right now: {exc}") from None
            finally:
                self.metrics.runs_in_flight.dec()
        except Rejected as exc:
            if request_id is None and len(body) <= self.settings.max_request_bytes:
                # Echo the caller's id where the body carries a usable one.
                request_id = protocol.request_id_of(body, encoding)
            reply = Reply(
                request_id=request_id or str(uuid.uuid4()),
                job_id=job_id,
                status="rejected",
                error=ErrorBody(code=exc.code, type=type(exc).__name__, message=str(exc)),
            )
            failure = exc.reason if isinstance(exc, Unauthorized) else None
            return self._respond(reply, encoding, exc.http, started, failure)
        except Exception:
            # A defect of ours, not of the request: log it, and still answer the caller.
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
            return self._respond(reply, encoding, None, started)
        return self._respond(
            self._reply(request_id, outcome, job_id),
            encoding,
            None,
            started,
            wait_ms=waited * 1000 + outcome.wait_ms,
            ran=True,
        )

    def _job(self, request: protocol.Request, cap: float) -> Job:
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

    @staticmethod
    def _reply(request_id: str, outcome: Outcome, job_id: str | None = None) -> Reply:
        error = None
        if outcome.error is not None:
            error = ErrorBody(
                code=outcome.error.code,
                type=outcome.error.type,
                message=outcome.error.message,
                traceback=outcome.error.traceback,
            )
        return Reply(
            request_id=request_id,
            job_id=job_id,
            status=outcome.status,
            result=outcome.result,
            error=error,
            stdout=outcome.stdout,
            duration_ms=round(outcome.duration_ms, 3),
        )

    def _respond(
        self,
        reply: Reply,
        encoding: Encoding,
        http: int | None,
        started: float,
        auth_failure: str | None = None,
        *,
        wait_ms: float = 0.0,
        ran: bool = False,
    ) -> Response:
        if reply.status == "rejected" and http is None:
            http = 400
        try:
            data = protocol.encode(reply, encoding)
        except (OverflowError, TypeError, ValueError) as exc:
            reply = _replaced(
                reply, "result_not_serializable", f"the result cannot be encoded: {exc}"
            )
            data = protocol.encode(reply, encoding)
        if len(data) + REPLY_OVERHEAD > self.max_payload:
            size = len(data)
            reply = _replaced(
                reply,
                "output_limit",
                f"the reply would be {size} bytes, over the connection's limit of "
                f"{self.max_payload} bytes; return less data",
            )
            data = protocol.encode(reply, encoding)
            if len(data) + REPLY_OVERHEAD > self.max_payload:
                reply = msgspec.structs.replace(reply, stdout="[stdout dropped: too large]")
                data = protocol.encode(reply, encoding)
        headers = None
        if reply.status == "rejected" and reply.error is not None:
            headers = {
                SERVICE_ERROR_HEADER: _header_value(reply.error.message),
                SERVICE_ERROR_CODE_HEADER: str(http),
            }
        if encoding == protocol.MSGPACK:
            headers = {**(headers or {}), "Content-Type": protocol.MSGPACK_CONTENT_TYPE}
        return Response(
            data=data,
            headers=headers,
            reply=reply,
            auth_failure=auth_failure,
            wait_ms=wait_ms,
            handling_ms=(time.perf_counter() - started) * 1000,
            ran=ran,
        )


# kind ("code"/"named"), body, Content-Type, job id, trace headers: store the job or raise.
Submit = Callable[[str, bytes, str | None, str, dict[str, str]], Awaitable[None]]
_JOB_NAMESPACE = uuid.UUID("6f1c3a52-9d8e-4b7a-a1c4-2f5e8d9b0c31")


def job_id_for(request_id: str | None) -> str:
    """A job id that is a plain subject token: the same for a retried request id."""
    if request_id is None:
        return uuid.uuid4().hex
    return uuid.uuid5(_JOB_NAMESPACE, request_id).hex


def _header_value(text: str, limit: int = 512) -> str:
    """Text safe for a NATS header value: one line, printable, bounded."""
    flat = "".join(ch if ch.isprintable() else " " for ch in text)
    return flat[:limit]


_ERROR_TYPES = {"output_limit": "OutputLimit", "result_not_serializable": "NotSerializable"}


def _replaced(reply: Reply, code: str, message: str) -> Reply:
    """The same reply turned into an error without its result; stdout is kept."""
    return Reply(
        request_id=reply.request_id,
        job_id=reply.job_id,
        status="error",
        error=ErrorBody(code=code, type=_ERROR_TYPES[code], message=message),
        stdout=reply.stdout,
        duration_ms=reply.duration_ms,
    )
