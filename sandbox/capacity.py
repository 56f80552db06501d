"""One limit on how many scripts a replica runs at once, shared by everything that starts one.

A run holds a :class:`Slot` from the moment it is admitted until its process is gone; the
pool runs a job only in a slot of its own capacity, so requests, jobs and direct pool users
count against one number. A synchronous request waits in a bounded queue for at most
``max_wait`` seconds and is refused at once past either (:class:`CapacityFull`), so its caller
can retry elsewhere instead of timing out; a job waits as long as it takes.

Jobs also hold a reservation from the moment they are fetched until they are settled: at most
``job_slots`` of them, so that jobs never take every worker from synchronous requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sandbox.errors import CapacityFull


@dataclass(eq=False)
class Slot:
    """A held run slot: the run it admits may start. ``waited`` is the seconds spent queued."""

    capacity: Capacity
    waited: float
    held: bool = True
    in_use: bool = False
    """A run is using it (one run per slot)."""


@dataclass(eq=False)
class Reservation:
    """A held job reservation; :meth:`release` may be called more than once."""

    capacity: Capacity
    held: bool = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.capacity._jobs.release()
            self.capacity.jobs_reserved -= 1


class Capacity:
    """``workers`` runs at once; ``job_share`` of them at most for jobs."""

    def __init__(
        self,
        workers: int,
        *,
        queue_limit: int | None = None,
        max_wait: float | None = None,
        job_share: float = 1.0,
    ) -> None:
        self.workers = workers
        self.queue_limit = queue_limit
        self.max_wait = max_wait
        self.job_slots = max(1, math.floor(workers * job_share))
        self._runs = asyncio.Semaphore(workers)
        self._jobs = asyncio.Semaphore(self.job_slots)
        self.busy = 0  # slots held
        self.waiting = 0  # synchronous requests waiting for a slot
        self.jobs_reserved = 0
        self._held_seconds = 0.0  # slot-seconds of the holds that ended, and of the others
        self._held_since = time.monotonic()  # up to here

    def busy_seconds(self) -> float:
        """Seconds of slots held so far, summed over the slots, the holds still open included."""
        return self._held_seconds + self.busy * (time.monotonic() - self._held_since)

    def _account(self, change: int) -> None:
        now = time.monotonic()
        self._held_seconds += self.busy * (now - self._held_since)
        self._held_since = now
        self.busy += change

    @contextlib.asynccontextmanager
    async def slot(self, *, bounded: bool = False) -> AsyncIterator[Slot]:
        """Hold one run slot. ``bounded`` (a synchronous request) raises :class:`CapacityFull`
        when the queue is full or no slot became free within ``max_wait``; otherwise (a job, a
        direct pool user) it waits as long as it takes."""
        started = time.perf_counter()
        if bounded:
            await self._acquire_bounded()
        else:
            await self._runs.acquire()
        self._account(+1)
        held = Slot(self, time.perf_counter() - started)
        try:
            yield held
        finally:
            held.held = False
            self._account(-1)
            self._runs.release()

    async def reserve_job(self) -> Reservation:
        """Wait for a job reservation (held until the job is settled)."""
        await self._jobs.acquire()
        self.jobs_reserved += 1
        return Reservation(self)

    async def _acquire_bounded(self) -> None:
        full = self.queue_limit is not None and self.waiting >= self.queue_limit
        if self._runs.locked() and full:
            raise CapacityFull(
                f"all {self.workers} workers are busy and {self.waiting} requests are "
                "already waiting; retry shortly or on another replica"
            )
        self.waiting += 1
        try:
            async with asyncio.timeout(self.max_wait):
                await self._runs.acquire()
        except TimeoutError:
            raise CapacityFull(
                f"no worker became free within {self.max_wait:g} s; retry shortly or on "
                "another replica"
            ) from None
        finally:
            self.waiting -= 1
