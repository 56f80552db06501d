"""Huge pages for the warm parent's memory, so each fork copies fewer page-table entries.

A fork copies the parent's page tables and the child's exit tears its copy down: with 4 KiB
pages a 160 MB parent has some 40,000 entries to copy and free per run. ``MADV_COLLAPSE``
(Linux 6.1) turns populated anonymous memory into 2 MiB pages in place, one entry for 512. It
is applied once, after the imports, to the private writable anonymous regions (the heap and
the allocators' arenas). A child that writes to such a page still copies only the 4 KiB it
writes. Where the kernel refuses (older kernel, transparent huge pages set to ``never``) the
parent goes on with small pages: nothing else changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno

MADV_COLLAPSE = 25
HUGE_PAGE = 2 * 1024 * 1024


def collapse() -> float:
    """Collapse this process's anonymous memory into huge pages where the kernel allows;
    return the MB now in huge pages (0 when none)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0.0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    for start, end in _anonymous_regions():
        first = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        last = end & ~(HUGE_PAGE - 1)
        if last - first < HUGE_PAGE:
            continue
        if madvise(first, last - first, MADV_COLLAPSE) != 0 and ctypes.get_errno() in (
            errno.EINVAL,
            errno.ENOSYS,
            errno.EPERM,
        ):
            break  # This kernel cannot collapse at all: do not try every region.
    return huge_pages_mb()


def huge_pages_mb() -> float:
    """MB of this process's anonymous memory in huge pages."""
    with (
        contextlib.suppress(OSError, ValueError, IndexError),
        open("/proc/self/smaps_rollup", encoding="ascii") as rollup,
    ):
        for line in rollup:
            if line.startswith("AnonHugePages:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _anonymous_regions() -> list[tuple[int, int]]:
    """Private writable regions backed by no file: ``[heap]`` and anonymous mappings."""
    regions = []
    with contextlib.suppress(OSError), open("/proc/self/maps", encoding="ascii") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 5 or fields[1] != "rw-p":
                continue
            name = fields[5] if len(fields) > 5 else ""
            if name not in ("", "[heap]"):
                continue
            start, _, end = fields[0].partition("-")
            regions.append((int(start, 16), int(end, 16)))
    return regions
