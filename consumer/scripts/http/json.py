"""GET or POST JSON over HTTP(S) with requests, with a size cap enforced while reading.

Returns {"status": int, "headers": {name: str}, "json": Any}; "headers" holds only
content-type, content-length, etag, last-modified and retry-after, when the server sent them.
"""

import json
import time
from typing import Annotated, Any, Literal

import requests
from msgspec import Meta


class Input:
    url: Annotated[str, Meta(pattern=r"^https?://")]  # http:// or https:// only
    method: Literal["GET", "POST"] = "GET"
    params: dict[str, str | int | float | bool] = {}  # added to the query string
    json: Any = None  # body sent as JSON (POST only)
    headers: dict[str, str] = {}  # sent as they are; values never appear in errors
    timeout: Annotated[float, Meta(gt=0, le=30)] = 10  # seconds for the whole exchange
    max_bytes: Annotated[int, Meta(ge=1, le=10_000_000)] = 1_000_000  # cap on the body
    raise_for_status: bool = True  # non-2xx is an error; false: a result with that status


SAFE_HEADERS = ("content-type", "content-length", "etag", "last-modified", "retry-after")
CHUNK = 65536
EXCERPT = 200


class HTTPJSONError(Exception):
    """The call failed; the message never holds a header value that was sent."""


def redact(text: object, secrets: list[str]) -> str:
    """``text`` with every sent header value (and any bearer credential) taken out."""
    text = str(text)
    for secret in secrets:
        text = text.replace(secret, "***")
    words = text.split(" ")
    for index in range(1, len(words)):
        if words[index - 1].lower().endswith("bearer"):
            words[index] = "***"
    return " ".join(words)


def shown(url: str) -> str:
    """``url`` as errors show it: a user name and password in it are taken out."""
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rpartition("@")[2]
    return f"{scheme}://{host}{slash}{path}"


def read_capped(
    response: requests.Response, max_bytes: int, deadline: float
) -> tuple[bytes | None, str | None]:
    """The body, read in chunks; fails as soon as it passes ``max_bytes`` or the deadline."""
    announced = response.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > max_bytes:
        return None, f"the response is {int(announced)} bytes, more than max_bytes ({max_bytes})"
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(CHUNK):
        size += len(chunk)
        if size > max_bytes:
            return None, f"the response is larger than max_bytes ({max_bytes}); reading stopped"
        if time.monotonic() > deadline:
            return None, "the response did not arrive within the timeout"
        chunks.append(chunk)
    return b"".join(chunks), None


def decode(body: bytes, response: requests.Response, secrets: list[str]) -> tuple[Any, str | None]:
    """The body as JSON, and an error message if it is not JSON."""
    try:
        return json.loads(body), None
    except ValueError:
        kind = response.headers.get("content-type", "no content-type")
        text = body[:EXCERPT].decode("utf-8", "replace")
        return None, f"the response is not JSON ({kind}): {redact(text, secrets)!r}"


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    if ctx["json"] is not None and ctx["method"] != "POST":
        raise ValueError("ctx.json: a JSON body is only sent with method POST")
    secrets = [value for value in ctx["headers"].values() if len(value) >= 4]
    where = f"{ctx['method']} {shown(ctx['url'])}"
    deadline = time.monotonic() + ctx["timeout"]
    failure = None
    response = None
    try:
        response = requests.request(
            ctx["method"],
            ctx["url"],
            params=ctx["params"],
            json=ctx["json"],
            headers=ctx["headers"],
            timeout=ctx["timeout"],
            stream=True,
        )
        body, failure = read_capped(response, ctx["max_bytes"], deadline)
    except requests.Timeout:
        failure = f"no answer within {ctx['timeout']} s"
    except requests.RequestException as exc:
        failure = f"the request failed: {redact(exc, secrets)}"
    finally:
        if response is not None:
            response.close()
    if failure is None:
        # Read without a failure: there is a response and its body.
        assert response is not None
        assert body is not None
        status = response.status_code
        headers = {
            name: response.headers[name] for name in SAFE_HEADERS if name in response.headers
        }
        data, failure = decode(body, response, secrets)
        if ctx["raise_for_status"] and not 200 <= status < 300:
            excerpt = redact(body[:EXCERPT].decode("utf-8", "replace"), secrets)
            failure = f"HTTP {status} {response.reason}: {excerpt!r}"
        elif failure is not None and not 200 <= status < 300:
            failure = None
    if failure is not None:
        raise HTTPJSONError(f"{where}: {failure}")
    return {"status": status, "headers": headers, "json": data}
