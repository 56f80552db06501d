"""ai.chat and http.json through a real replica against the real loopback API (their examples
in docs/scripts.md run in tests/test_scripts_doc.py). Nothing here sends traffic beyond
127.0.0.1: the private and link-local destinations are refused by the run's network guard
before any connection is attempted."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from consumer import protocol
from consumer.catalog import Catalog
from consumer.protocol import Reply
from tests.conftest import ROOT, Caller, NatsServer, ReplicaProcess, free_port, start_replica
from tests.loopback_api import LoopbackAPI, Received, serve

TOKEN = "test-token"  # noqa: S105 - the one token the loopback chat endpoint accepts
HEADER_SECRET = "Bearer hdr-secret-4417"  # noqa: S105 - a test credential


class Listener:
    """A TCP listener on a loopback port the replica is not allowed to reach."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port: int = self.sock.getsockname()[1]

    def offered(self, wait: float = 0.3) -> bool:
        """Whether a connection is waiting (or arrives within ``wait`` s)."""
        readable, _, _ = select.select([self.sock], [], [], wait)
        return bool(readable)


@pytest.fixture(scope="module")
def api() -> Iterator[LoopbackAPI]:
    with serve() as running:
        yield running


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    forbidden = Listener()
    yield forbidden
    forbidden.sock.close()


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A loopback port the replica may reach but where nothing listens."""
    return free_port()


@pytest.fixture(scope="module")
def net_replica(
    nats_server: NatsServer, api: LoopbackAPI, closed_port: int
) -> Iterator[ReplicaProcess]:
    """A replica allowed to reach the loopback API's port and closed_port, nothing else there."""
    allow = f"127.0.0.1:{api.port},127.0.0.1:{closed_port}"
    replica = start_replica(nats_server.url, EXECUTOR_NET_ALLOW=allow)
    yield replica
    replica.stop()


@pytest.fixture
def call(nats_server: NatsServer, net_replica: ReplicaProcess) -> Any:
    caller = Caller(nats_server.url, net_replica.prefix)

    def named(name: str, ctx: dict[str, Any], timeout: float | None = None) -> Reply:
        return caller.named(name, ctx, timeout=timeout)

    return named


def chat(api: LoopbackAPI, **overrides: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "hello there"}],
        "base_url": f"{api.base_url}/v1",
        "api_key": TOKEN,
    }
    ctx.update(overrides)
    return ctx


def wire(reply: Reply) -> str:
    """The reply as it travels (result, error, traceback and stdout included)."""
    return protocol.encode(reply, protocol.JSON).decode()


def header(received: Received, name: str) -> str | None:
    return next((v for k, v in received.headers.items() if k.lower() == name.lower()), None)


def new_requests(api: LoopbackAPI, before: int) -> list[Received]:
    return api.received[before:]


def error_of(reply: Reply, code: str) -> Any:
    assert reply.error is not None, reply
    assert reply.error.code == code, reply.error
    return reply.error


def logged(replica: ReplicaProcess, reply: Reply) -> None:
    """Wait until the replica has logged the request behind ``reply``."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(r.get("request_id") == reply.request_id for r in replica.records()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"no log line for {reply.request_id}")


def test_both_scripts_are_listed_with_their_one_line_summary() -> None:
    """`pyexec scripts` shows ai.chat and http.json with the first line of their docstring."""
    listed = {info.name: info.summary for info in Catalog(ROOT / "consumer" / "scripts").scripts()}
    assert listed["ai.chat"] == (
        "One chat completion from an OpenAI-compatible API, with a token given for this call only."
    )
    assert listed["http.json"] == (
        "GET or POST JSON over HTTP(S) with requests, with a size cap enforced while reading."
    )


# -- ai.chat ---------------------------------------------------------------------------------


def test_chat_answers_with_content_role_model_and_usage(call: Any, api: LoopbackAPI) -> None:
    """A completion comes back as content, role, model, finish_reason and usage."""
    reply = call("ai.chat", chat(api))
    assert reply.status == "ok", reply.error
    assert reply.result == {
        "content": "echo: hello there",
        "role": "assistant",
        "model": "gpt-test",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def test_chat_sends_the_token_as_a_bearer_header_and_the_options(
    call: Any, api: LoopbackAPI
) -> None:
    """The server gets `Authorization: Bearer test-token` and the options, once, no retry."""
    before = len(api.received)
    ctx = chat(api, temperature=0.3, max_tokens=12, response_format="json_object")
    reply = call("ai.chat", ctx)
    assert reply.status == "ok", reply.error
    [sent] = new_requests(api, before)
    assert sent.path == "/v1/chat/completions"
    assert header(sent, "Authorization") == f"Bearer {TOKEN}"
    body = json.loads(sent.body)
    assert body["model"] == "gpt-test"
    assert body["messages"] == ctx["messages"]
    assert body["temperature"] == 0.3
    assert body["max_tokens"] == 12
    assert body["response_format"] == {"type": "json_object"}
    assert TOKEN.encode() not in sent.body


def test_chat_token_is_never_in_replies_or_log_lines(
    call: Any, api: LoopbackAPI, net_replica: ReplicaProcess
) -> None:
    """Neither a good, a refused nor a quoted-back token shows in a reply or the replica's log."""
    tokens = [TOKEN, "sk-refused-90817", "sk-quoted-55120"]
    replies = [
        call("ai.chat", chat(api)),
        call("ai.chat", chat(api, api_key=tokens[1])),
        call("ai.chat", chat(api, base_url=f"{api.base_url}/leaky/v1", api_key=tokens[2])),
        call("ai.chat", chat(api, messages=[{"role": "robot", "content": "x"}])),
        call("ai.chat", chat(api, base_url="http://10.0.0.1/v1")),
    ]
    assert [r.status for r in replies] == ["ok", "error", "error", "rejected", "error"]
    for reply in replies:
        logged(net_replica, reply)
        text = wire(reply)
        assert not any(token in text for token in tokens), text
    log = "".join(net_replica.lines)
    assert not any(token in log for token in tokens)


def test_chat_wrong_token_is_an_error_with_status_401(call: Any, api: LoopbackAPI) -> None:
    """A refused token is script_error ChatError naming HTTP 401, without the token."""
    reply = call("ai.chat", chat(api, api_key="wrong-token-31337"))
    error = error_of(reply, "script_error")
    assert error.type == "ChatError"
    assert error.message == "the AI API answered HTTP 401: bad token"
    assert "wrong-token-31337" not in wire(reply)


def test_chat_token_quoted_back_by_the_api_is_redacted(call: Any, api: LoopbackAPI) -> None:
    """An API error quoting the refused key comes back with the key replaced by ***."""
    reply = call("ai.chat", chat(api, base_url=f"{api.base_url}/leaky/v1", api_key="sk-live-77"))
    error = error_of(reply, "script_error")
    assert error.message == "the AI API answered HTTP 401: Incorrect API key: Bearer ***"
    assert "sk-live-77" not in wire(reply)


@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_chat_api_error_names_the_http_status(call: Any, api: LoopbackAPI, status: int) -> None:
    """An error answer is one request (no retry) and script_error with its status and message."""
    before = len(api.received)
    reply = call("ai.chat", chat(api, base_url=f"{api.base_url}/status/{status}/v1"))
    error = error_of(reply, "script_error")
    assert error.message == f"the AI API answered HTTP {status}: failed with {status}"
    assert len(new_requests(api, before)) == 1


def test_chat_timeout_is_a_clear_error(call: Any, api: LoopbackAPI) -> None:
    """An API slower than `timeout` gives 'did not answer within', well before the run's limit."""
    started = time.monotonic()
    reply = call("ai.chat", chat(api, base_url=f"{api.base_url}/slow/v1", timeout=0.5))
    assert time.monotonic() - started < 1.8
    error = error_of(reply, "script_error")
    assert error.message == "the AI API did not answer within 0.5 s"


def test_chat_unreachable_api_is_a_clear_error(
    call: Any, api: LoopbackAPI, closed_port: int
) -> None:
    """An allowed address where nothing listens is script_error 'could not reach'."""
    base_url = f"http://127.0.0.1:{closed_port}/v1"
    reply = call("ai.chat", chat(api, base_url=base_url))
    error = error_of(reply, "script_error")
    assert error.message == f"could not reach the AI API at {base_url}: Connection error."


def test_chat_answer_without_choices_is_a_clear_error(call: Any, api: LoopbackAPI) -> None:
    """A 200 answer with no choice is script_error 'answered without any choice'."""
    reply = call("ai.chat", chat(api, base_url=f"{api.base_url}/empty/v1"))
    error = error_of(reply, "script_error")
    assert error.message == "the AI API answered without any choice"


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        ({"model": None}, "missing required field `model`"),
        ({"api_key": None}, "missing required field `api_key`"),
        ({"model": ""}, "`ctx.model`"),
        ({"messages": []}, "`ctx.messages`"),
        ({"messages": [{"role": "user", "content": 5}]}, "`ctx.messages[0].content`"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "`ctx.messages[0].role`"),
        ({"messages": [{"role": "user"}]}, "missing required field `content`"),
        ({"messages": [{"role": "user", "content": "a", "name": "x"}]}, "unknown field `name`"),
        ({"temperature": 3}, "`ctx.temperature`"),
        ({"timeout": 600}, "`ctx.timeout`"),
        ({"response_format": "xml"}, "`ctx.response_format`"),
        ({"base_url": "ftp://example.org"}, "`ctx.base_url`"),
        ({"modle": "x"}, "unknown field `modle`"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_chat_bad_input_is_invalid_request(
    call: Any, api: LoopbackAPI, change: dict[str, Any], mentions: str
) -> None:
    """Input the declaration refuses is rejected / invalid_request naming the field; no request."""
    ctx = chat(api)
    for key, value in change.items():
        if value is None:
            del ctx[key]
        else:
            ctx[key] = value
    before = len(api.received)
    reply = call("ai.chat", ctx)
    assert reply.status == "rejected"
    error = error_of(reply, "invalid_request")
    assert mentions in error.message, error.message
    assert new_requests(api, before) == []


def test_chat_to_a_loopback_port_not_allowed_is_refused(
    call: Any, api: LoopbackAPI, listener: Listener
) -> None:
    """A loopback port outside EXECUTOR_NET_ALLOW is policy_violation; no connection arrives."""
    reply = call("ai.chat", chat(api, base_url=f"http://127.0.0.1:{listener.port}/v1"))
    error = error_of(reply, "policy_violation")
    assert error.message == (
        f"refused by the sandbox policy: network access to 127.0.0.1:{listener.port} "
        f"(port {listener.port} is not allowed)"
    )
    assert not listener.offered()
    assert TOKEN not in wire(reply)


# -- http.json -------------------------------------------------------------------------------


def test_get_with_params(call: Any, api: LoopbackAPI) -> None:
    """GET sends params in the query string; the result has status, safe headers and JSON."""
    before = len(api.received)
    reply = call("http.json", {"url": f"{api.base_url}/json/item", "params": {"id": 42, "x": "y"}})
    assert reply.status == "ok", reply.error
    assert reply.result == {
        "status": 200,
        "headers": {"content-type": "application/json", "content-length": "43"},
        "json": {"id": 42, "name": "widget", "tags": ["a"]},
    }
    [sent] = new_requests(api, before)
    assert (sent.method, sent.path) == ("GET", "/json/item?id=42&x=y")


def test_post_json_is_echoed(call: Any, api: LoopbackAPI) -> None:
    """POST sends the body as JSON with its content type and headers, and decodes the answer."""
    before = len(api.received)
    body = {"order": 17, "lines": [{"sku": "A-1", "qty": 2}], "note": "ü"}
    reply = call(
        "http.json",
        {
            "url": f"{api.base_url}/json/echo",
            "method": "POST",
            "json": body,
            "headers": {"X-Trace": "abc"},
        },
    )
    assert reply.status == "ok", reply.error
    assert reply.result["json"] == {"received": body}
    [sent] = new_requests(api, before)
    assert json.loads(sent.body) == body
    assert header(sent, "Content-Type") == "application/json"
    assert header(sent, "X-Trace") == "abc"


def test_size_cap_refuses_an_announced_large_body(call: Any, api: LoopbackAPI) -> None:
    """A Content-Length over max_bytes fails at once with a message naming the cap."""
    reply = call("http.json", {"url": f"{api.base_url}/json/big"})
    error = error_of(reply, "script_error")
    assert error.type == "HTTPJSONError"
    assert error.message == (
        f"GET {api.base_url}/json/big: the response is 2000012 bytes, more than max_bytes (1000000)"
    )


def test_size_cap_stops_reading_an_unannounced_body(call: Any, api: LoopbackAPI) -> None:
    """A body without Content-Length is read until it passes max_bytes, then the run fails."""
    reply = call("http.json", {"url": f"{api.base_url}/json/stream", "max_bytes": 300_000})
    error = error_of(reply, "script_error")
    assert error.message == (
        f"GET {api.base_url}/json/stream: the response is larger than max_bytes (300000); "
        "reading stopped"
    )


def test_non_json_body_is_an_error(call: Any, api: LoopbackAPI) -> None:
    """A 2xx body that is not JSON is script_error naming the content type and its start."""
    reply = call("http.json", {"url": f"{api.base_url}/json/not-json"})
    error = error_of(reply, "script_error")
    assert error.message == (
        f"GET {api.base_url}/json/not-json: the response is not JSON (text/html): "
        "'<html>hello</html>'"
    )


def test_error_status_is_an_error_by_default(call: Any, api: LoopbackAPI) -> None:
    """A 500 is script_error with the status, reason and the start of the body."""
    reply = call("http.json", {"url": f"{api.base_url}/json/fail"})
    error = error_of(reply, "script_error")
    assert error.message == (
        f'GET {api.base_url}/json/fail: HTTP 500 Internal Server Error: \'{{"error": "boom"}}\''
    )


def test_error_status_as_a_result_when_asked(call: Any, api: LoopbackAPI) -> None:
    """With raise_for_status false, a 500 (JSON) and a 404 come back as results."""
    fail = call("http.json", {"url": f"{api.base_url}/json/fail", "raise_for_status": False})
    assert fail.status == "ok", fail.error
    assert (fail.result["status"], fail.result["json"]) == (500, {"error": "boom"})
    missing = call("http.json", {"url": f"{api.base_url}/nowhere", "raise_for_status": False})
    assert (missing.result["status"], missing.result["json"]) == (404, {"error": "not found"})


def test_authorization_header_is_never_echoed(
    call: Any, api: LoopbackAPI, net_replica: ReplicaProcess
) -> None:
    """A server quoting the Authorization header back gives an error with *** in its place."""
    headers = {"Authorization": HEADER_SECRET}
    before = len(api.received)
    reflected = call("http.json", {"url": f"{api.base_url}/json/reflect", "headers": headers})
    error = error_of(reflected, "script_error")
    assert error.message == (
        f"GET {api.base_url}/json/reflect: HTTP 401 Unauthorized: "
        '\'{"error": "bad credentials: ***"}\''
    )
    [sent] = new_requests(api, before)
    assert header(sent, "Authorization") == HEADER_SECRET
    refused = call("http.json", {"url": "http://10.0.0.1/", "headers": headers})
    error_of(refused, "policy_violation")
    for reply in (reflected, refused):
        logged(net_replica, reply)
        assert "hdr-secret-4417" not in wire(reply)
    assert "hdr-secret-4417" not in "".join(net_replica.lines)


def test_password_in_the_url_is_not_shown(call: Any, api: LoopbackAPI) -> None:
    """user:password in the URL is replaced by *** in error messages."""
    url = f"http://bob:pw-8812@127.0.0.1:{api.port}/json/fail"
    reply = call("http.json", {"url": url})
    error = error_of(reply, "script_error")
    assert error.message.startswith(f"GET http://***@127.0.0.1:{api.port}/json/fail: HTTP 500")
    assert "pw-8812" not in wire(reply)


def test_http_unreachable_server_is_a_clear_error(call: Any, closed_port: int) -> None:
    """An allowed address where nothing listens is script_error 'the request failed'."""
    url = f"http://127.0.0.1:{closed_port}/json/item"
    reply = call("http.json", {"url": url, "headers": {"Authorization": HEADER_SECRET}})
    error = error_of(reply, "script_error")
    assert error.message.startswith(f"GET {url}: the request failed: "), error.message
    assert "Connection refused" in error.message
    assert "hdr-secret-4417" not in wire(reply)


def test_json_body_with_get_is_refused(call: Any, api: LoopbackAPI) -> None:
    """A JSON body with GET is a script_error before anything is sent."""
    before = len(api.received)
    reply = call("http.json", {"url": f"{api.base_url}/json/echo", "json": {"a": 1}})
    error = error_of(reply, "script_error")
    assert error.message == "ctx.json: a JSON body is only sent with method POST"
    assert new_requests(api, before) == []


@pytest.mark.parametrize(
    ("ctx", "mentions"),
    [
        ({"url": "file:///etc/passwd"}, "`ctx.url`"),
        ({"url": "http://x/", "method": "DELETE"}, "`ctx.method`"),
        ({"url": "http://x/", "timeout": 31}, "`ctx.timeout`"),
        ({"url": "http://x/", "max_bytes": 0}, "`ctx.max_bytes`"),
        ({"url": "http://x/", "headers": {"A": 1}}, "`ctx.headers[...]`"),
        ({}, "missing required field `url`"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_http_bad_input_is_invalid_request(call: Any, ctx: dict[str, Any], mentions: str) -> None:
    """Input the declaration refuses is rejected / invalid_request naming the field."""
    reply = call("http.json", ctx)
    assert reply.status == "rejected"
    error = error_of(reply, "invalid_request")
    assert mentions in error.message, error.message


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://10.0.0.1/", "network access to 10.0.0.1:80 (private address)"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "network access to 169.254.169.254:80 (link-local address)",
        ),
    ],
    ids=["private", "metadata"],
)
def test_destination_refused_before_connecting(call: Any, url: str, refused: str) -> None:
    """Private and link-local addresses are policy_violation naming the rule (no packet sent)."""
    reply = call("http.json", {"url": url})
    error = error_of(reply, "policy_violation")
    assert error.message == f"refused by the sandbox policy: {refused}"


def test_loopback_port_not_allowed_is_refused(call: Any, listener: Listener) -> None:
    """A loopback port outside EXECUTOR_NET_ALLOW is policy_violation; no connection arrives."""
    reply = call("http.json", {"url": f"http://127.0.0.1:{listener.port}/json/item"})
    error = error_of(reply, "policy_violation")
    assert f"127.0.0.1:{listener.port} (port {listener.port} is not allowed)" in error.message
    assert not listener.offered()
