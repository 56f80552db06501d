"""The ``progress(fraction=None, message="")`` builtin: a running job tells how far it is.

In a child, the builtin checks its arguments and sends a :class:`~sandbox.protocol.Progress`
frame to the pool over the run's socket, at most one every ``INTERVAL`` seconds: a call that
comes sooner replaces the one waiting, which a timer (SIGALRM) sends once the interval has
passed, so the last report always goes out, and goes out soon. At the end of the run the one
waiting is sent before the result. In a run that is not a job (``RunRequest.progress`` false)
the builtin checks its arguments and does nothing else.

The pool trusts none of this: it checks every frame again and the service applies the
contract's rate limit itself (``consumer.progress``); this side only keeps a busy script from
writing a frame per call.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from types import FrameType
from typing import Any

from sandbox.netstub import Channel
from sandbox.protocol import Progress, frame

INTERVAL = 0.2  # seconds: at most 5 reports a second
MESSAGE_LIMIT = 200
_RETRY = 0.01  # seconds before a timer that found the socket busy tries again


class Reporter:
    """The builtin (``__call__``) and what it has not sent yet."""

    def __init__(self, channel: Channel | None) -> None:
        self._channel = channel
        self._on = False
        self._last = -math.inf
        self._waiting: Progress | None = None
        self._armed = False

    def start(self, enabled: bool) -> None:
        """The run begins; ``enabled`` for a job (a sync run's reports go nowhere)."""
        self._on = enabled and self._channel is not None
        if self._on:
            signal.signal(signal.SIGALRM, self._on_alarm)

    def __call__(self, fraction: Any = None, message: Any = "") -> None:
        report = Progress(fraction=_fraction(fraction), message=_message(message))
        if not self._on:
            return
        self._waiting = report
        wait = self._last + INTERVAL - time.monotonic()
        if wait <= 0:
            self._send()
        elif not self._armed:
            self._arm(wait)

    def finish(self) -> None:
        """The run ended: send what waits (the socket is free now) and stop the timer."""
        if not self._on:
            return
        self._on = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._armed = False
        if self._waiting is not None and self._channel is not None:
            report, self._waiting = self._waiting, None
            with contextlib.suppress(OSError):  # the pool is gone; the result cannot go either
                self._channel.tell(frame(report))

    def _on_alarm(self, _signum: int, _frame: FrameType | None) -> None:
        self._armed = False
        if self._on:
            self._send()

    def _send(self) -> None:
        report = self._waiting
        if report is None or self._channel is None:
            return
        try:
            sent = self._channel.try_tell(frame(report))
        except OSError:
            return  # the pool is gone; the run's end says so
        if not sent:
            # A broker request holds the socket (perhaps this very thread, interrupted).
            self._arm(_RETRY)
            return
        self._waiting = None
        self._last = time.monotonic()

    def _arm(self, seconds: float) -> None:
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))


def _fraction(value: Any) -> float | None:
    """``value`` as an exact float in 0..1, or None; a subclass is read, never asked."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = type(value).__name__
        raise TypeError(f"progress fraction must be a number from 0 to 1 or None, not {kind}")
    number = float.__float__(value) if isinstance(value, float) else float(int.__index__(value))
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"progress fraction must be from 0 to 1, not {number!r}")
    return number


def _message(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"progress message must be a string, not {type(value).__name__}")
    return str.__str__(value)[:MESSAGE_LIMIT]
