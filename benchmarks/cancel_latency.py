"""How long a cancel takes: its answer, and until the cancelled run's job slot is free again.

Starts a nats-server of its own and a replica with one job slot. Each round submits a job
that spins (``while True: pass``), waits until its status is ``running``, cancels it and at
once submits a quick job: the quick job can only start once the spinning run's child is killed
and its slot freed, so the time from the cancel to the quick job's completion bounds the time
to kill (the quick job's own run, some 30 ms, included). Usage:
``python benchmarks/cancel_latency.py [ROUNDS]`` (default 20).
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

SPIN = "def execute(ctx):\n    while True:\n        pass\n"
QUICK = "def execute(ctx):\n    return 1\n"


def row(name: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p50 = statistics.median(ordered) * 1000
    worst = ordered[-1] * 1000
    return f"{name:<34} p50 {p50:7.1f} ms   max {worst:7.1f} ms   n={len(ordered)}"


async def measure(url: str, rounds: int) -> None:
    key = ("bench", secrets.token_hex(32))
    replica = BenchReplica(
        url, key, "pyexec", {"EXECUTOR_WORKERS": "2", "EXECUTOR_MAX_JOB_TIMEOUT": "120"}
    )
    answers, freed = [], []
    try:
        async with await Client.connect(url, *key) as client:
            await replica.wait_ready(client)
            for _ in range(rounds):
                spin = await client.send(
                    "pyexec.code", CodeRequest(code=SPIN, mode="async", timeout=100)
                )
                assert spin.job_id is not None
                for _ in range(3000):
                    if (await client.status(spin.job_id)).state == "running":
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # the script is spinning by now
                started = time.perf_counter()
                answer = await client.cancel(spin.job_id)
                answers.append(time.perf_counter() - started)
                assert answer.state == "cancelled", answer
                quick = await client.send(
                    "pyexec.code", CodeRequest(code=QUICK, mode="async", timeout=10)
                )
                assert quick.job_id is not None
                done = await client.wait(quick.job_id, timeout=60)
                freed.append(time.perf_counter() - started)
                assert done.status == "ok", done
    finally:
        replica.stop()
    print(f"{rounds} rounds, one replica with one job slot")
    print(row("cancel answered", answers))
    print(row("slot free, next job completed", freed))


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    server = EmbeddedNats(Path(tempfile.mkdtemp(prefix="pyexec-cancel-bench-")), port=0)
    server.start()
    try:
        asyncio.run(measure(server.url, rounds))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
