"""Files in and out of a run against the raw object store, in the same run on the same server.

Starts a nats-server of its own (file storage) and a replica, makes a file of random bytes
(default 50 MB), and measures, each ``--rounds`` times:

- ``raw put`` / ``raw get``: nats-py's object store put of the file and get into a file, with
  nothing of pyexec in between (the floor);
- ``pyexec put_file``: the client's put (the same put, plus the digest it returns);
- ``pyexec run``: one sync request that names the file: the replica fetches and hashes it,
  copies it read-only into the run's scratch folder, the script copies ``in/`` to ``out/`` in
  1 MiB reads, and the replica stores the copy and lists it; the reply's ``duration_ms`` is the
  part inside the pool (placing the input, the script, opening the output);
- ``pyexec get_file``: the client's get of the output into a file.

MB/s is the file size over the median time. Usage:
``python benchmarks/files_throughput.py [--mb 50] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import nats
from pyexec_client.client import Client

from consumer.bench import BenchReplica
from consumer.embedded import EmbeddedNats

COPY = """
def execute(ctx):
    total = 0
    with open("in/big.bin", "rb") as source, open("out/big.bin", "wb") as target:
        while True:
            chunk = source.read(1024 * 1024)
            if not chunk:
                return total
            target.write(chunk)
            total += len(chunk)
"""


def row(name: str, seconds: list[float], mb: float) -> str:
    median = statistics.median(seconds)
    return f"{name:<22} median {median * 1000:8.1f} ms   {mb / median:7.1f} MB/s   n={len(seconds)}"


async def measure(url: str, mb: int, rounds: int, folder: Path) -> None:
    key = ("bench", secrets.token_hex(32))
    replica = BenchReplica(
        url,
        key,
        "pyexec",
        {
            "EXECUTOR_WORKERS": "2",
            "EXECUTOR_SCRATCH_MB": str(4 * mb),
            "EXECUTOR_FILES_MAX_MB": str(2 * mb),
            "EXECUTOR_SCRATCH_DIR": str(folder),
        },
    )
    source = folder / "big.bin"
    with source.open("wb") as handle:
        for _ in range(mb):
            handle.write(os.urandom(1024 * 1024))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    try:
        async with await Client.connect(url, *key) as client:
            await replica.wait_ready(client)
            nc = await nats.connect(url)
            store = await nc.jetstream().object_store("PYEXEC_FILES")
            raw_put, raw_get, put, runs, inside, get = [], [], [], [], [], []
            for n in range(rounds):
                started = time.perf_counter()
                with source.open("rb") as reader:
                    await store.put(f"bench/raw-{n}", reader)
                raw_put.append(time.perf_counter() - started)
                started = time.perf_counter()
                with (folder / "raw.out").open("wb") as writer:
                    await store.get(f"bench/raw-{n}", writeinto=writer)
                raw_get.append(time.perf_counter() - started)

                started = time.perf_counter()
                ref = await client.put_file(source, f"in-{n}")
                put.append(time.perf_counter() - started)
                assert ref.sha256 == digest
                started = time.perf_counter()
                reply = await client.execute_code(COPY, files={"big.bin": ref}, timeout=60)
                runs.append(time.perf_counter() - started)
                assert reply.status == "ok", reply.error
                assert reply.files
                inside.append(reply.duration_ms / 1000)
                started = time.perf_counter()
                await client.get_file(
                    reply.files[0].object, folder / "out.bin", sha256=reply.files[0].sha256
                )
                get.append(time.perf_counter() - started)
                assert reply.files[0].sha256 == digest
            await nc.close()
    finally:
        replica.stop()
    print(f"file: {mb} MB of random bytes, {rounds} rounds, one replica on this machine")
    print(row("raw put", raw_put, mb))
    print(row("raw get", raw_get, mb))
    print(row("pyexec put_file", put, mb))
    print(row("pyexec run (in+out)", runs, mb))
    print(row("  of it in the pool", inside, mb))
    print(row("pyexec get_file", get, mb))
    raw = statistics.median(raw_get) + statistics.median(raw_put)
    print(
        f"the run against raw get + raw put of the same bytes: {statistics.median(runs) / raw:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pyexec-files-bench-"))
    server = EmbeddedNats(folder / "nats", port=0)
    server.start()
    try:
        asyncio.run(measure(server.url, args.mb, args.rounds, folder))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
