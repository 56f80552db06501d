"""Per-run cost of the ways to get a warm process for a script, measured on this host.

Compares (a) the standard library's ``forkserver`` start method with the script libraries
preloaded, one process per run, and (b) the sandbox pool (our own warm parent with children
forked ahead of the request). Each runs a trivial function N times, one at a time, and prints
the per-run latency. Usage: ``python benchmarks/fork_start.py [N]``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import sys
import time

from sandbox import Job, Pool, PoolConfig
from sandbox.config import DEFAULT_ALLOWED_MODULES

TRIVIAL = "def execute(ctx):\n    return 1\n"


def _trivial() -> int:
    return 1


def forkserver(runs: int) -> list[float]:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(DEFAULT_ALLOWED_MODULES))
    # The first process pays for starting the fork server and its imports.
    process = context.Process(target=_trivial)
    process.start()
    process.join()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        process = context.Process(target=_trivial)
        process.start()
        process.join()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def pool(runs: int) -> list[float]:
    samples = []
    async with Pool(PoolConfig(workers=1, warm_children=2)) as warm:
        await warm.run(Job(source=TRIVIAL, ctx={}, timeout=5))
        for _ in range(runs):
            started = time.perf_counter()
            await warm.run(Job(source=TRIVIAL, ctx={}, timeout=5))
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def report(name: str, samples: list[float]) -> None:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p90 = ordered[int(len(ordered) * 0.9) - 1]
    print(f"{name:42} runs={len(samples):4}  p50={p50:6.2f} ms  p90={p90:6.2f} ms")


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    report("stdlib forkserver + preload (bare process)", forkserver(runs))
    report("sandbox pool (policy, compile, run, reply)", asyncio.run(pool(runs)))


if __name__ == "__main__":
    main()
