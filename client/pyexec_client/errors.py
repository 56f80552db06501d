"""The client's exceptions, grouped by what the caller does about them.

::

    ClientError
    ├── ConnectError   NATS cannot be reached, or the connection is gone: check the URL, retry later
    ├── Timeout        no answer in time (also a TimeoutError): retry, or ask for the job's status
    ├── NoReplica      no executor listens on the subject: deploy or start one, retry later
    ├── Refused        the executor or a store refused the call: fix the call, do not retry as is
    └── BadReply       the answer is not the executor's for this request (unsigned, wrongly
                       signed, undecodable, or a file whose bytes do not match): do not trust it

A reply whose ``status`` is ``error``, ``timeout`` or ``rejected`` is not an exception: it is the
executor's signed answer and is returned as it is (``Reply.status``, ``Reply.error``).
"""

from __future__ import annotations

from nats.errors import (
    ConnectionClosedError,
    NoRespondersError,
    NoServersError,
    StaleConnectionError,
)
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NoStreamResponseError


class ClientError(Exception):
    """Root of every exception the client raises."""


class ConnectError(ClientError):
    """NATS could not be reached, or the connection was lost during the call."""


class Timeout(ClientError, TimeoutError):
    """No answer (reply, completion, acknowledgement) arrived within the time allowed."""


class NoReplica(ClientError):
    """No executor is listening on the subject (NATS had no responders)."""


class Refused(ClientError):
    """The call was refused: by the executor (a status or cancel request it rejects), or by
    the jobs stream or file store (a job id held by another message, a file not stored)."""


class BadReply(ClientError):
    """The answer cannot be trusted as the executor's answer to this request: it is not signed
    with this client's key for it, it cannot be decoded, or a file's bytes do not match."""


def from_nats(exc: BaseException, what: str) -> ClientError:
    """A NATS failure as the client error that says what to do about it."""
    if isinstance(exc, (NoRespondersError, NoStreamResponseError)):
        return NoReplica(f"{what}: nothing answered (is the executor deployed?)")
    if isinstance(exc, (NatsTimeout, TimeoutError)):
        return Timeout(f"{what}: no answer in time")
    if isinstance(exc, (ConnectionClosedError, NoServersError, StaleConnectionError)):
        return ConnectError(f"{what}: the connection to NATS is gone ({type(exc).__name__})")
    return Refused(f"{what}: {exc!r}")
