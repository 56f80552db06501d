"""Signed API keys: the canonical string, signing, and checking with a replay cache."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from consumer.config import Keyring
from consumer.errors import Overloaded, Unauthorized

KEY_ID_HEADER = "Pyexec-Key-Id"
TIMESTAMP_HEADER = "Pyexec-Timestamp"
NONCE_HEADER = "Pyexec-Nonce"
SIGNATURE_HEADER = "Pyexec-Signature"
SIGNATURE_HEADERS = (KEY_ID_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)
WINDOW_SECONDS = 60

_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")
_NONCE = re.compile(r"^(?:[0-9a-f]{2}){16,64}$")
_SIGNATURE = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def canonical(subject: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """The bytes that are signed: version, subject, timestamp, nonce and the body's SHA-256."""
    digest = hashlib.sha256(body).hexdigest()
    return f"v1\n{subject}\n{timestamp}\n{nonce}\n{digest}".encode()


def signature(secret: bytes, subject: str, timestamp: str, nonce: str, body: bytes) -> str:
    return hmac.new(secret, canonical(subject, timestamp, nonce, body), hashlib.sha256).hexdigest()


def sign(
    key_id: str,
    secret: bytes,
    subject: str,
    body: bytes,
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The four signature headers for ``body`` published to ``subject``."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    nonce = secrets.token_hex(16) if nonce is None else nonce
    return {
        KEY_ID_HEADER: key_id,
        TIMESTAMP_HEADER: stamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: signature(secret, subject, stamp, nonce, body),
    }


class Verifier:
    """Checks signature headers; remembers nonces long enough to refuse replays.

    A nonce is kept for twice the clock window after it was accepted: a message accepted
    at time t carries a timestamp of at least t - 60 s, so it can never be valid after
    t + 120 s. The cache holds at most ``capacity`` nonces; a replica that would need more
    answers ``overloaded`` rather than forget a nonce that could still be replayed.
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
        found = {name.lower(): value for name, value in (headers or {}).items()}
        values = []
        for name in SIGNATURE_HEADERS:
            value = found.get(name.lower())
            if not value:
                raise Unauthorized("missing_header", f"the {name} header is missing")
            values.append(value)
        key_id, stamp, nonce, given = values
        for name, value, pattern in (
            (KEY_ID_HEADER, key_id, _KEY_ID),
            (TIMESTAMP_HEADER, stamp, _TIMESTAMP),
            (NONCE_HEADER, nonce, _NONCE),
            (SIGNATURE_HEADER, given, _SIGNATURE),
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
        if abs(now - int(stamp)) > self._window:
            raise Unauthorized(
                "stale_timestamp",
                f"the timestamp is more than {self._window} s from the executor's clock",
            )
        if remember:
            self._remember(nonce)
        return key_id

    def _remember(self, nonce: str) -> None:
        now = self._monotonic()
        while self._nonces:
            oldest, expires = next(iter(self._nonces.items()))
            if expires > now:
                break
            del self._nonces[oldest]
        if nonce in self._nonces:
            raise Unauthorized("replayed_nonce", "the nonce was already used (replay)")
        if len(self._nonces) >= self._capacity:
            raise Overloaded("too many signed requests in the replay window; retry shortly")
        self._nonces[nonce] = now + 2 * self._window
