"""The scratch quota: how many bytes and files a run's scratch folder may hold, enforced as it
fills.

The kernel caps each file (``RLIMIT_FSIZE``, set by the limits layer) but has no unprivileged
cap on a folder. The pool watches every run's scratch folder with inotify, from outside the
sandbox: each event updates the run's count of entries and bytes (the larger of a file's size
and its allocated blocks, so sparse and preallocated files count for what they claim), and a
run that goes past either limit is killed and ends ``disk_limit``. Files that were deleted while
still open, and unnamed ``O_TMPFILE`` files, still take disk space: inotify reports their
writes by their old name, and their size is then read from the run's open descriptors
(``/proc/<pid>/fd``); a deleted file that is still mapped into the run's memory (``mmap``, its
descriptor closed) counts for the size it had when it was last seen by name, found in
``/proc/<pid>/maps``. What a run writes before the pool reads the event is bounded by the
per-file cap; the check at the end of the run sees every event, since a write is queued as an
event before the run can answer. A file that was deleted and closed between two looks no longer
takes space and is not counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
_WATCHED = (
    IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_ONLYDIR | IN_DONT_FOLLOW
)  # fmt: skip
_EVENT = struct.Struct("iIII")
_READ_SIZE = 64 * 1024
_DELETED = " (deleted)"

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Limits:
    """What one run's scratch folder may hold."""

    max_bytes: int
    max_files: int


@dataclass(eq=False)
class Usage:
    """What one run's scratch folder holds, as the events told it."""

    root: str
    pid: int
    limits: Limits
    on_exceeded: Callable[[str], None]
    folders: dict[int, str] = field(default_factory=dict)  # watch descriptor -> folder
    entries: dict[str, int] = field(default_factory=dict)  # path -> bytes (0 for folders)
    sizes: dict[int, int] = field(default_factory=dict)  # inode -> bytes, as last seen by name
    unlinked: int = 0  # bytes of files deleted while open, and unnamed ones, at the last scan
    unlinked_pending: bool = False
    exceeded: str | None = None

    @property
    def bytes(self) -> int:
        return sum(self.entries.values()) + self.unlinked

    @property
    def files(self) -> int:
        return len(self.entries)

    def fail(self, reason: str) -> None:
        """End the run: its folder cannot be accounted for (reported once)."""
        if self.exceeded is None:
            self.exceeded = reason
            self.on_exceeded(reason)

    def check(self) -> None:
        """Compare with the limits; the first excess is remembered and reported once."""
        if self.exceeded is not None:
            return
        reason = None
        if self.files > self.limits.max_files:
            reason = (
                f"the run created more than {self.limits.max_files} files and folders in its "
                "scratch folder"
            )
        elif self.bytes > self.limits.max_bytes:
            reason = (
                f"the run wrote more than {self.limits.max_bytes // (1024 * 1024)} MB to its "
                "scratch folder"
            )
        if reason is not None:
            self.exceeded = reason
            self.on_exceeded(reason)


def _size(info: os.stat_result) -> int:
    if not stat.S_ISREG(info.st_mode):
        return 0
    return max(info.st_size, info.st_blocks * 512)


class ScratchQuota:
    """One inotify instance for every run of a pool; call :meth:`read` when its fd is readable."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self.fd: int = fd
        self._by_watch: dict[int, Usage] = {}
        self._runs: set[Usage] = set()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- runs -------------------------------------------------------------------------------------

    def watch(
        self, root: str, pid: int, limits: Limits, on_exceeded: Callable[[str], None]
    ) -> Usage:
        """Start accounting for the run ``pid`` whose scratch folder is ``root``."""
        usage = Usage(root, pid, limits, on_exceeded)
        self._runs.add(usage)
        self._add_folder(usage, root, counted=False)
        usage.check()
        return usage

    def settle(self, usage: Usage) -> None:
        """Take in every event queued so far and check ``usage`` one last time."""
        self.read()
        if usage.unlinked_pending:
            self._scan_unlinked(usage)
        usage.check()

    def release(self, usage: Usage) -> None:
        """Stop accounting for a run (its folder is about to be removed)."""
        self._runs.discard(usage)
        for wd in list(usage.folders):
            self._by_watch.pop(wd, None)
            _libc.inotify_rm_watch(self.fd, wd)
        usage.folders.clear()

    # -- events -----------------------------------------------------------------------------------

    def read(self) -> None:
        """Read and apply every queued event."""
        touched: set[Usage] = set()
        overflow = False
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            for wd, mask, name in _events(data):
                if mask & IN_Q_OVERFLOW:
                    overflow = True
                    continue
                usage = self._by_watch.get(wd)
                if usage is None:
                    continue
                if mask & IN_IGNORED:
                    self._by_watch.pop(wd, None)
                    usage.folders.pop(wd, None)
                    continue
                self._apply(usage, usage.folders[wd], mask, name)
                touched.add(usage)
        if overflow:
            for usage in self._runs:
                self._rescan(usage)
            touched |= self._runs
        for usage in touched:
            if usage.unlinked_pending:
                self._scan_unlinked(usage)
            usage.check()

    def _apply(self, usage: Usage, folder: str, mask: int, name: str) -> None:
        path = os.path.join(folder, name)
        if mask & (IN_DELETE | IN_MOVED_FROM):
            removed = self._forget(usage, path)
            if removed and mask & IN_DELETE:
                usage.unlinked_pending = True  # it may still be open
            return
        if mask & (IN_CREATE | IN_MOVED_TO):
            if mask & IN_ISDIR:
                self._add_folder(usage, path, counted=True)
            else:
                self._update(usage, path, new=True)
            return
        if mask & (IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB) and not mask & IN_ISDIR:
            self._update(usage, path, new=False)

    def _update(self, usage: Usage, path: str, *, new: bool) -> None:
        try:
            info = os.lstat(path)
        except OSError:
            # Deleted while open, or an unnamed O_TMPFILE ("#<inode>"): read it from the fds.
            usage.unlinked_pending = True
            return
        if new or path in usage.entries:
            size = _size(info)
            usage.entries[path] = size
            if size:
                usage.sizes[info.st_ino] = size  # what it holds if it is deleted while mapped

    def _forget(self, usage: Usage, path: str) -> bool:
        """Drop ``path`` (and, for a folder, what is under it); True if it held bytes."""
        held = usage.entries.pop(path, 0) > 0
        prefix = path + os.sep
        for entry in [entry for entry in usage.entries if entry.startswith(prefix)]:
            held = usage.entries.pop(entry) > 0 or held
        for wd, folder in list(usage.folders.items()):
            if folder == path or folder.startswith(prefix):
                usage.folders.pop(wd, None)
                self._by_watch.pop(wd, None)
        return held

    def _add_folder(self, usage: Usage, path: str, *, counted: bool) -> None:
        """Watch a folder, then take in what it already holds (made before the watch), folders
        inside it included, however deep: one folder at a time, without recursion."""
        pending = [(path, counted)]
        while pending and usage.exceeded is None:
            folder, count = pending.pop()
            if count:
                usage.entries[folder] = 0
            if usage.files > usage.limits.max_files:
                usage.check()  # past the limit already: no need to look further
                return
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(folder), _WATCHED)
            if wd < 0:
                code = ctypes.get_errno()
                if code == errno.ENOENT and folder != usage.root:
                    usage.entries.pop(folder, None)  # a folder removed since its event
                    continue
                # Fail closed: a folder that cannot be watched cannot be accounted for.
                usage.fail(f"the run's scratch folder could not be watched ({os.strerror(code)})")
                return
            usage.folders[wd] = folder
            self._by_watch[wd] = usage
            with contextlib.suppress(OSError), os.scandir(folder) as listing:
                for entry in listing:
                    child = os.path.join(folder, entry.name)
                    if child in usage.entries:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((child, True))
                    else:
                        self._update(usage, child, new=True)

    def fail(self, reason: str) -> None:
        """Every run being accounted for ends: the quota can no longer be kept."""
        for usage in list(self._runs):
            usage.fail(reason)

    def _rescan(self, usage: Usage) -> None:
        """Account for a run from its folder as it is now (after the event queue overflowed)."""
        usage.entries.clear()
        for wd in list(usage.folders):
            self._by_watch.pop(wd, None)
            _libc.inotify_rm_watch(self.fd, wd)
        usage.folders.clear()
        self._add_folder(usage, usage.root, counted=False)
        usage.unlinked_pending = True

    @staticmethod
    def _scan_unlinked(usage: Usage) -> None:
        """Bytes held by the run's open files under its folder that have no name any more."""
        usage.unlinked_pending = False
        total = 0
        seen: set[int] = set()
        for link in _open_files(usage.pid):
            try:
                target = os.readlink(link)
                if not target.endswith(_DELETED) or not target.startswith(usage.root + os.sep):
                    continue
                info = os.stat(link)
            except OSError:
                continue
            if info.st_ino not in seen:
                seen.add(info.st_ino)
                total += _size(info)
        for inode, extent in _mapped_deleted(usage.pid, usage.root + os.sep):
            if inode not in seen:
                seen.add(inode)
                total += max(usage.sizes.get(inode, 0), extent)
        # The most seen: a run that exits or closes a file has still used the space.
        usage.unlinked = max(usage.unlinked, total)


def _open_files(pid: int) -> Iterable[str]:
    folder = f"/proc/{pid}/fd"
    try:
        names = os.listdir(folder)
    except OSError:
        return ()
    return [os.path.join(folder, name) for name in names]


def _mapped_deleted(pid: int, prefix: str) -> Iterable[tuple[int, int]]:
    """(inode, mapped bytes) of the deleted files under ``prefix`` mapped into ``pid``."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            lines = maps.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return []
    extents: dict[int, int] = {}
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].endswith(_DELETED) or not fields[5].startswith(prefix):
            continue
        start, _, end = fields[0].partition("-")
        try:
            inode = int(fields[4])
            offset = int(fields[2], 16)
            extent = offset + int(end, 16) - int(start, 16)
        except ValueError:
            continue
        extents[inode] = max(extents.get(inode, 0), extent)
    return list(extents.items())


def _events(data: bytes) -> Iterable[tuple[int, int, str]]:
    offset = 0
    while offset + _EVENT.size <= len(data):
        wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
        offset += _EVENT.size + length
        yield wd, mask, os.fsdecode(raw.rstrip(b"\0"))
