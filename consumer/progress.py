"""A running job's progress: published on ``<prefix>.progress.<job_id>`` and kept as the last
event in its status.

The script's ``progress()`` reports reach the worker through the pool; :class:`ProgressRelay`
sends at most one event every ``INTERVAL`` seconds (the contract's 5 a second, whatever the
child sends): a report that comes when the interval has passed goes out at once, one that comes
sooner waits (replacing one waiting before) until it has, and the last one always goes out
before the job's completion. Events are JSON, signed with the job's key for the job's request like
its completion, so a subscriber can tell them from events anyone on the account could publish.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import msgspec
import structlog
from nats.aio.client import Client as NatsClient

from consumer.auth import Caller
from consumer.ledger import Ledger
from consumer.metrics import Metrics
from consumer.protocol import Progress

log = structlog.get_logger("pyexec.jobs")

INTERVAL = 0.2  # seconds: at most 5 events a second per job
_encoder = msgspec.json.Encoder()


class ProgressRelay:
    """Publishes one job's progress; :meth:`offer` is the pool's ``on_progress``."""

    def __init__(
        self,
        nc: NatsClient,
        subject: str,
        *,
        job_id: str,
        caller: Caller,
        ledger: Ledger,
        metrics: Metrics,
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.job_id = job_id
        self.caller = caller
        self.ledger = ledger
        self.metrics = metrics
        self._waiting: Progress | None = None
        self._ready: list[Progress] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._pump: asyncio.Task[None] | None = None
        self._last = -INTERVAL

    def offer(self, fraction: float | None, message: str) -> None:
        """A report from the script: sent now if the interval has passed since the last
        one, else kept (replacing one kept before) until it has."""
        if self._closing:
            return
        event = Progress(
            fraction=fraction,
            message=message[:200],
            at=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        )
        now = asyncio.get_running_loop().time()
        if self._waiting is None and now - self._last >= INTERVAL:
            self._last = now
            self._ready.append(event)  # its turn is now, whenever the pump gets to it
        else:
            if self._waiting is not None:
                self.metrics.progress_events.labels(outcome="replaced").inc()
            self._waiting = event
        if self._pump is None:
            self._pump = asyncio.create_task(self._run())
        self._wake.set()

    async def close(self, *, flush: bool = True) -> None:
        """The run ended: send the report still waiting (unless ``flush`` is false, for a
        cancelled job), then stop."""
        self._closing = True
        if not flush:
            self._waiting = None
            self._ready.clear()
        if self._pump is None:
            return
        self._wake.set()
        try:
            await self._pump
        except Exception as exc:  # noqa: BLE001 - progress is best effort
            log.warning("publishing progress failed", error=repr(exc))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ready:
                await self._publish(self._ready.pop(0))
            if self._waiting is not None:
                wait = self._last + INTERVAL - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the last event keeps the interval too
                event, self._waiting = self._waiting, None
                if event is not None:
                    self._last = loop.time()
                    await self._publish(event)
            if self._closing and self._waiting is None and not self._ready:
                return

    async def _publish(self, event: Progress) -> None:
        data = _encoder.encode(msgspec.structs.replace(event, job_id=self.job_id))
        try:
            await self.nc.publish(self.subject, data, headers=self.caller.sign_reply(data))
        except Exception as exc:  # noqa: BLE001 - best effort; the status still gets it
            log.warning("publishing progress failed", error=repr(exc))
        self.metrics.progress_events.labels(outcome="published").inc()
        await self.ledger.set_progress(self.job_id, event)
