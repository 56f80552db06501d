"""``pyexec bench``: a closed-loop load generator over NATS against real replicas.

It starts a nats-server and a replica of its own, or with ``--url`` loads an existing fleet with
the key from the environment (``EXECUTOR_API_KEYS`` or ``EXECUTOR_API_KEY``, and
``EXECUTOR_SUBJECT_PREFIX``, as ``pyexec call`` uses them). Each scenario runs with N callers
that send a request as soon as their last reply arrives; the report gives runs/s, latency
percentiles, errors, and CPU per run: of the replica's process tree (its own replica only) and
of the whole machine. On a noisy machine runs/s moves with the neighbours; CPU per run of the
tree does not.

In the same run it measures the machine's fork floor (``consumer.bench_floor``): a Python
parent (bare, or with the libraries imported) that forks a child running the same script
unguarded. It prints pyexec's CPU per run as a ratio of that floor. With ``--baseline`` (the
default, own replica only) it then runs the same load against a replica in the naive mode (a
fresh interpreter per run, libraries imported per run) and prints the ratios of runs/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyexec_client.client import Client
from pyexec_client.urls import without_credentials

from consumer import config
from consumer.embedded import EmbeddedNats
from consumer.target import find_target
from consumer.usage import machine_busy_seconds, tree_cpu_seconds, tree_pss_mb

SCENARIOS: dict[str, tuple[str, dict[str, Any], int]] = {
    # name: (source, ctx, default callers)
    "trivial": ("def execute(ctx):\n    return ctx['n'] + 1\n", {"n": 1}, 4),
    "pandas": (
        "import pandas as pd\n\n"
        "def execute(ctx):\n"
        "    df = pd.DataFrame(ctx['rows'])\n"
        "    out = df.groupby('region').agg(total=('amount', 'sum'), n=('amount', 'count'))\n"
        "    return out.reset_index()\n",
        {
            "rows": [
                {"region": f"r{i % 7}", "amount": (i * 37) % 1000, "day": i % 31}
                for i in range(700)
            ]
        },
        2,
    ),
    "stdout": (
        "def execute(ctx):\n    for i in range(2000):\n        print('line', i, 'of output')\n"
        "    return 1\n",
        {},
        4,
    ),
    "result100k": ("def execute(ctx):\n    return 'x' * 100_000\n", {}, 4),
}
# The fork floor each scenario is compared with: a bare interpreter, or a parent that has the
# libraries the scenario imports already imported.
FLOORS = {"pandas": "libraries"}
RUN_TIMEOUT = 10.0  # seconds each run may take: within the default EXECUTOR_MAX_TIMEOUT


@dataclass
class Measured:
    """One scenario against one replica (or fleet)."""

    scenario: str
    mode: str
    callers: int
    seconds: float
    runs: int
    errors: int
    runs_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    machine_cpu_ms: float
    """The machine's busy CPU time per completed run (everything on it, NATS included)."""
    tree_cpu_ms: float | None
    """The replica's process tree's CPU per completed run; None for a fleet (``--url``)."""
    error_codes: dict[str, int] = field(default_factory=dict)
    first_error: str = ""


def percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


async def run_scenario(  # noqa: PLR0917 - one scenario's whole description
    client: Client, name: str, callers: int, seconds: float, mode: str, tree: int | None
) -> Measured:
    """``callers`` closed loops for ``seconds``; ``tree`` is the replica's pid, if it is ours."""
    source, ctx, _ = SCENARIOS[name]
    latencies: list[float] = []
    codes: dict[str, int] = {}
    first: list[str] = []
    # Warm up each caller's path once before measuring.
    await asyncio.gather(
        *(client.execute_code(source, ctx, timeout=RUN_TIMEOUT) for _ in range(callers))
    )
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            reply = await client.execute_code(source, ctx, timeout=RUN_TIMEOUT)
            latencies.append((time.perf_counter() - started) * 1000)
            if reply.status != "ok":
                code = reply.error.code if reply.error else reply.status
                codes[code] = codes.get(code, 0) + 1
                if not first and reply.error is not None:
                    first.append(f"{code}: {reply.error.message}")

    busy = machine_busy_seconds()
    tree_cpu = tree_cpu_seconds(tree) if tree is not None else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - started
    runs = max(len(latencies), 1)
    machine_ms = (machine_busy_seconds() - busy) * 1000 / runs
    tree_ms = (tree_cpu_seconds(tree) - tree_cpu) * 1000 / runs if tree is not None else None
    ordered = sorted(latencies)
    return Measured(
        scenario=name,
        mode=mode,
        callers=callers,
        seconds=round(elapsed, 2),
        runs=len(ordered),
        errors=sum(codes.values()),
        runs_per_s=round(len(ordered) / elapsed, 1),
        p50_ms=round(statistics.median(ordered), 2) if ordered else float("nan"),
        p90_ms=round(percentile(ordered, 0.90), 2),
        p99_ms=round(percentile(ordered, 0.99), 2),
        machine_cpu_ms=round(machine_ms, 2),
        tree_cpu_ms=None if tree_ms is None else round(tree_ms, 2),
        error_codes=codes,
        first_error=first[0] if first else "",
    )


async def fork_floor(name: str, callers: int, runs: int) -> dict[str, Any]:
    """The floor of scenario ``name`` on this machine (see ``consumer.bench_floor``)."""
    source, ctx, _ = SCENARIOS[name]
    parent = FLOORS.get(name, "bare")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer.bench_floor",
        "--parent",
        parent,
        "--runs",
        str(runs),
        "--callers",
        str(callers),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=config.environment_with(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1"),
    )
    out, _ = await process.communicate(json.dumps({"source": source, "ctx": ctx}).encode())
    if process.returncode != 0:
        raise RuntimeError(f"the fork floor of {name} failed (exit {process.returncode})")
    floor: dict[str, Any] = json.loads(out)
    floor["parent"] = parent
    return floor


class BenchReplica:
    """A replica process started for the benchmark."""

    def __init__(self, url: str, key: tuple[str, str], prefix: str, env: dict[str, str]) -> None:
        self.url = url
        self.key = key
        self.prefix = prefix
        log = tempfile.NamedTemporaryFile(prefix="pyexec-bench-", suffix=".log", delete=False)  # noqa: SIM115
        self.log_path = Path(log.name)
        full_env = config.environment_with(
            NATS_URL=url,
            EXECUTOR_API_KEYS=f"{key[0]}:{key[1]}",
            EXECUTOR_SUBJECT_PREFIX=prefix,
            EXECUTOR_QUEUE_GROUP=prefix,
            EXECUTOR_METRICS_PORT="0",
            EXECUTOR_LOG_FORMAT="json",
            EXECUTOR_MAX_TIMEOUT="60",
        )
        full_env.update(env)
        self.spawned = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumer", "serve"],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()
        self.first_reply_s = float("nan")

    async def wait_ready(self, client: Client, timeout: float = 120) -> None:
        """Poll until the first request is answered; remember how long that took."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica exited: {self.log_path.read_text()[-2000:]}")
            try:
                reply = await client.execute_code("def execute(ctx):\n    return 1\n", timeout=5)
            except Exception:  # noqa: BLE001 - not listening yet
                await asyncio.sleep(0.05)
                continue
            if reply.status == "ok":
                self.first_reply_s = round(time.perf_counter() - self.spawned, 2)
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the replica did not answer in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_path.unlink(missing_ok=True)


async def bench_mode(
    url: str, mode: str, scenarios: list[str], args: argparse.Namespace
) -> tuple[list[Measured], dict[str, Any]]:
    key = ("bench", secrets.token_hex(32))
    env = {"EXECUTOR_POOL_MODE": mode}
    if args.workers:
        env["EXECUTOR_WORKERS"] = str(args.workers)
    replica = BenchReplica(url, key, f"bench{mode}", env)
    results: list[Measured] = []
    try:
        async with await Client.connect(url, key[0], key[1], prefix=f"bench{mode}") as client:
            await replica.wait_ready(client)
            idle_pss = tree_pss_mb(replica.process.pid)
            peak_pss = idle_pss
            for name in scenarios:
                callers = args.concurrency or SCENARIOS[name][2]
                seconds = args.duration if mode == "warm" else args.baseline_duration
                measured = await run_scenario(
                    client, name, callers, seconds, mode, replica.process.pid
                )
                peak_pss = max(peak_pss, tree_pss_mb(replica.process.pid))
                results.append(measured)
                print(_row(measured), flush=True)
    finally:
        replica.stop()
    facts = {
        "first_reply_s": replica.first_reply_s,
        "idle_pss_mb": idle_pss,
        "peak_pss_mb": peak_pss,
    }
    return results, facts


def _row(m: Measured) -> str:
    errors = f"{m.errors}" + (f" {m.error_codes} (first: {m.first_error})" if m.errors else "")
    tree = "   n/a" if m.tree_cpu_ms is None else f"{m.tree_cpu_ms:6.2f}"
    return (
        f"{m.mode:6} {m.scenario:11} callers={m.callers:<3} runs={m.runs:<6} "
        f"{m.runs_per_s:8.1f}/s  p50={m.p50_ms:8.2f}  p90={m.p90_ms:8.2f}  "
        f"p99={m.p99_ms:8.2f} ms  cpu/run: replica {tree} machine {m.machine_cpu_ms:6.2f} ms  "
        f"errors={errors}"
    )


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    report: dict[str, Any] = {"machine": machine_facts(), "scenarios": scenarios}
    if args.url:
        fleet = without_credentials(args.url)
        print(f"pyexec bench: the fleet at {fleet}, scenarios {', '.join(scenarios)}")
        report["warm"] = [asdict(m) for m in await bench_fleet(args.url, scenarios, args)]
        report["floors"] = await _floors(report["warm"], args)
        return report
    data = Path(tempfile.mkdtemp(prefix="pyexec-bench-nats-"))
    server = EmbeddedNats(data, port=0)
    server.start()
    url = server.url
    try:
        print(f"pyexec bench: {url}, scenarios {', '.join(scenarios)}", flush=True)
        warm, warm_facts = await bench_mode(url, "warm", scenarios, args)
        report["warm"] = [asdict(m) for m in warm]
        report["warm_facts"] = warm_facts
        print(
            f"warm replica: first reply {warm_facts['first_reply_s']} s after start, "
            f"PSS idle {warm_facts['idle_pss_mb']} MB, peak {warm_facts['peak_pss_mb']} MB",
            flush=True,
        )
        report["floors"] = await _floors(report["warm"], args)
        if args.baseline:
            fresh, fresh_facts = await bench_mode(url, "fresh", scenarios, args)
            report["fresh"] = [asdict(m) for m in fresh]
            report["fresh_facts"] = fresh_facts
            for w, f in zip(warm, fresh, strict=True):
                ratio = w.runs_per_s / f.runs_per_s if f.runs_per_s else float("inf")
                print(
                    f"ratio  {w.scenario:11} warm/fresh runs/s = {ratio:6.1f}x  "
                    f"(p50 {w.p50_ms} ms vs {f.p50_ms} ms)",
                    flush=True,
                )
                report.setdefault("ratios", {})[w.scenario] = round(ratio, 1)
    finally:
        server.stop()
    return report


async def bench_fleet(url: str, scenarios: list[str], args: argparse.Namespace) -> list[Measured]:
    """The scenarios against an existing fleet, signed with the key from the environment."""
    target = find_target(args.key_id, url=url)
    results = []
    async with await target.connect() as client:
        for name in scenarios:
            callers = args.concurrency or SCENARIOS[name][2]
            measured = await run_scenario(client, name, callers, args.duration, "fleet", None)
            results.append(measured)
            print(_row(measured), flush=True)
    return results


async def _floors(measured: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Each scenario's fork floor, measured now, and pyexec's CPU per run as a ratio of it."""
    floors: dict[str, Any] = {}
    for m in measured:
        floor = await fork_floor(m["scenario"], m["callers"], args.floor_runs)
        cpu = m["tree_cpu_ms"] if m["tree_cpu_ms"] is not None else m["machine_cpu_ms"]
        which = "tree" if m["tree_cpu_ms"] is not None else "machine"
        floor_cpu = floor["tree_cpu_ms"] if which == "tree" else floor["machine_cpu_ms"]
        floor["ratio"] = round(cpu / floor_cpu, 2) if floor_cpu else float("inf")
        floor["compared"] = which
        floors[m["scenario"]] = floor
        print(
            f"floor  {m['scenario']:11} {floor['parent']} parent forking the script unguarded: "
            f"{floor['runs_per_s']:8.1f}/s  cpu/run: tree {floor['tree_cpu_ms']:6.2f} "
            f"machine {floor['machine_cpu_ms']:6.2f} ms  ->  pyexec {which} cpu/run = "
            f"{floor['ratio']:.1f}x the floor",
            flush=True,
        )
    return floors


def machine_facts() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", choices=["all", *SCENARIOS], default="all")
    parser.add_argument("--concurrency", type=int, default=0, help="callers (default per scenario)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--workers", type=int, default=0, help="EXECUTOR_WORKERS for the replica")
    parser.add_argument(
        "--no-baseline", dest="baseline", action="store_false",
        help="skip the fresh-interpreter-per-run comparison",
    )  # fmt: skip
    parser.add_argument(
        "--baseline-duration", type=float, default=10.0, help="seconds per baseline scenario"
    )
    parser.add_argument(
        "--url", default="",
        help="load the fleet behind this NATS server, with the key from the environment "
        "(default: start a server and a replica of its own)",
    )  # fmt: skip
    parser.add_argument("--key-id", help="the key to sign with, with --url (default: the first)")
    parser.add_argument(
        "--floor-runs", type=int, default=300, help="runs of each fork-floor measurement"
    )
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")


def main(args: argparse.Namespace) -> int:
    report = asyncio.run(bench(args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
