"""Logging set-up: structlog JSON lines (or the console renderer), library logs included; the
level of a request's or a job's canonical line, by its outcome."""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(log_format: Literal["json", "console"], level: int = logging.INFO) -> None:
    """Send every log line, ours and the libraries', to stderr in one format."""
    renderer: structlog.typing.Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# The level of a canonical line ('request', 'job completed') by outcome. 'info': it went as
# asked. 'warning': the caller's request failed for a reason of its own (its script, its input,
# its signature); the service is fine. 'error': the service failed the caller (a run lost, no
# capacity, a defect of ours). An error code not listed here is an 'error', to be looked at.
CALLER_ERRORS = frozenset(
    {
        "script_error",
        "syntax_error",
        "policy_violation",
        "timeout",
        "memory_limit",
        "disk_limit",
        "output_limit",
        "result_not_serializable",
        "invalid_request",
        "unknown_script",
        "conflict",
        "unauthorized",
    }
)
# A cancelled job is what its caller asked for.
_INFO_STATUSES = frozenset({"ok", "accepted", "cancelled"})


def level_of(status: str, error_code: str | None) -> int:
    """The level of the canonical line of a request or job that ended so."""
    if status in _INFO_STATUSES:
        return logging.INFO
    if error_code in CALLER_ERRORS:
        return logging.WARNING
    return logging.ERROR


def canonical(
    logger: Any,  # what structlog.get_logger returns: a stdlib BoundLogger, typed Any there
    event: str,
    **fields: Any,
) -> None:
    """Write the one line that sums up a request or a job (``fields`` hold its ``status`` and
    ``error_code``), at the level its outcome gives."""
    logger.log(level_of(fields["status"], fields.get("error_code")), event, **fields)
