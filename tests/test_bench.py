"""``pyexec bench``: CPU per run next to runs/s, the fork floor measured in the same run, and
``--url`` loading an existing fleet with the key from the environment.

The numbers themselves are benchmarks (docs/benchmarks.md), not pass/fail targets: these tests
check that the report holds what it promises, measured, for a short real run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from consumer.config import environment_with
from tests.conftest import KEY_ID, ROOT, SECRET, NatsServer, free_port, start_replica


def run_bench(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``pyexec bench`` on the trivial scenario for 1 s, with only the pyexec settings given."""
    return subprocess.run(
        [sys.executable, "-m", "consumer", "bench", "--scenario", "trivial", "--duration", "1",
         *args],
        env=environment_with(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip


def bench(tmp_path: Path, *args: str, **env: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "bench.json"
    done = run_bench("--floor-runs", "30", "--json", str(out), *args, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_bench_url_loads_an_existing_fleet_with_the_key_from_the_environment(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    replica = start_replica(nats_server.url)
    try:
        report, printed = bench(
            tmp_path,
            "--url",
            nats_server.url,
            EXECUTOR_API_KEYS=f"{KEY_ID}:{SECRET}",
            EXECUTOR_SUBJECT_PREFIX=replica.prefix,
        )
    finally:
        replica.stop()
    (measured,) = report["warm"]
    assert measured["mode"] == "fleet"
    # Answered ok: the requests were signed with the environment's key, for its prefix.
    assert measured["runs"] > 0
    assert measured["errors"] == 0
    assert measured["tree_cpu_ms"] is None  # a fleet's processes are not ours to read
    assert measured["machine_cpu_ms"] > 0
    floor = report["floors"]["trivial"]
    assert floor["parent"] == "bare"
    assert floor["compared"] == "machine"
    assert floor["tree_cpu_ms"] > 0
    assert floor["ratio"] > 0
    assert "fresh" not in report  # no baseline replica is started for a fleet
    assert "x the floor" in printed


def test_bench_reports_the_replica_tree_cpu_per_run_and_the_ratio_to_the_floor(
    tmp_path: Path,
) -> None:
    report, printed = bench(tmp_path, "--no-baseline")
    (measured,) = report["warm"]
    assert measured["runs"] > 0
    assert measured["errors"] == 0
    assert measured["tree_cpu_ms"] > 0
    floor = report["floors"]["trivial"]
    assert floor["compared"] == "tree"
    assert floor["ratio"] == round(measured["tree_cpu_ms"] / floor["tree_cpu_ms"], 2)
    assert "cpu/run: replica" in printed


def test_bench_url_never_shows_credentials_in_the_url() -> None:
    """A NATS URL with a user and password (here to a loopback port nobody listens on): the
    bench names the server, without them, in what it prints and in its error."""
    url = f"nats://alice:hunter2-secret@127.0.0.1:{free_port()}"
    done = run_bench("--url", url, EXECUTOR_API_KEYS=f"{KEY_ID}:{SECRET}")
    assert done.returncode != 0
    assert "cannot connect to NATS at nats://***@127.0.0.1" in done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert "alice" not in done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr
