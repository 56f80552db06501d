"""The consumer package's exceptions, grouped by what the caller does about them."""

from __future__ import annotations

from typing import ClassVar, Literal

AuthFailure = Literal[
    "missing_header",
    "malformed_header",
    "unknown_key",
    "bad_signature",
    "stale_timestamp",
    "replayed_nonce",
    "repeated_header",
]


class ConsumerError(Exception):
    """Root of every exception the consumer package raises."""


class ConfigError(ConsumerError):
    """The environment holds a setting that cannot be used; the message names the variable."""


class Rejected(ConsumerError):
    """A request that is answered ``rejected``: nothing ran.

    ``code`` is the contract's error code and ``http`` the number sent in the
    ``Nats-Service-Error-Code`` header.
    """

    code: ClassVar[str]
    http: ClassVar[int]


class Unauthorized(Rejected):
    """The signature headers are missing, malformed, wrong, stale or replayed."""

    code = "unauthorized"
    http = 401

    def __init__(self, reason: AuthFailure, message: str) -> None:
        super().__init__(message)
        self.reason: AuthFailure = reason


class InvalidRequest(Rejected):
    """The body does not follow the contract (shape, types, bounds, encoding)."""

    code = "invalid_request"
    http = 400


class UnknownScript(Rejected):
    """``pyexec.named`` was asked for a script that is not installed."""

    code = "unknown_script"
    http = 404


class Overloaded(Rejected):
    """The replica cannot take the request now; the caller may retry, elsewhere too."""

    code = "overloaded"
    http = 503


class Conflict(Rejected):
    """The same key and request id were submitted before with a different body."""

    code = "conflict"
    http = 409


class StoreUnavailable(ConsumerError):
    """A shared JetStream store (the job ledger) could not be read or written in time."""
