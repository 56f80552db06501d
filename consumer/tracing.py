"""W3C Trace Context: read ``traceparent`` from a request, continue it, set it on the answer.

The executor is one span in the caller's trace: it keeps the trace id and flags, makes a span
id of its own for the request, and sends ``traceparent`` (and ``tracestate`` unchanged) back on
the reply, the stored job and the job's completion. A request without a valid ``traceparent``
starts a new trace, so every log line still has a trace id to search by.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from consumer.protocol import header

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_TRACEPARENT = re.compile(
    r"^(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<parent>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?$"
)
_TRACESTATE_MAX = 512


@dataclass(frozen=True)
class Trace:
    """This executor's span: the caller's trace id, our span id, the caller's span id."""

    trace_id: str
    span_id: str
    parent_id: str | None
    flags: str = "00"
    state: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def headers(self) -> dict[str, str]:
        """The headers that carry this span on to whatever answers the request."""
        out = {TRACEPARENT: self.traceparent}
        if self.state:
            out[TRACESTATE] = self.state
        return out

    def log_fields(self) -> dict[str, str]:
        fields = {"trace_id": self.trace_id, "span_id": self.span_id}
        if self.parent_id:
            fields["parent_span_id"] = self.parent_id
        return fields


def continue_from(headers: Mapping[str, str] | None) -> Trace:
    """A span continuing the request's trace, or the first span of a new one."""
    parent = parse(header(headers, TRACEPARENT))
    span_id = secrets.token_hex(8)
    if parent is None:
        return Trace(trace_id=secrets.token_hex(16), span_id=span_id, parent_id=None)
    trace_id, parent_id, flags = parent
    state = header(headers, TRACESTATE)
    if state is not None and (len(state) > _TRACESTATE_MAX or not state.isprintable()):
        state = None
    return Trace(trace_id=trace_id, span_id=span_id, parent_id=parent_id, flags=flags, state=state)


def parse(value: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent span id, flags) of a valid ``traceparent``, else None.

    Follows the W3C rules: version ``ff`` is invalid, all-zero ids are invalid, and a version
    above 00 may carry more fields after the flags.
    """
    if value is None:
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.group("version", "trace", "parent", "flags")
    if version == "ff" or (version == "00" and match.group("rest")):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id, flags
