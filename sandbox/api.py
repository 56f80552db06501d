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


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One script to run: its source, its input and its wall-clock budget in seconds."""

    source: str
    ctx: dict[str, Any]
    timeout: float


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
