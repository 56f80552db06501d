"""CPU time as the benchmarks count it: the machine's busy time and a process tree's.

A process tree's CPU is, for every process alive in it, its own user and system time plus that
of the children it has reaped; a run's child that has exited is counted in its warm parent's
share, so the difference of two readings is what the tree spent between them.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """Seconds every CPU of the machine spent not idle since boot (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _TICK


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and its descendants (their own and their reaped children's)."""
    total = 0
    pending = [root]
    while pending:
        pid = pending.pop()
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces: the fields start after its closing parenthesis.
        fields = stat[stat.rindex(")") + 2 :].split()
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                pending.extend(int(child) for child in task.read_text().split())
            except OSError:
                continue
    return total / _TICK
