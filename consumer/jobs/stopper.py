"""The jobs this replica is running, and stopping one that was cancelled.

``<prefix>.job.cancel`` (any replica) marks the job's record ``cancelled`` and then publishes
the job id on ``<prefix>.job.cancelled``. Every replica listens; the one running the job reads
the record and, if it says ``cancelled``, cancels the run, which kills its child. A notice
proves nothing by itself (anyone allowed to publish there could send one), so only the record
decides, and at most one look per job is in flight however many notices come. A notice lost on
the way is made up for by a look at the record every ``CANCEL_POLL`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from consumer.config import Settings
from consumer.jobs import CANCEL_NOTICE
from consumer.ledger import Ledger

log = structlog.get_logger("pyexec.jobs")

# Seconds between looks at a running job's record, for a cancel whose notice was lost.
CANCEL_POLL = 2.0
T = TypeVar("T")


class RunningJobs:
    """Runs jobs so that a cancel can stop them."""

    def __init__(self, nc: NatsClient, settings: Settings, ledger: Ledger) -> None:
        self.nc = nc
        self.settings = settings
        self.ledger = ledger
        self._runs: dict[str, asyncio.Future[object]] = {}
        self._cancelled: set[str] = set()
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._notices: Subscription | None = None

    async def start(self) -> None:
        self._notices = await self.nc.subscribe(
            self.settings.subject(CANCEL_NOTICE), cb=self._on_notice
        )

    async def stop(self) -> None:
        if self._notices is not None:
            with contextlib.suppress(Exception):
                await self._notices.unsubscribe()
            self._notices = None

    async def run(self, job_id: str, work: Awaitable[T]) -> T | None:
        """``work``'s result; None if the job was cancelled while it ran (``work`` is then
        cancelled: a run's child is killed). Cancelling the caller (the replica handing the
        job back) cancels ``work`` too, and is raised."""
        running: asyncio.Future[T] = asyncio.ensure_future(work)
        self._runs[job_id] = running  # type: ignore[assignment]
        watch = asyncio.create_task(self._watch(job_id))
        try:
            return await running
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if job_id in self._cancelled and (task is None or not task.cancelling()):
                log.info("job stopped: it was cancelled")
                return None
            raise
        finally:
            watch.cancel()
            self._runs.pop(job_id, None)
            self._cancelled.discard(job_id)

    async def _on_notice(self, msg: Msg) -> None:
        job_id = msg.data[:64].decode(errors="replace")
        if job_id not in self._runs or job_id in self._checks:
            return  # not ours, or a look is under way already
        check = asyncio.create_task(self._stop_if_cancelled(job_id))
        self._checks[job_id] = check
        check.add_done_callback(lambda _task: self._checks.pop(job_id, None))

    async def _watch(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(CANCEL_POLL)
            await self._stop_if_cancelled(job_id)

    async def _stop_if_cancelled(self, job_id: str) -> None:
        """Stop the job's run if its record says cancelled."""
        run = self._runs.get(job_id)
        if run is None or run.done():
            return
        if await self.ledger.state_of(job_id) == "cancelled":
            self._cancelled.add(job_id)
            run.cancel()
