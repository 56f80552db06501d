"""Installed scripts for ``pyexec.named``: safe name-to-file lookup and listing."""

from __future__ import annotations

import ast
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from consumer.errors import InvalidRequest, UnknownScript
from consumer.inputs import INPUT_CLASS, Declared, InputDeclarationError, declare, source_lines

# Dotted names of plain tokens; no token may start with '_' or '.', so '..', '/', '\\',
# absolute paths and hidden or private files can never be named.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9][A-Za-z0-9_-]*)*$")
MAX_NAME_LENGTH = 200
MAX_SCRIPT_BYTES = 1024 * 1024
CACHE_SIZE = 1024


@dataclass(frozen=True)
class ScriptInfo:
    """An installed script: its name and the first line of its docstring."""

    name: str
    summary: str


class Catalog:
    """The scripts under one directory; ``text.normalize`` is ``text/normalize.py``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        # path -> ((mtime, size), what was read): files are re-read only when they change.
        self._cache: dict[Path, tuple[tuple[int, int], Declared]] = {}

    def source(self, name: str) -> str:
        """The source of the script called ``name``, as written, or :class:`UnknownScript`."""
        path, _ = self._installed(name)
        return _text(path, name)

    def load(self, name: str) -> Declared:
        """The script called ``name`` as it runs, with its input type if it declares one.

        :class:`UnknownScript` if there is none; :class:`InvalidRequest` if its ``class Input``
        cannot be read (an installation error, reported to the caller rather than run).
        """
        path, info = self._installed(name)
        stamp = (info.st_mtime_ns, info.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            declared = declare(_text(path, name), name)
        except InputDeclarationError as exc:
            raise InvalidRequest(f"script '{name}' has an unusable class Input: {exc}") from None
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[path] = (stamp, declared)
        return declared

    def _installed(self, name: str) -> tuple[Path, os.stat_result]:
        found = self._path(name)
        if found is None:
            raise UnknownScript(f"no script named '{shown(name)}' is installed")
        return found

    def _path(self, name: str) -> tuple[Path, os.stat_result] | None:
        """The script file called ``name`` and its status, read once; None if not served."""
        if len(name) > MAX_NAME_LENGTH or not NAME.fullmatch(name):
            return None
        *folders, stem = name.split(".")
        candidate = self.root.joinpath(*folders, f"{stem}.py")
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        # A symlink inside the folder must not lead out of it.
        if not resolved.is_relative_to(self.root):
            return None
        try:
            info = resolved.stat()
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SCRIPT_BYTES:
            return None
        return resolved, info

    def describe(self, name: str) -> str:
        """The script's docstring and its ``class Input`` as written, for people to read."""
        source = self.source(name)
        try:
            tree = ast.parse(source)
        except SyntaxError as exc:
            return f"{name}: does not parse ({exc.msg}, line {exc.lineno})"
        parts = [name, "", (ast.get_docstring(tree) or "(no description)").strip()]
        declaration = next(
            (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == INPUT_CLASS), None
        )
        if declaration is None:
            parts += ["", "ctx: not declared (the script checks it itself)"]
        else:
            lines = source_lines(source)[declaration.lineno - 1 : declaration.end_lineno]
            parts += ["", *lines]
        return "\n".join(parts)

    def scripts(self) -> list[ScriptInfo]:
        """Every installed script, sorted by name."""
        found = []
        for path in sorted(self.root.rglob("*.py")):
            relative = path.relative_to(self.root).with_suffix("")
            name = ".".join(relative.parts)
            if self._path(name) is None:
                continue
            found.append(ScriptInfo(name=name, summary=_summary(path)))
        return found


def _text(path: Path, name: str) -> str:
    """An installed script's source; :class:`InvalidRequest` if it is not UTF-8 (an
    installation error, reported to the caller rather than run)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"script '{name}' is not UTF-8 text (byte {exc.start}); it cannot be run"
        ) from None


def _summary(path: Path) -> str:
    try:
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
        return ""
    return (docstring or "").strip().splitlines()[0] if docstring else ""


def shown(name: str) -> str:
    """The name as it may appear in an error message: printable and short."""
    text = "".join(ch if ch.isprintable() else "?" for ch in name[:80])
    return text + ("..." if len(name) > 80 else "")
