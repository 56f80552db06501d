"""What the shared stores cost: the fleet-wide replay check and the job ledger, per request.

Starts a nats-server of its own (file storage, as in production) and measures, from one client:

- ``nonce``: one ``create`` of a new ``<key id>.<nonce>`` key in a bucket shaped like
  ``PYEXEC_NONCES`` (the fleet-wide replay check every signed request pays), one at a time and
  with 16 in flight;
- ``local``: the replica's own replay cache for the same nonces (what it cost before);
- ``ledger``: what an async submission pays on top of storing the job (registering a new job
  id in a bucket shaped like ``PYEXEC_JOB_IDS``, then noting the message that owns it), and
  what the worker pays (its claim, which marks the job running, then marking it done), and
  what a ``job.status`` request pays on top of the replay check (one read of the record, and
  one of the last progress event once the job runs);
- ``lifecycle``: what a ``job.cancel`` pays (a read and a compare-and-set of the record), what
  the worker pays per progress event it keeps (one put), and what a status of a running job
  with progress pays.

Usage: ``python benchmarks/trust_cost.py [N]`` (default 2000 per measurement).
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats

from consumer import config
from consumer.auth import Verifier
from consumer.embedded import EmbeddedNats
from consumer.ledger import Ledger, digest_of
from consumer.nonces import SharedNonces
from consumer.protocol import Progress
from consumer.streams import STORE_TIMEOUT, ensure_buckets


def summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered) * 1e6
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1e6
    return f"{name:<28} p50 {p50:8.1f} us   p99 {p99:8.1f} us   n={len(ordered)}"


async def measure(url: str, runs: int) -> None:
    nc = await nats.connect(url)
    try:
        settings = config.load(
            {"NATS_URL": url, "EXECUTOR_API_KEYS": f"bench:{secrets.token_hex(32)}"}
        )
        stores = await ensure_buckets(nc.jetstream(timeout=STORE_TIMEOUT), settings)
        nonces = SharedNonces(stores.nonces, timeout=STORE_TIMEOUT)
        ledger = Ledger(stores.job_ids, timeout=STORE_TIMEOUT)
        for _ in range(200):  # warm-up
            await nonces.claim("bench", secrets.token_hex(16))

        one_at_a_time = []
        for _ in range(runs):
            nonce = secrets.token_hex(16)
            started = time.perf_counter()
            await nonces.claim("bench", nonce)
            one_at_a_time.append(time.perf_counter() - started)
        print(summary("nonce create, 1 in flight", one_at_a_time))

        async def timed(nonce: str) -> float:
            started = time.perf_counter()
            await nonces.claim("bench", nonce)
            return time.perf_counter() - started

        started = time.perf_counter()
        parallel: list[float] = []
        for _ in range(runs // 16):
            parallel += await asyncio.gather(*(timed(secrets.token_hex(16)) for _ in range(16)))
        elapsed = time.perf_counter() - started
        print(
            summary("nonce create, 16 in flight", parallel), f"  {len(parallel) / elapsed:,.0f}/s"
        )

        verifier = Verifier(settings.keys, capacity=runs + 10)
        local = []
        for _ in range(runs):
            nonce = secrets.token_hex(16)
            started = time.perf_counter()
            verifier.remember(nonce)
            local.append(time.perf_counter() - started)
        print(summary("local replay cache", local))

        register, read = [], []
        for n in range(runs):
            job_id = secrets.token_hex(16)
            digest = digest_of("code", b"%d" % n)
            started = time.perf_counter()
            _, revision = await ledger.register(job_id, "bench", digest)
            await ledger.owned_by(job_id, revision, n + 1)
            register.append(time.perf_counter() - started)
            started = time.perf_counter()
            await ledger.claim(job_id, "bench", digest, n + 1)
            await ledger.settle(job_id, "done", n + 1)
            read.append(time.perf_counter() - started)
        print(summary("ledger: submission", register))
        print(summary("ledger: worker claim + done", read))

        lookups = []
        for _ in range(runs):
            started = time.perf_counter()
            await ledger.lookup(job_id, "bench")
            lookups.append(time.perf_counter() - started)
        print(summary("ledger: a status look-up", lookups))
        await lifecycle(ledger, runs)
    finally:
        await nc.close()


async def lifecycle(ledger: Ledger, runs: int) -> None:
    """A progress event kept, a status of a running job (record and progress), a cancel."""
    cancels, progress, running_status = [], [], []
    event = Progress(fraction=0.5, message="half way", at="2026-12-01T00:00:00.000+00:00")
    for n in range(runs):
        job_id = secrets.token_hex(16)
        digest = digest_of("code", b"%d" % n)
        await ledger.register(job_id, "bench", digest)
        await ledger.claim(job_id, "bench", digest, n + 1)
        started = time.perf_counter()
        await ledger.set_progress(job_id, event)
        progress.append(time.perf_counter() - started)
        started = time.perf_counter()
        await asyncio.gather(ledger.lookup(job_id, "bench"), ledger.progress(job_id))
        running_status.append(time.perf_counter() - started)
        started = time.perf_counter()
        await ledger.cancel(job_id, "bench")
        cancels.append(time.perf_counter() - started)
    print(summary("lifecycle: a progress event", progress))
    print(summary("lifecycle: status, running", running_status))
    print(summary("lifecycle: a cancel", cancels))


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    server = EmbeddedNats(Path(tempfile.mkdtemp(prefix="pyexec-trust-bench-")), port=0)
    server.start()
    try:
        asyncio.run(measure(server.url, runs))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
