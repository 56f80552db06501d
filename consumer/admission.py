"""Admission: at most one run per worker, and a bounded, time-limited wait for the rest.

A synchronous request that finds every worker busy joins a queue of at most
``EXECUTOR_QUEUE_LIMIT`` requests and waits at most ``EXECUTOR_QUEUE_WAIT`` seconds for a worker;
past either it is refused at once as ``overloaded``, so its caller can retry elsewhere instead of
timing out. Async jobs are already bounded by their job slots and wait as long as it takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from consumer.errors import Overloaded


class Admission:
    """One slot per worker; waiting requests are counted and bounded."""

    def __init__(self, workers: int, *, queue_limit: int, max_wait: float) -> None:
        self.workers = workers
        self.queue_limit = queue_limit
        self.max_wait = max_wait
        self._slots = asyncio.Semaphore(workers)
        self.waiting = 0  # synchronous requests waiting for a worker
        self.jobs_waiting = 0  # async jobs waiting for a worker

    @contextlib.asynccontextmanager
    async def slot(self, *, job: bool = False) -> AsyncIterator[float]:
        """Hold a worker slot for one run; yields the seconds spent waiting for it.

        Raises :class:`Overloaded` for a synchronous request when the queue is full, or when no
        worker became free within ``max_wait``.
        """
        started = time.perf_counter()
        if job:
            self.jobs_waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.jobs_waiting -= 1
        else:
            await self._acquire_bounded()
        try:
            yield time.perf_counter() - started
        finally:
            self._slots.release()

    async def _acquire_bounded(self) -> None:
        if self._slots.locked() and self.waiting >= self.queue_limit:
            raise Overloaded(
                f"all {self.workers} workers are busy and {self.waiting} requests are already "
                "waiting; retry shortly or on another replica"
            )
        self.waiting += 1
        try:
            async with asyncio.timeout(self.max_wait):
                await self._slots.acquire()
        except TimeoutError:
            raise Overloaded(
                f"no worker became free within {self.max_wait:g} s; retry shortly or on another "
                "replica"
            ) from None
        finally:
            self.waiting -= 1
