"""What processes use, as the benchmarks and the metrics count it: CPU time and memory.

A process tree's CPU is, for every process alive in it, its own user and system time plus that
of the children it has reaped; a run's child that has exited is counted in its warm parent's
share, so the difference of two readings is what the tree spent between them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """Seconds every CPU of the machine spent not idle since boot (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _TICK


def process_tree(root: int) -> Iterator[int]:
    """``root`` and every process below it that is alive now (each thread's children)."""
    pending = [root]
    while pending:
        pid = pending.pop()
        yield pid
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                pending.extend(int(child) for child in task.read_text().split())
            except OSError:
                continue


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and its descendants (their own and their reaped children's)."""
    total = 0
    for pid in process_tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces: the fields start after its closing parenthesis.
        fields = stat[stat.rindex(")") + 2 :].split()
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / _TICK


def pss_bytes(pid: int | None) -> float:
    """A process's proportional set size (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return float(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def tree_pss_mb(root: int) -> float:
    """Proportional set size of a process and all its descendants, in MB."""
    return round(sum(pss_bytes(pid) for pid in process_tree(root)) / (1024 * 1024), 1)
