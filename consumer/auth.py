"""Checking signed requests, and signing the answers to them.

The canonical strings, signing and reply verification are the client package's
(:mod:`pyexec_client.signing`), so both ends compute them with the same code.

A request is checked by :class:`Verifier` (signature, clock window, a per-replica replay cache);
the fleet-wide replay store is :mod:`consumer.nonces`. Replies and completions to a verified
request are signed with the caller's own key (:meth:`Caller.sign_reply`), so that a caller can check
that an answer came from a holder of its key and belongs to its request (:func:`verify_reply`).
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pyexec_client import signing
from pyexec_client.signing import (
    KEY_ID,
    KEY_ID_HEADER,
    NONCE,
    NONCE_HEADER,
    SIGNATURE,
    SIGNATURE_HEADER,
    SIGNATURE_HEADERS,
    TIMESTAMP,
    TIMESTAMP_HEADER,
    WINDOW_SECONDS,
    signature,
    verify_reply,
)

from consumer.config import Keyring
from consumer.errors import Unauthorized

__all__ = [
    "KEY_ID_HEADER",
    "NONCE_HEADER",
    "SIGNATURE_HEADER",
    "SIGNATURE_HEADERS",
    "TIMESTAMP_HEADER",
    "WINDOW_SECONDS",
    "Caller",
    "Verifier",
]

_CANONICAL_NAMES = {name.lower(): name for name in (*SIGNATURE_HEADERS, "Nats-Msg-Id")}


@dataclass(frozen=True)
class Caller:
    """Who signed a verified request, and what a reply to it is signed with."""

    key_id: str
    secret: bytes = field(repr=False)
    subject: str  # the subject the request was signed for
    nonce: str

    def sign_reply(self, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
        """The three headers that sign ``body`` as this request's answer."""
        return signing.sign_reply(
            self.key_id, self.secret, self.subject, self.nonce, body, timestamp=timestamp
        )

    def answered_by(self, headers: Mapping[str, str] | None, body: bytes) -> bool:
        """Whether ``body`` with ``headers`` is signed as this request's answer."""
        return verify_reply(
            self.secret,
            self.key_id,
            headers,
            body,
            request_subject=self.subject,
            request_nonce=self.nonce,
        )


class Verifier:
    """Checks signature headers; remembers nonces long enough to refuse replays.

    A nonce is kept for twice the clock window after it was accepted: a message accepted
    at time t carries a timestamp of at least t - 60 s, so it can never be valid after
    t + 120 s. The cache is the replica's cheap first line; the fleet-wide replay store
    (:mod:`consumer.nonces`) decides. It holds at most ``capacity`` nonces and forgets the
    oldest when full, so that no caller can fill it and lock the others out.
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        window: int = WINDOW_SECONDS,
        capacity: int = 200_000,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keyring = keyring
        self._window = window
        self._capacity = capacity
        self._clock = clock
        self._monotonic = monotonic
        self._nonces: OrderedDict[str, float] = OrderedDict()

    def verify(
        self,
        subject: str,
        headers: Mapping[str, str] | None,
        body: bytes,
        *,
        reference_time: float | None = None,
        remember: bool = True,
    ) -> str:
        """Return the key id that signed the message, or raise :class:`Unauthorized`."""
        caller = self.check(subject, headers, body, reference_time=reference_time)
        if remember:
            self.remember(caller.nonce)
        return caller.key_id

    def check(
        self,
        subject: str,
        headers: Mapping[str, str] | None,
        body: bytes,
        *,
        reference_time: float | None = None,
    ) -> Caller:
        """The verified signer of a message (its nonce not yet spent), or :class:`Unauthorized`.

        The clock window is symmetric in whole seconds: the executor's clock is truncated to
        a whole second, as callers' timestamps are, before the two are compared.
        """
        repeated = sorted(getattr(headers, "repeated", ()))
        if repeated:
            name = _CANONICAL_NAMES.get(repeated[0], repeated[0])
            raise Unauthorized("repeated_header", f"the {name} header appears more than once")
        found = {name.lower(): value for name, value in (headers or {}).items()}
        values = []
        for name in SIGNATURE_HEADERS:
            value = found.get(name.lower())
            if not value:
                raise Unauthorized("missing_header", f"the {name} header is missing")
            values.append(value)
        key_id, stamp, nonce, given = values
        for name, value, pattern in (
            (KEY_ID_HEADER, key_id, KEY_ID),
            (TIMESTAMP_HEADER, stamp, TIMESTAMP),
            (NONCE_HEADER, nonce, NONCE),
            (SIGNATURE_HEADER, given, SIGNATURE),
        ):
            if not pattern.fullmatch(value):
                raise Unauthorized("malformed_header", f"the {name} header is malformed")
        secret = self._keyring.secret(key_id)
        if secret is None:
            raise Unauthorized("unknown_key", "the key id is not known to this executor")
        expected = signature(secret, subject, stamp, nonce, body)
        if not hmac.compare_digest(expected, given):
            raise Unauthorized("bad_signature", "the signature does not match")
        now = self._clock() if reference_time is None else reference_time
        if abs(int(now) - int(stamp)) > self._window:
            raise Unauthorized(
                "stale_timestamp",
                f"the timestamp is more than {self._window} s from the executor's clock",
            )
        return Caller(key_id, secret, subject, nonce)

    def remember(self, nonce: str) -> None:
        """Spend ``nonce`` on this replica (raises :class:`Unauthorized` if it was spent)."""
        self._remember(nonce)

    def _remember(self, nonce: str) -> None:
        now = self._monotonic()
        while self._nonces:
            oldest, expires = next(iter(self._nonces.items()))
            if expires > now:
                break
            del self._nonces[oldest]
        if nonce in self._nonces:
            raise Unauthorized("replayed_nonce", "the nonce was already used (replay)")
        while len(self._nonces) >= self._capacity:
            self._nonces.popitem(last=False)
        self._nonces[nonce] = now + 2 * self._window
