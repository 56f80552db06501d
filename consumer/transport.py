"""The replica's NATS connection: reconnection with back-off, and headers read as sent.

nats-py parses a message's headers into a dict, so a header that appears twice silently keeps
its last value. The replica's connection also reads the raw header block and marks the
``Pyexec-*`` names and ``Nats-Msg-Id`` that appear more than once, in any case
(:class:`Headers`), so that a message repeating one can be refused instead of being judged by
whichever copy came last.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.client import Server
from nats.errors import SlowConsumerError, StaleConnectionError, UnexpectedEOF

from consumer.metrics import Metrics

log = structlog.get_logger("pyexec.service")

# Reconnection delays in seconds: first try, base of the doubling, and its cap.
RECONNECT_FIRST = 0.1
RECONNECT_BASE = 0.25
RECONNECT_CAP = 5.0
CHECKED_PREFIX = "pyexec-"
# JetStream deduplicates by the first Nats-Msg-Id header, in its exact case: a job carrying two
# must not be judged by another one.
CHECKED_NAMES = frozenset({"nats-msg-id"})


class Headers(dict[str, str]):
    """A message's headers as nats-py parsed them, with the ``Pyexec-*`` names (lowercase) that
    the raw block held more than once."""

    repeated: frozenset[str] = frozenset()


def repeated_names(raw: bytes) -> frozenset[str]:
    """The ``Pyexec-*`` header names (lowercase) a raw ``NATS/1.0`` header block repeats."""
    lines = raw.split(b"\r\n")[1:]  # the first line is the version (and an inline status)
    names = Counter(
        name.strip().lower().decode("latin-1")
        for name, sep, _ in (line.partition(b":") for line in lines)
        if sep
    )
    return frozenset(
        n
        for n, count in names.items()
        if count > 1 and (n.startswith(CHECKED_PREFIX) or n in CHECKED_NAMES)
    )


class CheckedClient(NatsClient):
    """A nats-py client whose messages' headers say which ``Pyexec-*`` names were repeated."""

    async def _process_headers(self, headers: Any) -> dict[str, str] | None:
        parsed = await super()._process_headers(headers)
        if parsed is None or not headers:
            return parsed
        checked = Headers(parsed)
        checked.repeated = repeated_names(bytes(headers))
        return checked


async def connect(
    urls: list[str], *, name: str, inbox_prefix: str, metrics: Metrics | None = None
) -> NatsClient:
    """A connection that keeps reconnecting for as long as it takes, whose own inboxes (for its
    JetStream and key-value requests and job fetches) lie under ``inbox_prefix``, away from the
    callers' ``_INBOX.>``."""

    client = CheckedClient()

    async def on_error(exc: Exception) -> None:
        if metrics is not None:
            if isinstance(exc, SlowConsumerError):
                metrics.nats_slow_consumers.inc()
            elif isinstance(exc, OSError) or not (
                client.is_connected or client.is_draining or client.is_closed
            ):
                # nats-py reports every failed connection or reconnection attempt here too
                # (refused or unreachable sockets, and any error before the handshake ends).
                metrics.nats_connect_failures.inc()
            elif not isinstance(exc, (UnexpectedEOF, StaleConnectionError)):
                # (Those two are the connection being lost: on_disconnected counts it.)
                metrics.nats_errors.inc()
        log.warning("nats error", error=repr(exc))

    async def on_disconnected() -> None:
        if client.is_closed or client.is_draining:
            log.info("nats connection closed")  # our own stop, not a fault
            return
        if metrics is not None:
            metrics.nats_disconnects.inc()
        log.warning("nats disconnected")

    async def on_reconnected() -> None:
        if metrics is not None:
            metrics.nats_reconnects.inc()
        log.info("nats reconnected")

    await client.connect(
        servers=urls,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        reconnect_to_server_handler=reconnect_backoff,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        inbox_prefix=inbox_prefix,
    )
    return client


def reconnect_backoff(servers: list[Server], _info: dict[str, Any]) -> tuple[Server, float]:
    """Where and when to try reconnecting: the server tried least, after a delay that doubles
    with every round of failures up to RECONNECT_CAP, with jitter so that replicas that lost the
    same server do not all come back at the same instant. The first try is almost immediate,
    so a failover to another cluster node is quick."""
    chosen = min(servers, key=lambda server: server.reconnects)
    rounds = chosen.reconnects  # every server has failed at least this many times in a row
    if rounds == 0:
        return chosen, random.uniform(0, RECONNECT_FIRST)  # noqa: S311 - jitter, not secrets
    ceiling = min(RECONNECT_CAP, RECONNECT_BASE * 2 ** min(rounds, 16))
    return chosen, random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not secrets
