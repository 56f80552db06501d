"""The fork floor of this machine, for ``pyexec bench``: what a run costs with no sandbox at all.

``python -m consumer.bench_floor --parent bare|libraries --runs N --callers C`` reads a
scenario ``{"source": ..., "ctx": ...}`` as JSON on stdin. The process (a bare interpreter, or
one that has imported the same libraries as the full warm parent) then forks one child per run,
keeping C in flight: each child decodes the context, runs the scenario's ``execute`` unguarded,
writes the JSON result to a pipe and exits. It prints, as JSON, the runs per second and the CPU
per run of its own process tree (itself and its reaped children) and of the machine.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import time
from typing import Any

from consumer.usage import machine_busy_seconds

LIBRARIES = (
    "pandas", "numpy", "openpyxl", "sqlglot", "pymorphy3", "nltk", "rapidfuzz", "openai",
    "requests",
)  # fmt: skip


def _child(source: str, ctx_json: bytes, answer: int) -> None:
    try:
        namespace: dict[str, Any] = {}
        exec(compile(source, "<script>", "exec"), namespace)  # noqa: S102 - the floor, unguarded
        value = namespace["execute"](json.loads(ctx_json))
        if hasattr(value, "to_dict"):
            value = value.to_dict(orient="records")
        os.write(answer, json.dumps(value, default=str).encode())
    finally:
        os._exit(0)


def _tree_cpu() -> float:
    own = os.times()
    return own.user + own.system + own.children_user + own.children_system


def measure(source: str, ctx: Any, runs: int, callers: int) -> dict[str, float]:
    ctx_json = json.dumps(ctx).encode()
    gc.collect()
    gc.freeze()
    in_flight: dict[int, int] = {}

    def start() -> None:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _child(source, ctx_json, write)
        os.close(write)
        in_flight[pid] = read

    def finish() -> None:
        pid, _status = os.wait()
        read = in_flight.pop(pid)
        while os.read(read, 65536):
            pass
        os.close(read)

    for _ in range(3):  # warm up
        start()
        finish()
    cpu, busy, started = _tree_cpu(), machine_busy_seconds(), time.perf_counter()
    begun = 0
    while begun < runs or in_flight:
        while begun < runs and len(in_flight) < callers:
            start()
            begun += 1
        finish()
    seconds = time.perf_counter() - started
    return {
        "runs_per_s": round(runs / seconds, 1),
        "tree_cpu_ms": round((_tree_cpu() - cpu) * 1000 / runs, 3),
        "machine_cpu_ms": round((machine_busy_seconds() - busy) * 1000 / runs, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", choices=["bare", "libraries"], default="bare")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--callers", type=int, default=1)
    args = parser.parse_args()
    scenario = json.loads(sys.stdin.read())
    if args.parent == "libraries":
        for name in LIBRARIES:
            importlib.import_module(name)
    print(json.dumps(measure(scenario["source"], scenario["ctx"], args.runs, args.callers)))


if __name__ == "__main__":
    main()
