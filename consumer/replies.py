"""Reply bodies and headers: from a sandbox outcome or a refusal to signed bytes on the wire.

The handler decides what the answer is; this module turns it into what is sent: the contract's
status and error codes (the sandbox has its own vocabulary), the encoding the request asked for,
a body that fits in a message, the micro error headers of a rejection, and the reply signature
for a request whose signature verified.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from consumer import protocol
from consumer.auth import Caller
from consumer.errors import AuthFailure, Rejected, Unauthorized
from consumer.protocol import Encoding, ErrorBody, Reply
from sandbox import Outcome

SERVICE_ERROR_HEADER = "Nats-Service-Error"
SERVICE_ERROR_CODE_HEADER = "Nats-Service-Error-Code"
# Room left in a message for the reply's own fields and headers around the result.
REPLY_OVERHEAD = 16 * 1024
# Sandbox outcomes that mean nothing ran: answered 'rejected' with this contract code.
_REFUSED = {"missing_entry_point": "invalid_request"}
_ERROR_TYPES = {"output_limit": "OutputLimit", "result_not_serializable": "NotSerializable"}


@dataclass(frozen=True)
class Response:
    """What goes back on the reply subject, plus what the service counts and logs."""

    data: bytes
    headers: dict[str, str] | None
    reply: Reply
    auth_failure: AuthFailure | None = None
    wait_ms: float = 0.0
    handling_ms: float = 0.0
    ran: bool = False  # a script ran (its wait and run times are real)
    tier: str | None = None  # the warm parent the run was forked from

    def log_fields(self) -> dict[str, Any]:
        """The outcome and timings on the canonical line of the request or job."""
        reply = self.reply
        fields: dict[str, Any] = {
            "status": reply.status,
            "error_code": reply.error.code if reply.error else None,
            "auth_failure": self.auth_failure,
            "duration_ms": reply.duration_ms,
            "wait_ms": round(self.wait_ms, 3),
            "reply_bytes": len(self.data),
        }
        if self.tier is not None:
            fields["tier"] = self.tier
        return fields


def from_outcome(request_id: str, outcome: Outcome, job_id: str | None = None) -> Reply:
    """The reply for a finished run, in the contract's terms."""
    error = None
    status: protocol.Status = outcome.status
    if outcome.error is not None:
        code: str = outcome.error.code
        if code in _REFUSED:
            status, code = "rejected", _REFUSED[code]
        error = ErrorBody(
            code=code,
            type=outcome.error.type,
            message=outcome.error.message,
            traceback=outcome.error.traceback,
        )
    return Reply(
        request_id=request_id,
        job_id=job_id,
        status=status,
        result=outcome.result if status == "ok" else None,
        error=error,
        stdout=outcome.stdout,
        duration_ms=round(outcome.duration_ms, 3),
    )


class Replies:
    """Encodes replies for one connection's max payload, and signs them."""

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload

    def respond(
        self,
        reply: Reply,
        encoding: Encoding,
        *,
        caller: Caller | None,
        started: float,
        http: int | None = None,
        auth_failure: AuthFailure | None = None,
        wait_ms: float = 0.0,
        ran: bool = False,
    ) -> Response:
        """The reply as sent: encoded, cut to fit, with micro error headers on a rejection,
        and signed for ``caller`` (None: the request's signature did not verify)."""
        if reply.status == "rejected" and http is None:
            http = 400
        data, reply = self._fit(reply, encoding)
        headers: dict[str, str] = {}
        if reply.status == "rejected" and reply.error is not None:
            headers[SERVICE_ERROR_HEADER] = _header_value(reply.error.message)
            headers[SERVICE_ERROR_CODE_HEADER] = str(http)
        if encoding == protocol.MSGPACK:
            headers["Content-Type"] = protocol.MSGPACK_CONTENT_TYPE
        if caller is not None:
            headers.update(caller.sign_reply(data))
        return Response(
            data=data,
            headers=headers or None,
            reply=reply,
            auth_failure=auth_failure,
            wait_ms=wait_ms,
            handling_ms=(time.perf_counter() - started) * 1000,
            ran=ran,
        )

    def rejected(
        self,
        exc: Rejected,
        encoding: Encoding,
        *,
        request_id: str | None,
        job_id: str | None = None,
        caller: Caller | None,
        started: float,
    ) -> Response:
        """The ``rejected`` reply for ``exc`` (a new request id when there is none to echo)."""
        reply = Reply(
            request_id=request_id or str(uuid.uuid4()),
            job_id=job_id,
            status="rejected",
            error=ErrorBody(code=exc.code, type=type(exc).__name__, message=str(exc)),
        )
        return self.respond(
            reply,
            encoding,
            caller=caller,
            started=started,
            http=exc.http,
            auth_failure=exc.reason if isinstance(exc, Unauthorized) else None,
        )

    def signed(
        self,
        data: bytes,
        logged: Reply,
        encoding: Encoding,
        *,
        caller: Caller,
        started: float,
    ) -> Response:
        """An answer already encoded (not a reply body), signed for ``caller``; ``logged`` is
        what the service counts and logs for it."""
        headers = caller.sign_reply(data)
        if encoding == protocol.MSGPACK:
            headers["Content-Type"] = protocol.MSGPACK_CONTENT_TYPE
        return Response(
            data=data,
            headers=headers,
            reply=logged,
            handling_ms=(time.perf_counter() - started) * 1000,
        )

    def _fit(self, reply: Reply, encoding: Encoding) -> tuple[bytes, Reply]:
        """Encode ``reply``; one that cannot be encoded or is too big becomes an error."""
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
                f"{self.max_payload} bytes; return less data, or write it to a file in out/ "
                "(stored and listed in the reply's files)",
            )
            data = protocol.encode(reply, encoding)
            if len(data) + REPLY_OVERHEAD > self.max_payload:
                reply = msgspec.structs.replace(reply, stdout="[stdout dropped: too large]")
                data = protocol.encode(reply, encoding)
        return data, reply


def _header_value(text: str, limit: int = 512) -> str:
    """Text safe for a NATS header value: one line, printable, bounded."""
    flat = "".join(ch if ch.isprintable() else " " for ch in text)
    return flat[:limit]


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
