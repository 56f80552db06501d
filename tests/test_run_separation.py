"""Nothing of another run: not in a child's memory, not on disk, not in its random numbers.

The memory and disk checks run with the policy layer off, so the script reads its own memory
(``/proc/self/mem``) and the scratch root as a policy bypass would.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import landlock
from sandbox.config import PoolConfig
from tests.pools import LivePool, live, ok_result, only

# Reads every readable mapping of the run's own memory and counts where the secret whose two
# halves are ``head`` and ``tail`` appears whole. The scanner never holds the whole secret itself:
# it looks for the head and compares the bytes after it with the tail.
SCAN = """
def execute(ctx):
    head, tail = bytes.fromhex(ctx["head"]), bytes.fromhex(ctx["tail"])
    found = 0
    with open("/proc/self/maps", encoding="ascii") as maps, open("/proc/self/mem", "rb") as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            start, end = (int(part, 16) for part in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            at = chunk.find(head)
            while at != -1:
                found += chunk[at + len(head) : at + len(head) + len(tail)] == tail
                at = chunk.find(head, at + 1)
    return found
"""


def halves(secret: str) -> dict[str, str]:
    data = secret.encode()
    middle = len(data) // 2
    return {"head": data[:middle].hex(), "tail": data[middle:].hex()}


HOLDER = """
SECRET = "{secret}"
def execute(ctx):
    return len(SECRET + ctx["also"])
"""


@pytest.fixture(scope="module")
def open_pool(scratch_base: Path) -> Iterator[LivePool]:
    """Every layer off: a run may read its whole memory and any file."""
    with live(only(None, scratch_base)) as pool:
        yield pool


def test_a_run_finds_its_own_secret_in_its_memory(open_pool: LivePool) -> None:
    """Control: the memory scan finds a secret the scanning run holds itself."""
    marker = "own-" + secrets.token_hex(12)
    source = SCAN.replace("def execute(ctx):", f'MINE = "{marker}"\ndef execute(ctx):', 1)
    assert ok_result(open_pool.run(source, **halves(marker))) >= 1


def test_no_child_holds_another_runs_script_ctx_or_result(open_pool: LivePool) -> None:
    """After a run whose script, ctx and result hold secrets ran (twice, so the pool compiled
    and kept it), no later run finds any of them anywhere in its memory."""
    secret = "script-" + secrets.token_hex(12)
    also = "ctx-" + secrets.token_hex(12)
    source = HOLDER.format(secret=secret)
    for _ in range(3):
        assert ok_result(open_pool.run(source, also=also)) == len(secret) + len(also)
    for needle in (secret, also):
        assert ok_result(open_pool.run(SCAN, **halves(needle))) == 0, needle


def test_a_cached_script_still_runs_from_its_own_code(open_pool: LivePool) -> None:
    """A script that ran before gets its code from the pool: the run's own constants only."""
    secret = "again-" + secrets.token_hex(12)
    source = HOLDER.format(secret=secret)
    results = [open_pool.run(source, also="x") for _ in range(4)]
    assert [ok_result(outcome) for outcome in results] == [len(secret) + 1] * 4


@pytest.mark.skipif(landlock.abi_version() == 0, reason="Landlock is not available")
def test_a_run_cannot_read_a_concurrent_runs_scratch_folder(scratch_base: Path) -> None:
    """Under Landlock (the policy off) a run cannot open a file another run is still using."""
    writer = """
        import os, time
        def execute(ctx):
            with open("note.txt", "w", encoding="utf-8") as handle:
                handle.write("private")
            time.sleep(ctx["hold"])
            return os.path.join(os.getcwd(), "note.txt")
        """
    reader = """
        def execute(ctx):
            try:
                with open(ctx["path"], encoding="utf-8") as handle:
                    return handle.read()
            except OSError as exc:
                return type(exc).__name__
        """
    with live(only("landlock", scratch_base)) as pool:
        pending = pool.submit(writer, hold=3)
        root = Path(pool.pool.scratch_root())
        folders = [path for path in root.iterdir() if (path / "note.txt").exists()]
        for _ in range(100):
            if folders:
                break
            import time

            time.sleep(0.05)
            folders = [path for path in root.iterdir() if (path / "note.txt").exists()]
        (folder,) = folders
        seen = ok_result(pool.run(reader, path=str(folder / "note.txt")))
        assert ok_result(pending.result(30)) == str(folder / "note.txt")
    assert seen == "PermissionError"


def test_a_run_cannot_find_another_runs_folder(scratch_base: Path) -> None:
    """Folders have random names, not pids, and the scratch root cannot be listed: with every
    layer but the policy on, a run sees its own folder's name and nothing of the others'."""
    source = """
        import os
        def execute(ctx):
            root, name = os.path.split(os.getcwd())
            try:
                listing = os.listdir(root)
            except OSError as exc:
                listing = type(exc).__name__
            return [name, str(os.getpid()), listing]
        """
    config = PoolConfig(scratch_dir=str(scratch_base), disabled_layers=("policy",))
    with live(config) as pool:
        name, pid, listing = ok_result(pool.run(source))
    assert re.fullmatch("[0-9a-f]{32}", name), name  # 128 random bits
    assert pid not in name
    assert listing == "PermissionError"


# What Landlock does not mediate, seccomp refuses: watching folders, changing modes, owners,
# times and extended attributes, allocating past the file-size limit, and having the kernel
# signal a process of the run's choosing. Each would otherwise reach another run's files (or
# the service's, which share the runs' uid in the image) or another process.
METADATA_CALLS = {
    "inotify": "check(libc.inotify_init1(0))",
    "chmod": "os.chmod('mine', 0o777)",
    "fchmod": "os.fchmod(os.open('mine', os.O_RDONLY), 0o777)",
    "chown": "os.chown('mine', os.getuid(), os.getgid())",
    "utime": "os.utime('mine', (0, 0))",
    "setxattr": "os.setxattr('mine', 'user.note', b'x')",
    # FALLOC_FL_KEEP_SIZE allocates past the end, outside RLIMIT_FSIZE: 1 GiB here.
    "fallocate keeping the size": "check(libc.fallocate(os.open('mine', os.O_RDWR), 1, "
    "ctypes.c_long(0), ctypes.c_long(1 << 30)))",
    "F_SETOWN": "fcntl.fcntl(os.open('mine', os.O_RDONLY), fcntl.F_SETOWN, 1)",
    "F_SETSIG": "fcntl.fcntl(os.open('mine', os.O_RDONLY), 10, 9)",  # F_SETSIG, SIGKILL
}


@pytest.fixture(scope="module")
def seccomp_pool(scratch_base: Path) -> Iterator[LivePool]:
    with live(only("seccomp", scratch_base)) as pool:
        yield pool


@pytest.mark.parametrize("name", METADATA_CALLS)
def test_seccomp_refuses_what_landlock_leaves_open(seccomp_pool: LivePool, name: str) -> None:
    """With seccomp alone (the policy off), each of these fails with EPERM on the run's own
    file: nothing of it is possible on another's."""
    source = f"""
        import ctypes, fcntl, os
        libc = ctypes.CDLL(None, use_errno=True)
        def check(result):
            if result < 0:
                raise OSError(ctypes.get_errno(), "refused")
        def execute(ctx):
            with open("mine", "wb") as handle:
                handle.write(b"x")
            try:
                {METADATA_CALLS[name]}
            except PermissionError as exc:
                return ["refused", exc.errno]
            return ["done", None]
        """
    assert ok_result(seccomp_pool.run(source)) == ["refused", 1], name


RANDOM = """
import random, secrets, uuid
import numpy as np
def execute(ctx):
    return [
        random.random(),
        int(np.random.randint(0, 2**62)),
        float(np.random.rand()),
        int(np.random.default_rng().integers(0, 2**62)),
        secrets.token_hex(8),
        str(uuid.uuid4()),
    ]
"""


def test_every_run_starts_from_fresh_randomness(scratch_base: Path) -> None:
    """random, numpy's legacy global state and default_rng, secrets and uuid4 differ from one
    run to the next (children of one warm parent used to share numpy's state)."""
    with live(PoolConfig(workers=1, warm_children=2, scratch_dir=str(scratch_base))) as pool:
        runs = [ok_result(pool.run(RANDOM)) for _ in range(4)]
    for position in range(len(runs[0])):
        values = [run[position] for run in runs]
        assert len(set(values)) == len(values), (position, values)


SIBLINGS = """
import sys

def execute(ctx):
    frame = sys._getframe()
    while frame is not None and frame.f_code.co_name != "_become_child":
        frame = frame.f_back
    parent = frame.f_locals["self"]
    return {"siblings": list(parent.children.values()), "found": True}
"""


def test_a_run_holds_no_names_of_its_siblings_folders(scratch_base: Path) -> None:
    """Below the policy, the warm parent's table of its children (their scratch folders'
    names) is reachable from a run's frames; it is emptied in each child before anything
    else, so a run cannot learn where another run's files are."""
    config = PoolConfig(
        workers=2, warm_children=3, disabled_layers=("policy",), scratch_dir=str(scratch_base)
    )
    with live(config) as pool:
        # Another run in flight, and children waiting: the table had entries when forked.
        pending = pool.submit("import time\ndef execute(ctx):\n    time.sleep(2)\n")
        outcome = ok_result(pool.run(SIBLINGS))
        assert outcome == {"siblings": [], "found": True}
        pending.result(30)
