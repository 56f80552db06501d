"""Removing a run's scratch folder, whatever the run left in it.

A run controls what its folder holds: thousands of nested folders, names as long as the file
system allows, files it made unreadable. ``shutil.rmtree`` recurses (Python 3.11), so a tree
deeper than the recursion limit raises ``RecursionError``, which ``ignore_errors`` does not
catch, in the warm parent or the service. :func:`remove_tree` uses no recursion and no long
paths: it opens the folder once and, level by level, moves every subfolder up into it (by
``renameat`` relative to open folders) while it deletes the files, until the folder is empty.
It never raises.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str) -> bool:
    """Remove ``path`` and everything under it; True if it is gone."""
    try:
        _remove(path)
    except Exception:  # noqa: BLE001 - cleanup never takes its caller down
        return not os.path.lexists(path)
    return True


def _remove(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(path)
        return
    root = _open_folder(path, None)
    prefix = f".pyexec-removing-{secrets.token_hex(6)}-"
    moved = 0
    try:
        while True:
            progress = False
            with os.scandir(root) as listing:
                entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in listing]
            if not entries:
                break
            for name, is_folder in entries:
                if not is_folder:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=root)
                    progress = True
                    continue
                count, emptied = _lift_subfolders(root, name, prefix, moved)
                moved += count
                progress = progress or emptied or count > 0
            if not progress:
                return  # nothing more can be removed (the caller sees the folder is still there)
    finally:
        os.close(root)
    os.rmdir(path)


def _lift_subfolders(root: int, name: str, prefix: str, moved: int) -> tuple[int, bool]:
    """Delete the files of ``root/name``, move its subfolders up into ``root`` and remove it if
    that left it empty; return how many folders moved and whether it was removed."""
    folder = _open_folder(name, root)
    count = 0
    try:
        if not os.fstat(folder).st_mode & stat.S_IWUSR:
            # A read-only folder (a run's in/): its owner may make it writable to empty it.
            with contextlib.suppress(OSError):
                os.fchmod(folder, 0o700)
        with os.scandir(folder) as listing:
            entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in listing]
        for child, is_folder in entries:
            if not is_folder:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(child, dir_fd=folder)
                continue
            while True:
                target = f"{prefix}{moved + count}"
                count += 1
                try:
                    os.rename(child, target, src_dir_fd=folder, dst_dir_fd=root)
                except FileExistsError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.ENOTEMPTY:  # a folder of that name is there already
                        continue
                    raise
                break
    finally:
        os.close(folder)
    try:
        os.rmdir(name, dir_fd=root)
    except OSError:
        return count, False
    return count, True


def _open_folder(name: str, parent: int | None) -> int:
    try:
        return os.open(name, _DIRECTORY, dir_fd=parent)
    except PermissionError:
        # A folder the run made unreadable to its own uid: give it back its owner's rights.
        os.chmod(name, 0o700, dir_fd=parent)
        return os.open(name, _DIRECTORY, dir_fd=parent)
