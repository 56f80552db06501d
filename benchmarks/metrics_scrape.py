"""What a Prometheus scrape of a replica costs: the size of /metrics and the time to serve it.

Starts a nats-server and one replica with its metrics port on loopback, sends a mix of requests
so that the labelled series exist (ok, script errors, a named script, a bad signature), then
times N scrapes of /metrics.

    python benchmarks/metrics_scrape.py [--scrapes 200] [--requests 150]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from pyexec_client.client import Client

from consumer.config import environment_with
from consumer.embedded import EmbeddedNats, free_port

ROOT = Path(__file__).resolve().parent.parent


async def traffic(url: str, key: str, secret: str, requests: int) -> None:
    async with await Client.connect(url, key, secret) as client:
        for n in range(requests // 3):
            await client.execute_code("def execute(ctx):\n    return 1\n", timeout=5)
            await client.execute_code("def execute(ctx):\n    return 1 / 0\n", timeout=5)
            await client.execute_named("text.normalize", {"text": f"  n {n} "}, timeout=5)
        await client.send_raw("pyexec.code", b"{}", headers={"Pyexec-Key-Id": key}, timeout=5)


def main(scrapes: int, requests: int) -> None:
    key, secret = "bench", secrets.token_hex(32)
    server = EmbeddedNats(Path(tempfile.mkdtemp(prefix="pyexec-scrape-")), port=0)
    server.start()
    port = free_port()
    replica = subprocess.Popen(
        [sys.executable, "-m", "consumer", "serve"],
        env=environment_with(
            NATS_URL=server.url,
            EXECUTOR_API_KEYS=f"{key}:{secret}",
            EXECUTOR_METRICS_PORT=str(port),
            EXECUTOR_METRICS_HOST="127.0.0.1",
            EXECUTOR_LOG_FORMAT="json",
        ),
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
        asyncio.run(traffic(server.url, key, secret, requests))
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        times: list[float] = []
        body = b""
        for _ in range(scrapes):
            started = time.perf_counter()
            with urllib.request.urlopen(metrics_url, timeout=5) as response:
                body = response.read()
            times.append((time.perf_counter() - started) * 1000)
        series = [line for line in body.decode().splitlines() if line and not line.startswith("#")]
        cuts = statistics.quantiles(times, n=100)
        print(f"/metrics after {requests} requests: {len(body)} bytes, {len(series)} series")
        print(f"{scrapes} scrapes: p50 {cuts[49]:.2f} ms, p90 {cuts[89]:.2f} ms, "
              f"p99 {cuts[98]:.2f} ms")  # fmt: skip
    finally:
        replica.terminate()
        replica.wait(timeout=30)
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--requests", type=int, default=150)
    arguments = parser.parse_args()
    main(arguments.scrapes, arguments.requests)
