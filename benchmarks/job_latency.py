"""Latency of async jobs through one replica: accepted, and submit-to-completion.

Starts a nats-server and a replica of its own, then sends N trivial ``mode: "async"`` requests
one after another, each followed by ``Client.wait`` for its completion. Usage:
``python benchmarks/job_latency.py [N]``.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pyexec_client.client import Client

from consumer.bench import BenchReplica
from consumer.embedded import EmbeddedNats
from consumer.protocol import CodeRequest

TRIVIAL = "def execute(ctx):\n    return 1\n"


async def measure(url: str, key: tuple[str, str], runs: int) -> None:
    replica = BenchReplica(url, key, "pyexec", {})
    try:
        async with await Client.connect(url, key[0], key[1]) as client:
            await replica.wait_ready(client)
            accepted, completed = [], []
            for _ in range(runs):
                started = time.perf_counter()
                reply = await client.send("pyexec.code", CodeRequest(code=TRIVIAL, mode="async"))
                accepted.append((time.perf_counter() - started) * 1000)
                assert reply.job_id is not None, reply
                await client.wait(reply.job_id, timeout=30)
                completed.append((time.perf_counter() - started) * 1000)
    finally:
        replica.stop()
    completed.sort()
    print(
        f"jobs={runs}  accepted p50={statistics.median(accepted):.1f} ms  "
        f"completion p50={statistics.median(completed):.1f} ms  "
        f"p90={completed[int(runs * 0.9) - 1]:.1f} ms"
    )


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    server = EmbeddedNats(Path(tempfile.mkdtemp(prefix="pyexec-jobs-bench-")), port=0)
    server.start()
    try:
        asyncio.run(measure(server.url, ("bench", secrets.token_hex(32)), runs))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
