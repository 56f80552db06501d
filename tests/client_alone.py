"""Run by tests/test_client_package.py with the Python of a virtual environment that holds only
the pyexec-client distribution and its dependencies (nats-py, msgspec): it calls a real replica
through every call of the client, provokes each group of errors, and prints what it saw as JSON.

Usage: python client_alone.py NATS_URL PREFIX KEY_ID SECRET
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import socket
import sys
import uuid
from typing import Any

import nats
from pyexec_client import (
    BadReply,
    Client,
    ClientError,
    ConnectError,
    NoReplica,
    Refused,
    Timeout,
)

SOURCE = """
def execute(ctx):
    progress(0.5, "half")
    with open("in/data.txt") as handle:
        text = handle.read()
    with open("out/upper.txt", "w") as handle:
        handle.write(text.upper())
    return {"n": ctx["n"] * 2, "text": text}
"""


def installed() -> dict[str, Any]:
    """What this environment can import besides the standard library."""
    names = sorted(
        d.metadata["Name"].lower().replace("_", "-") for d in importlib.metadata.distributions()
    )
    absent = {
        name: importlib.util.find_spec(name) is None
        for name in ("consumer", "sandbox", "RestrictedPython", "pandas", "numpy", "structlog")
    }
    return {"distributions": names, "absent": absent}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def group(exc: BaseException) -> str:
    for kind in (ConnectError, Timeout, NoReplica, Refused, BadReply):
        if isinstance(exc, kind):
            return kind.__name__
    return type(exc).__name__


async def calls(url: str, prefix: str, key_id: str, secret: str) -> dict[str, Any]:
    return {
        **await work(url, prefix, key_id, secret),
        "errors": await errors_of(url, prefix, key_id, secret),
    }


async def work(url: str, prefix: str, key_id: str, secret: str) -> dict[str, Any]:
    """Every call of the client against the replica."""
    seen: dict[str, Any] = {}
    async with Client.connect(url, key_id, secret, prefix=prefix) as client:
        reply = await client.execute_code("def execute(ctx):\n    return ctx['a'] + 1\n", {"a": 1})
        seen["execute_code"] = [reply.status, reply.result]
        named = await client.execute_named("text.normalize", {"text": "  Hello   World "})
        seen["execute_named"] = [named.status, named.result]
        for _ in range(100):  # the replica creates the file store when it starts
            try:
                ref = await client.put_file(b"abc", f"alone-{uuid.uuid4().hex}.txt")
                break
            except Refused:
                await asyncio.sleep(0.2)
        request_id = f"alone-{uuid.uuid4()}"
        job_id = client.job_id(request_id)
        async with client.progress(job_id) as events:
            submitted = await client.submit_code(
                SOURCE, {"n": 21}, request_id=request_id, files={"data.txt": ref}
            )
            first = await asyncio.wait_for(anext(aiter(events)), timeout=60)
        completion = await client.wait(job_id, timeout=60)
        seen["submit"] = submitted == job_id
        seen["progress"] = [first.fraction, first.message]
        seen["completion"] = [completion.status, completion.result, completion.job_id == job_id]
        assert completion.files
        output = completion.files[0]
        seen["get_file"] = (await client.get_file(output.object, sha256=output.sha256)).decode()
        status = await client.status(job_id)
        seen["status"] = [status.state, status.completion.status if status.completion else None]
        seen["cancel"] = (await client.cancel(job_id)).state
    return seen


async def served_failure(client: Client) -> ClientError:
    """The error of a call to a responder subscribed on another connection. Under load the
    server may answer "no responders" for a moment after that subscription was flushed, so a
    NoReplica is asked again for a while (as tests.conftest.once_routed does for the tests; this
    script runs where neither the tests nor the service are installed)."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            await client.execute_code("def execute(ctx):\n    return 1\n", timeout=0.1)
        except NoReplica:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)
        except ClientError as exc:
            return exc
        else:
            raise AssertionError("the call succeeded")


async def errors_of(url: str, prefix: str, key_id: str, secret: str) -> dict[str, str]:
    """Which error group each failure raises."""
    errors: dict[str, str] = {}
    try:
        await Client.connect(f"nats://127.0.0.1:{closed_port()}", key_id, secret)
    except ClientError as exc:
        errors["could not connect"] = group(exc)
    async with await Client.connect(url, key_id, secret, prefix=f"{prefix}-nobody") as client:
        try:
            await client.execute_code("def execute(ctx):\n    return 1\n")
        except ClientError as exc:
            errors["no replica"] = group(exc)
    client = await Client.connect(url, key_id, "not-the-secret", prefix=prefix)
    try:
        await client.status("0" * 32)
    except ClientError as exc:
        errors["refused"] = group(exc)
    finally:
        await client.close()
    # A responder that never answers, and one that answers with an unsigned reply.
    nc = await nats.connect(url)
    try:

        async def ignore(msg: Any) -> None:
            del msg

        async def forge(msg: Any) -> None:
            await msg.respond(b'{"request_id": "x", "status": "ok", "result": 42}')

        await nc.subscribe(f"{prefix}-silent.code", cb=ignore)
        await nc.subscribe(f"{prefix}-forged.code", cb=forge)
        await nc.flush()
        for name, suffix in (("timed out", "silent"), ("bad reply", "forged")):
            async with await Client.connect(
                url, key_id, secret, prefix=f"{prefix}-{suffix}"
            ) as client:
                errors[name] = group(await served_failure(client))
    finally:
        await nc.close()
    return errors


def main() -> int:
    url, prefix, key_id, secret = sys.argv[1:5]
    report = {"installed": installed(), "calls": asyncio.run(calls(url, prefix, key_id, secret))}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
