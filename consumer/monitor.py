"""The operators' HTTP port: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for probes.

A small HTTP/1.1 server on the replica's own event loop: if the loop stops turning, the probes
stop answering, which is what a liveness probe should see. Each connection gets one answer and
is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from consumer.metrics import Metrics

log = structlog.get_logger("pyexec.monitor")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_READ_TIMEOUT = 5.0
_MAX_HEAD = 8192
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip


class Monitor:
    """Serves the metrics and the probes on ``host:port`` until stopped."""

    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], str | None],
        *,
        host: str,
        port: int,
        broken: Callable[[], str | None] = lambda: None,
    ) -> None:
        # ``ready`` returns None when the replica is ready, else why it is not; ``broken``
        # None unless the replica cannot recover on its own (then /healthz fails too, so that
        # the orchestrator replaces it).
        self.metrics = metrics
        self.ready = ready
        self.broken = broken
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; return the port (useful when 0 asked the system for one)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        port: int = self._server.sockets[0].getsockname()[1]
        log.info("monitoring listening", host=self.host, port=port)
        return port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.close()
            return
        try:
            status, content_type, body = self._answer(head[:_MAX_HEAD])
            method = head.split(b" ", 1)[0]
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            if method != b"HEAD":
                writer.write(body)
            with contextlib.suppress(OSError):
                await writer.drain()
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[int, str, bytes]:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in ("/metrics", "/healthz", "/readyz"):
            return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if target == "/metrics":
            return 200, METRICS_CONTENT_TYPE, self.metrics.exposition()
        if target == "/healthz":
            broken = self.broken()
            if broken is not None:
                return 503, "text/plain", f"broken: {broken}\n".encode()
            return 200, "text/plain", b"ok\n"
        reason = self.ready()
        if reason is None:
            return 200, "text/plain", b"ready\n"
        return 503, "text/plain", f"not ready: {reason}\n".encode()
