"""Log pipeline: library logs as JSON with the request's context; console on a terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from textwrap import dedent

from tests.conftest import ROOT


def test_library_logs_are_json_with_the_bound_request_context() -> None:
    """A stdlib logger (as nats-py uses) comes out as a JSON line carrying the request id."""
    program = dedent(
        """
        import logging, structlog
        from consumer.logs import configure
        configure("json")
        structlog.contextvars.bind_contextvars(request_id="r-1", trace_id="t" * 32)
        logging.getLogger("nats.aio.client").warning("lost %s", "connection")
        structlog.get_logger("pyexec.test").info("ours", n=1)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True
    )
    library, ours = (json.loads(line) for line in done.stderr.splitlines())
    assert library["event"] == "lost connection"
    assert library["logger"] == "nats.aio.client"
    assert library["level"] == "warning"
    assert library["request_id"] == "r-1"
    assert ours["event"] == "ours"
    assert ours["n"] == 1
    assert ours["trace_id"] == "t" * 32
    assert "timestamp" in ours


def test_log_format_defaults_to_console_on_a_terminal() -> None:
    """With stderr on a terminal the default format is console; otherwise JSON."""
    program = (
        "from consumer.config import load; "
        "print(load({'EXECUTOR_API_KEYS': 'k:" + "s" * 32 + "'}).log_format)"
    )
    main, secondary = pty.openpty()
    try:
        on_tty = subprocess.run(
            [sys.executable, "-c", program],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=secondary,
            text=True,
            check=True,
        )
    finally:
        os.close(secondary)
        os.close(main)
    piped = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert on_tty.stdout.strip() == "console"
    assert piped.stdout.strip() == "json"
