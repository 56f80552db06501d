"""What one sandboxed run costs through the pool alone (no NATS): wall time and machine CPU.

    python benchmarks/run_cost.py                      # every scenario, 300 runs each
    python benchmarks/run_cost.py --runs 500 --scenario trivial --callers 2
    python benchmarks/run_cost.py --tiers full --no-huge-pages   # one library parent, 4 KiB pages
    PYTHONPATH=/path/to/other/checkout python benchmarks/run_cost.py   # the same on another tree

Each scenario runs as a closed loop (``--callers`` runs in flight) after a warm-up. CPU per run
is the machine's busy time (``/proc/stat``) over the loop divided by the runs, so it includes
the warm parent's forks and the service side, and anything else the machine did meanwhile:
run it on a quiet machine, and compare trees in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from sandbox import Job, Pool, PoolConfig

SCENARIOS = {
    "trivial": "def execute(ctx):\n    return ctx['n'] + 1\n",
    "calls": (
        "def execute(ctx):\n"
        "    total = 0\n"
        "    for i in range(20000):\n"
        "        total += abs(i - 5) + len(str(i))\n"
        "    return total\n"
    ),
    "methods": (
        "def execute(ctx):\n"
        "    words = ['alpha', 'beta', 'gamma'] * 2000\n"
        "    return len([w.upper() for w in words if w.startswith('a')])\n"
    ),
    "pandas": (
        "import pandas as pd\n\n"
        "def execute(ctx):\n"
        "    df = pd.DataFrame(ctx['rows'])\n"
        "    out = df.groupby('region').agg(total=('amount', 'sum'), n=('amount', 'count'))\n"
        "    return out.reset_index()\n"
    ),
}
ROWS = [{"region": f"r{i % 7}", "amount": (i * 37) % 1000} for i in range(700)]


def busy_ticks() -> int:
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle


def own_cpu() -> float:
    """CPU seconds of this process (the pool's side of every run: sockets, broker, quota)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(pool: Pool, source: str, runs: int, callers: int) -> dict[str, float]:
    ctx = {"n": 1, "rows": ROWS}
    job = Job(source=source, ctx=ctx, timeout=30)
    for _ in range(3):
        await pool.run(job)
    latencies: list[float] = []
    remaining = runs

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            outcome = await pool.run(job)
            latencies.append((time.perf_counter() - started) * 1000)
            if outcome.status != "ok":
                raise RuntimeError(f"run failed: {outcome.error}")

    ticks, started, own = busy_ticks(), time.perf_counter(), own_cpu()
    await asyncio.gather(*(caller() for _ in range(callers)))
    seconds = time.perf_counter() - started
    cpu_ms = (busy_ticks() - ticks) / os.sysconf("SC_CLK_TCK") * 1000 / runs
    pool_ms = (own_cpu() - own) * 1000 / runs
    latencies.sort()
    return {
        "runs_per_s": round(runs / seconds, 1),
        "cpu_ms_per_run": round(cpu_ms, 2),
        "of_which_pool_process_ms": round(pool_ms, 2),
        "p50_ms": round(statistics.median(latencies), 2),
        "p90_ms": round(latencies[int(len(latencies) * 0.9)], 2),
    }


async def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    config = PoolConfig(
        workers=max(args.callers, 1),
        warm_children=max(args.callers, 1),
        tiers=tuple(args.tiers.split(",")),  # type: ignore[arg-type]
        huge_pages=args.huge_pages,
    )
    results: dict[str, dict[str, float]] = {}
    async with Pool(config) as pool:
        for name in names:
            results[name] = await measure(pool, SCENARIOS[name], args.runs, args.callers)
            print(f"{name:10} {json.dumps(results[name])}", flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["all", *SCENARIOS], default="all")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--callers", type=int, default=1)
    parser.add_argument("--tiers", default="stdlib,full", help="warm-parent tiers to keep")
    parser.add_argument("--no-huge-pages", dest="huge_pages", action="store_false")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    results = asyncio.run(main(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    sys.exit(0)
