"""A run's files: the request's inputs placed at ``in/`` and what the script leaves in ``out/``.

Both happen in the pool (the service's process) on a folder a child owns, so nothing here
follows a link the script may have made: the folders are opened with ``O_NOFOLLOW`` and files
are reached relative to them. Inputs are placed after the child is isolated and before the
script arrives (the folder holds only what the child made itself); they are read-only (mode
0444 in a folder the run cannot write, and seccomp refuses chmod). Outputs are opened after the
run answered and handed on once its process is gone: a regular file with one link, named as an
alias is (``[A-Za-z0-9._-]``, 1-100 characters, not starting with a dot); anything else there
(a folder, a link, a device) is ignored, and a name, count or size outside the rules ends the
run ``output_limit``.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable

from sandbox.api import InputFile, OutputFile
from sandbox.isolation import IN_FOLDER, OUT_FOLDER

NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_COPY_CHUNK = 1 << 24


class OutputRefused(Exception):
    """What ``out/`` holds breaks a rule; the message says which."""


def place_inputs(scratch: str, inputs: Iterable[InputFile]) -> None:
    """Copy each input to ``<scratch>/in/<alias>``, read-only (blocking: run in a thread)."""
    inputs = list(inputs)
    if not inputs:
        return
    root = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.mkdir(IN_FOLDER, 0o755, dir_fd=root)
        folder = os.open(IN_FOLDER, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
    finally:
        os.close(root)
    try:
        for item in inputs:
            if not NAME.fullmatch(item.alias):
                raise ValueError(f"not a file name: {item.alias!r}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            target = os.open(item.alias, flags, 0o444, dir_fd=folder)
            try:
                _copy(item.fd, target, item.size)
            finally:
                os.close(target)
        # Nothing may be added, removed or renamed in in/ by the run either (the run's user
        # may own the folder, and seccomp refuses chmod).
        os.fchmod(folder, 0o555)
    finally:
        os.close(folder)


def _copy(source: int, target: int, size: int) -> None:
    offset = 0
    while offset < size:
        copied = os.copy_file_range(source, target, min(_COPY_CHUNK, size - offset), offset)
        if copied == 0:
            raise OSError(f"the input ended after {offset} of {size} bytes")
        offset += copied


def open_outputs(scratch: str, *, max_files: int, max_bytes: int) -> list[OutputFile]:
    """Open the regular files in ``<scratch>/out`` for reading; raise :class:`OutputRefused`.
    The caller closes the descriptors (:func:`close_all`)."""
    try:
        root = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return []
    try:
        folder = os.open(OUT_FOLDER, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
    except OSError:
        return []  # gone, or replaced by something that is not a folder: nothing to store
    finally:
        os.close(root)
    found: list[OutputFile] = []
    try:
        for name in sorted(os.listdir(folder)):
            try:
                info = os.stat(name, dir_fd=folder, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            if not NAME.fullmatch(name):
                raise OutputRefused(
                    f"out/ holds a file named {name[:120]!r}: names are letters, digits, '.', "
                    "'_' and '-', 1 to 100 characters, not starting with '.'"
                )
            if len(found) >= max_files:
                raise OutputRefused(f"the script left more than {max_files} files in out/")
            found.append(_open_output(folder, name))
            total = sum(item.size for item in found)
            if total > max_bytes:
                raise OutputRefused(
                    f"the files in out/ hold more than {max_bytes // (1024 * 1024)} MB"
                )
    except BaseException:
        close_all(found)
        raise
    finally:
        os.close(folder)
    return found


def _open_output(folder: int, name: str) -> OutputFile:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, dir_fd=folder)
    except OSError as exc:
        raise OutputRefused(f"out/{name} cannot be read: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise OutputRefused(f"out/{name} is not a plain file of the run's own (a link?)")
    return OutputFile(name=name, fd=fd, size=info.st_size)


def close_all(files: Iterable[InputFile | OutputFile]) -> None:
    for item in files:
        with contextlib.suppress(OSError):
            os.close(item.fd)
