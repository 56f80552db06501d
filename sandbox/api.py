"""The typed door between the consumer and the sandbox: a job in, an outcome out."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Status = Literal["ok", "error", "timeout"]
ErrorCode = Literal[
    "policy_violation",
    "syntax_error",
    "script_error",
    "memory_limit",
    "output_limit",
    "disk_limit",
    "result_not_serializable",
    "worker_lost",
    "timeout",
    "missing_entry_point",
]


class InputFile(msgspec.Struct, frozen=True, kw_only=True):
    """A file the run gets, read-only, at ``in/<alias>`` of its scratch folder: copied from
    ``fd`` (an open, readable, seekable file the caller keeps and closes)."""

    alias: str
    fd: int
    size: int


class OutputFile(msgspec.Struct, frozen=True, kw_only=True):
    """A regular file the script left in ``out/``: ``fd`` is open for reading at its start,
    and the receiver of the outcome closes it. The run's process is gone, so it no longer
    changes."""

    name: str
    fd: int
    size: int


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One script to run: its source, its input and its wall-clock budget in seconds."""

    source: str
    ctx: dict[str, Any]
    timeout: float
    inputs: tuple[InputFile, ...] = ()


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Why a run did not return a result."""

    code: ErrorCode
    type: str
    message: str
    traceback: str | None = None


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one run ended with.

    ``result`` holds plain JSON-compatible values only (already converted from
    datetimes, decimals, numpy and pandas objects). ``duration_ms`` is the time
    from handing the job to a child to its answer; ``wait_ms`` the time spent
    waiting for a free worker before that.
    """

    status: Status
    result: Any = None
    error: ErrorInfo | None = None
    stdout: str = ""
    duration_ms: float = 0.0
    wait_ms: float = 0.0
    files: tuple[OutputFile, ...] = ()
    """What the script left in ``out/``, for a run that ended ``ok`` (else nothing)."""
    tier: str = ""
    """The warm parent's tier the run's process was forked from (``stdlib`` or ``full``)."""
