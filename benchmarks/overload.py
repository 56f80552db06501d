"""How fast an overloaded replica says so: the latency of ``overloaded`` replies.

Starts a nats-server and one replica with one worker and no wait queue
(``EXECUTOR_QUEUE_LIMIT=0``), keeps the worker busy with a spinning script, and sends N quick
requests, C at a time. Every one should come back ``rejected`` / ``overloaded`` at once; the
script prints their latency percentiles, next to those of the same requests run one at a time
on the idle replica.

    python benchmarks/overload.py [--requests 500] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pyexec_client.client import Client

from consumer.config import environment_with
from consumer.embedded import EmbeddedNats

QUICK = "def execute(ctx):\n    return 1\n"
SPIN = "def execute(ctx):\n    while True:\n        pass\n"
ROOT = Path(__file__).resolve().parent.parent


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    cuts = statistics.quantiles(ordered, n=100)
    return f"p50 {cuts[49]:.2f} ms, p90 {cuts[89]:.2f} ms, p99 {cuts[98]:.2f} ms"


async def burst(
    url: str, key: str, secret: str, requests: int, concurrency: int
) -> tuple[list[float], dict[str, int]]:
    async with await Client.connect(url, key, secret) as client:
        gate = asyncio.Semaphore(concurrency)
        times: list[float] = []
        outcomes: dict[str, int] = {}

        async def one() -> None:
            async with gate:
                started = time.perf_counter()
                reply = await client.execute_code(QUICK, timeout=5)
                times.append((time.perf_counter() - started) * 1000)
                code = reply.error.code if reply.error else reply.status
                outcomes[code] = outcomes.get(code, 0) + 1

        await asyncio.gather(*(one() for _ in range(requests)))
        return times, outcomes


async def measure(url: str, key: str, secret: str, requests: int, concurrency: int) -> None:
    # One at a time, so every request finds the worker free: the cost of a normal run.
    idle, idle_outcomes = await burst(url, key, secret, requests, 1)
    async with await Client.connect(url, key, secret) as client:
        spinner = asyncio.create_task(client.execute_code(SPIN, timeout=30))
        await asyncio.sleep(1.0)  # the one worker is now busy
        busy, busy_outcomes = await burst(url, key, secret, requests, concurrency)
        spinner.cancel()
    print(f"{requests} requests each, one worker, no wait queue")
    print(f"  idle, one at a time:       {idle_outcomes}  {percentiles(idle)}")
    print(f"  busy, {concurrency:3} at a time:      {busy_outcomes}  {percentiles(busy)}")


def main(requests: int, concurrency: int) -> None:
    key, secret = "bench", secrets.token_hex(32)
    server = EmbeddedNats(Path(tempfile.mkdtemp(prefix="pyexec-overload-")), port=0)
    server.start()
    url = server.url
    env = environment_with(
        NATS_URL=url,
        EXECUTOR_API_KEYS=f"{key}:{secret}",
        EXECUTOR_WORKERS="1",
        EXECUTOR_QUEUE_LIMIT="0",
        EXECUTOR_METRICS_PORT="0",
        EXECUTOR_LOG_FORMAT="json",
    )
    replica = subprocess.Popen(
        [sys.executable, "-m", "consumer", "serve"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert replica.stderr is not None
        for line in replica.stderr:
            if '"replica ready"' in line:
                break
        threading.Thread(target=replica.stderr.read, daemon=True).start()  # keep the pipe empty
        asyncio.run(measure(url, key, secret, requests, concurrency))
    finally:
        replica.send_signal(signal.SIGINT)
        time.sleep(0.2)
        replica.send_signal(signal.SIGINT)  # the second one does not wait for the spinner
        replica.wait(timeout=30)
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    arguments = parser.parse_args()
    main(arguments.requests, arguments.concurrency)
