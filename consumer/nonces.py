"""The fleet-wide replay store: a signed message is accepted at most once by the whole fleet.

Every accepted nonce becomes a key ``<key id>.<nonce>`` in the ``PYEXEC_NONCES`` bucket,
written with "create only if absent", and the bucket forgets keys after twice the clock window
(a message can never be valid longer). The replica that writes the key first takes the message;
any other replica, or the same one, refuses it as a replay. When the bucket cannot be reached
the request is answered ``overloaded`` rather than accepted unchecked (fail closed).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Protocol

import structlog
from nats.errors import Error as NatsError
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from consumer.auth import Caller, Verifier
from consumer.errors import Overloaded, Rejected, Unauthorized
from consumer.streams import patiently

log = structlog.get_logger("pyexec.request")


class NonceStore(Protocol):
    async def claim(self, key_id: str, nonce: str) -> None:
        """Spend ``nonce`` for ``key_id`` or raise (:class:`Unauthorized` for a replay,
        :class:`Overloaded` when the store cannot tell)."""


class SharedNonces:
    """The replay store in a JetStream key-value bucket, shared by every replica."""

    def __init__(self, bucket: KeyValue, *, timeout: float) -> None:
        self._bucket = bucket
        self._timeout = timeout

    async def claim(self, key_id: str, nonce: str) -> None:
        key = f"{key_id}.{nonce}"
        # What this claim writes, so that a retry after a write whose answer was lost can tell
        # its own key from a replay's.
        token = secrets.token_hex(8).encode()
        attempts = 0

        async def create() -> None:
            nonlocal attempts
            attempts += 1
            try:
                await self._bucket.create(key, token)
            except KeyWrongLastSequenceError:
                if attempts > 1 and (await self._bucket.get(key)).value == token:
                    return
                raise

        try:
            await patiently(create, within=self._timeout)
        except KeyWrongLastSequenceError:
            raise Unauthorized("replayed_nonce", "the nonce was already used (replay)") from None
        except (TimeoutError, NatsError) as exc:
            log.warning("the replay store cannot be reached", error=repr(exc))
            raise Overloaded("the replay store cannot be reached; retry shortly") from None


async def authenticate(
    verifier: Verifier,
    nonces: NonceStore,
    subject: str,
    headers: Mapping[str, str] | None,
    body: bytes,
) -> tuple[Caller | None, Rejected | None]:
    """Check a request's signature and spend its nonce, on this replica and in the fleet.

    ``(caller, None)`` when it may go on; otherwise ``(whom to sign the refusal for, why)``: a
    request whose signature does not verify, or a replay, is refused unsigned (a signed refusal
    naming the original request could be passed off to its caller as the answer); one whose
    nonce cannot be checked for a replay now is refused ``overloaded``, signed.
    """
    try:
        verified = verifier.check(subject, headers, body)
    except Unauthorized as exc:
        return None, exc
    try:
        verifier.remember(verified.nonce)  # this replica's cheap first line
        await nonces.claim(verified.key_id, verified.nonce)  # the fleet's
    except Unauthorized as exc:
        return None, exc
    except Overloaded as exc:
        return verified, exc
    return verified, None
