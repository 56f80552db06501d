"""The scratch quota: total bytes and number of files, enforced while a run writes.

The runs here have the policy layer off (plain ``os`` and ``open``), as a policy bypass would,
and the limits layer on; every other layer is off, so what ends them is the quota alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.api import Outcome
from tests.pools import LivePool, eventually, live, ok_result, only

LIMIT_MB = 4
MAX_FILES = 50
MB = 1024 * 1024


@pytest.fixture(scope="module")
def quota_pool(scratch_base: Path) -> Iterator[LivePool]:
    config = only("limits", scratch_base, scratch_limit_mb=LIMIT_MB, scratch_files=MAX_FILES)
    with live(config) as pool:
        yield pool


def assert_disk_limit(outcome: Outcome, mention: str) -> None:
    assert outcome.status == "error", outcome
    assert outcome.error is not None
    assert outcome.error.code == "disk_limit", outcome.error
    assert mention in outcome.error.message, outcome.error.message


def test_files_under_the_quota_are_fine(quota_pool: LivePool) -> None:
    """Three files of 1 MB and a folder stay within 4 MB and 50 entries: the run is ok."""
    source = """
        import os
        def execute(ctx):
            os.mkdir("sub")
            for name in ("a", "b", "sub/c"):
                with open(name, "wb") as handle:
                    handle.write(b"x" * (1024 * 1024))
            return sorted(os.listdir(".")), os.listdir("sub")
        """
    assert ok_result(quota_pool.run(source)) == [["a", "b", "out", "sub"], ["c"]]


def test_many_files_each_under_the_cap_end_the_run(quota_pool: LivePool) -> None:
    """Six files of 1 MB (each under the per-file cap, 6 MB in all) end the run disk_limit."""
    source = """
        def execute(ctx):
            for index in range(6):
                with open(f"part{index}.bin", "wb") as handle:
                    handle.write(b"x" * (1024 * 1024))
            return "all written"
        """
    assert_disk_limit(quota_pool.run(source), f"more than {LIMIT_MB} MB")


def test_too_many_files_end_the_run(quota_pool: LivePool) -> None:
    """Creating 5,000 empty files ends the run once it passes the file count."""
    source = """
        import os
        def execute(ctx):
            for index in range(5000):
                os.close(os.open(f"f{index}", os.O_CREAT | os.O_WRONLY))
            return "created"
        """
    assert_disk_limit(quota_pool.run(source), f"more than {MAX_FILES} files and folders")


def test_folders_count_as_entries(quota_pool: LivePool) -> None:
    """Nested folders count toward the number of entries too."""
    source = """
        import os
        def execute(ctx):
            path = "d"
            for index in range(200):
                os.makedirs(path)
                path = os.path.join(path, "d")
            return "nested"
        """
    assert_disk_limit(quota_pool.run(source), "files and folders")


def test_one_file_past_the_cap_fails_its_write(quota_pool: LivePool) -> None:
    """One file may not grow past the quota: the write fails EFBIG, which the script sees."""
    source = """
        import errno
        def execute(ctx):
            try:
                with open("big.bin", "wb") as handle:
                    handle.write(b"x" * (ctx["limit"] * 2))
            except OSError as exc:
                return errno.errorcode[exc.errno]
            return "written"
        """
    assert ok_result(quota_pool.run(source, limit=LIMIT_MB * MB)) == "EFBIG"


def test_a_file_deleted_while_open_still_counts(quota_pool: LivePool) -> None:
    """Bytes written to a file after it was deleted (still open) count: the run ends."""
    source = """
        import os, time
        def execute(ctx):
            handles = []
            for index in range(3):
                handle = open(f"gone{index}", "wb")
                os.remove(f"gone{index}")
                handle.write(b"x" * (3 * 1024 * 1024))
                handle.flush()
                handles.append(handle)
            time.sleep(1)
            return "hidden"
        """
    assert_disk_limit(quota_pool.run(source), f"more than {LIMIT_MB} MB")


def test_a_deleted_file_kept_only_by_a_mapping_still_counts(quota_pool: LivePool) -> None:
    """Files written, mapped into memory, closed and deleted hold their space while mapped,
    with no descriptor and no name left to see them by: they count, and the run ends."""
    source = """
        import mmap, os, time
        def execute(ctx):
            maps = []
            for index in range(3):
                name = f"mapped{index}"
                with open(name, "wb") as handle:
                    handle.write(b"x" * (3 * 1024 * 1024))
                with open(name, "r+b") as handle:
                    maps.append(mmap.mmap(handle.fileno(), 0))
                for fd in os.listdir("/proc/self/fd"):  # the mapping's own copy of the fd
                    try:
                        if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
                            os.close(int(fd))
                    except OSError:
                        pass
                os.remove(name)
                time.sleep(0.2)
            time.sleep(1)
            return "mapped and hidden"
        """
    assert_disk_limit(quota_pool.run(source), f"more than {LIMIT_MB} MB")


def test_unnamed_temporary_files_count(quota_pool: LivePool) -> None:
    """tempfile.TemporaryFile (O_TMPFILE, never named) counts toward the quota while open."""
    source = """
        import tempfile, time
        def execute(ctx):
            files = [tempfile.TemporaryFile() for _ in range(3)]
            for handle in files:
                handle.write(b"x" * (3 * 1024 * 1024))
                handle.flush()
            time.sleep(1)
            return "unnamed"
        """
    assert_disk_limit(quota_pool.run(source), f"more than {LIMIT_MB} MB")


def test_sparse_and_preallocated_files_count_for_what_they_claim(quota_pool: LivePool) -> None:
    """A file truncated to a large size, and space preallocated past its end, both count."""
    sparse = """
        import os
        def execute(ctx):
            for index in range(3):
                with open(f"sparse{index}", "wb") as handle:
                    handle.truncate(3 * 1024 * 1024)
            return "sparse"
        """
    assert_disk_limit(quota_pool.run(sparse), f"more than {LIMIT_MB} MB")
    preallocated = """
        import os
        def execute(ctx):
            for index in range(3):
                fd = os.open(f"pre{index}", os.O_CREAT | os.O_WRONLY)
                os.posix_fallocate(fd, 0, 3 * 1024 * 1024)
            return "preallocated"
        """
    assert_disk_limit(quota_pool.run(preallocated), f"more than {LIMIT_MB} MB")


def test_the_pool_serves_on_after_a_disk_limit(quota_pool: LivePool) -> None:
    """After a run ended disk_limit its folder is removed and the next run is fine."""
    source = """
        import os
        def execute(ctx):
            for index in range(8):
                with open(f"f{index}", "wb") as handle:
                    handle.write(b"x" * (1024 * 1024))
            return os.getcwd()
        """
    outcome = quota_pool.run(source)
    assert_disk_limit(outcome, "MB")
    root = Path(quota_pool.pool.scratch_root())
    assert eventually(lambda: len(list(root.iterdir())) <= quota_pool.config.warm_children)
    assert ok_result(quota_pool.run("def execute(ctx):\n    return 'next'\n")) == "next"


def test_the_first_run_of_a_pool_is_counted_too(scratch_base: Path) -> None:
    """Regression: a child was handed over before it had made its scratch folder, the watch
    failed, and that run (always the first of a pool) was not counted at all."""
    config = only("limits", scratch_base, scratch_limit_mb=LIMIT_MB, scratch_files=MAX_FILES)
    source = """
        def execute(ctx):
            for index in range(8):
                with open(f"f{index}", "wb") as handle:
                    handle.write(b"x" * (1024 * 1024))
            return "written"
        """
    for _ in range(3):
        with live(config) as pool:
            assert_disk_limit(pool.run(source), f"more than {LIMIT_MB} MB")


def test_a_deep_folder_tree_is_counted_and_removed(scratch_base: Path) -> None:
    """Regression: a tree deeper than Python's recursion limit, moved after it was made, broke
    the pool's count (it walked folders recursively) and the warm parent's clean-up
    (``shutil.rmtree`` recurses): bytes written at the bottom went uncounted, the warm parent
    died and the pool never got a new one. Now the run ends disk_limit, its folder goes, and the
    pool serves on."""
    config = only("limits", scratch_base, scratch_limit_mb=LIMIT_MB, scratch_files=5000)
    source = """
        import os
        def execute(ctx):
            path = "a"
            os.mkdir(path)
            for _ in range(1500):
                path = os.path.join(path, "d")
                os.mkdir(path)
            os.rename("a", "b")
            for index in range(4):  # each under the per-file cap, 8 MB in all
                with open(os.path.join("b", path[2:], f"data{index}"), "wb") as handle:
                    handle.write(b"x" * (2 * 1024 * 1024))
            return "written"
        """
    with live(config) as pool:
        assert_disk_limit(pool.run(source, timeout=30), f"more than {LIMIT_MB} MB")
        assert ok_result(pool.run("def execute(ctx):\n    return 'next'\n")) == "next"
        root = Path(pool.pool.scratch_root())
        assert eventually(lambda: len(list(root.iterdir())) <= config.warm_children)
