"""A real HTTP server on loopback that named scripts call in tests: an OpenAI-compatible chat
endpoint and a few JSON endpoints. It records what it received so tests can check headers.

Besides ``/v1/chat/completions`` (needs ``Authorization: Bearer test-token``): chat endpoints
under ``/status/<code>/v1`` that fail with that HTTP status, ``/leaky/v1`` that quotes the key
it refused in its error, ``/empty/v1`` that answers without a choice, ``/slow/v1`` that
answers after 2 s; ``GET /json/stream`` sends about
2 MB without a Content-Length, ``GET /json/reflect`` answers 401 quoting the Authorization
header it got."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


@dataclass
class Received:
    """One request the server got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class LoopbackAPI:
    """The running server: its base URL and what it has received."""

    port: int
    received: list[Received] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _handler(api: LoopbackAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            """Quiet: tests read ``api.received`` instead."""

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, size: int) -> None:
            """A JSON body of about ``size`` bytes with no Content-Length, sent in chunks."""
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                self.wfile.write(b'{"blob": "')
                for _ in range(size // 65536):
                    self.wfile.write(b"x" * 65536)
                self.wfile.write(b'"}')
            except OSError:
                return  # the client stopped reading

        def _record(self, body: bytes) -> None:
            api.received.append(Received(self.command, self.path, dict(self.headers.items()), body))

        def do_GET(self) -> None:
            self._record(b"")
            url = urlparse(self.path)
            if url.path == "/json/item":
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                self._send(200, {"id": int(query.get("id", "0")), "name": "widget", "tags": ["a"]})
            elif url.path == "/json/big":
                self._send(200, {"blob": "x" * 2_000_000})
            elif url.path == "/json/not-json":
                self._send(200, b"<html>hello</html>", "text/html")
            elif url.path == "/json/fail":
                self._send(500, {"error": "boom"})
            elif url.path == "/json/stream":
                self._stream(2_000_000)
            elif url.path == "/json/reflect":
                # Like a careless API: the credential it refused is in its error body.
                got = self.headers.get("Authorization", "")
                self._send(401, {"error": f"bad credentials: {got}"})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            body = self._body()
            self._record(body)
            url = urlparse(self.path)
            if url.path == "/json/echo":
                self._send(200, {"received": json.loads(body or b"null")})
            elif url.path == "/v1/chat/completions":
                self._chat(json.loads(body))
            elif url.path.startswith("/status/") and url.path.endswith("/v1/chat/completions"):
                status = int(url.path.split("/")[2])
                self._send(status, {"error": {"message": f"failed with {status}", "type": "x"}})
            elif url.path == "/leaky/v1/chat/completions":
                # Like some APIs: the refused key is quoted back in the error message.
                got = self.headers.get("Authorization", "")
                self._send(401, {"error": {"message": f"Incorrect API key: {got}", "type": "x"}})
            elif url.path == "/empty/v1/chat/completions":
                self._send(200, {"id": "chatcmpl-2", "object": "chat.completion", "choices": []})
            elif url.path == "/slow/v1/chat/completions":
                time.sleep(2)
                try:
                    self._chat(json.loads(body))
                except OSError:
                    return  # the client gave up waiting
            else:
                self._send(404, {"error": "not found"})

        def _chat(self, request: dict[str, Any]) -> None:
            if self.headers.get("Authorization") != "Bearer test-token":
                self._send(401, {"error": {"message": "bad token", "type": "invalid_request"}})
                return
            last = request["messages"][-1]["content"]
            self._send(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1_700_000_000,
                    "model": request["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": f"echo: {last}"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
                },
            )

    return Handler


@contextmanager
def serve() -> Iterator[LoopbackAPI]:
    """Run the server on a free loopback port for the duration of the block."""
    api = LoopbackAPI(port=0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    api.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
