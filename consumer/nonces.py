"""The fleet-wide replay store: a signed message is accepted at most once by the whole fleet.

Every accepted nonce becomes a key ``<key id>.<nonce>`` in the ``PYEXEC_NONCES`` bucket,
written with "create only if absent", and the bucket forgets keys after twice the clock window
(a message can never be valid longer). The replica that writes the key first takes the message;
any other replica, or the same one, refuses it as a replay. When the bucket cannot be reached
the request is answered ``overloaded`` rather than accepted unchecked (fail closed).
"""

from __future__ import annotations

import secrets
from typing import Protocol

import structlog
from nats.errors import Error as NatsError
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from consumer.errors import Overloaded, Unauthorized
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
