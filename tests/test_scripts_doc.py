"""docs/scripts.md stays true: every request shown there gets the reply shown there."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from pyexec_client.client import Client

from consumer import protocol
from tests.conftest import (
    KEY_ID,
    ROOT,
    SECRET,
    Caller,
    NatsServer,
    ReplicaProcess,
    start_replica,
)
from tests.loopback_api import LoopbackAPI, serve

DOC = ROOT / "docs" / "scripts.md"
PAIR = re.compile(r"```json request\n(.*?)\n```\s*```json reply\n(.*?)\n```", re.DOTALL)
ANY = "..."  # in a documented reply: any value


def examples() -> list[tuple[str, str]]:
    return PAIR.findall(DOC.read_text(encoding="utf-8"))


@functools.cache
def orders_workbook() -> str:
    """The workbook the excel examples read, as base64: an Orders sheet and a Notes sheet."""
    book = openpyxl.Workbook()
    orders = book.active
    assert orders is not None
    orders.title = "Orders"
    orders.append(["id", "customer", "amount", "ordered"])
    orders.append([1, "Acme", 120.5, dt.date(2026, 1, 15)])
    orders.append([2, "Globex", 80, dt.date(2026, 2, 1)])
    orders.append([3, "Acme", 42.25, dt.date(2026, 2, 20)])
    notes = book.create_sheet("Notes")
    notes.append(["checked by", "Ann"])
    buffer = io.BytesIO()
    book.save(buffer)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def api() -> Iterator[LoopbackAPI]:
    with serve() as running:
        yield running


@pytest.fixture(scope="module")
def documented(nats_server: NatsServer, api: LoopbackAPI) -> Iterator[ReplicaProcess]:
    """A replica that may reach the loopback API the network examples call, with the orders
    workbook put into its file store as ``<key id>/docs/orders.xlsx``."""
    replica = start_replica(nats_server.url, EXECUTOR_NET_ALLOW=f"127.0.0.1:{api.port}")

    async def put() -> None:
        async with await Client.connect(
            nats_server.url, KEY_ID, SECRET, prefix=replica.prefix
        ) as client:
            await client.put_file(base64.b64decode(orders_workbook()), "docs/orders.xlsx")

    asyncio.run(put())
    yield replica
    replica.stop()


def substitute(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    assert "${" not in text, f"unknown placeholder in {text[:200]}"
    return text


def matches(documented: Any, actual: Any, *, lenient: bool = False) -> bool:
    """Whether a reply value is the documented one; ``...`` matches anything, and with
    ``lenient`` a key left out of the documented object may be empty in the actual one."""
    if documented == ANY:
        return True
    if isinstance(documented, dict) and isinstance(actual, dict):
        left_out = actual.keys() - documented.keys()
        if documented.keys() - actual.keys() or (
            left_out
            and not (lenient and all(actual[key] in (None, "", [], {}) for key in left_out))
        ):
            return False
        return all(matches(value, actual[key]) for key, value in documented.items())
    if isinstance(documented, list) and isinstance(actual, list):
        return len(documented) == len(actual) and all(
            matches(d, a) for d, a in zip(documented, actual, strict=True)
        )
    if isinstance(documented, float) and isinstance(actual, (int, float)):
        return abs(documented - actual) <= 1e-9 * max(1.0, abs(documented))
    return bool(documented == actual and type(documented) is type(actual))


def test_the_doc_has_examples_for_every_shipped_script() -> None:
    """Each shipped script has a section and at least one example request."""
    text = DOC.read_text(encoding="utf-8")
    names = {json.loads(request)["name"] for request, _ in examples()}
    shipped = {
        ".".join(path.relative_to(ROOT / "consumer" / "scripts").with_suffix("").parts)
        for path in (ROOT / "consumer" / "scripts").rglob("*.py")
    }
    assert shipped <= names, sorted(shipped - names)
    for name in shipped:
        assert f"### `{name}`" in text, name


@pytest.mark.parametrize(
    ("request_text", "reply_text"), examples(), ids=lambda text: text[:60]
)  # fmt: skip
def test_documented_example(
    documented: ReplicaProcess,
    nats_server: NatsServer,
    api: LoopbackAPI,
    request_text: str,
    reply_text: str,
) -> None:
    """The documented request gets the documented reply."""
    workbook = orders_workbook()
    values = {
        "XLSX": workbook,
        "XLSX_SHA256": hashlib.sha256(base64.b64decode(workbook)).hexdigest(),
        "KEY_ID": KEY_ID,
        "BASE_URL": api.base_url,
    }
    request = json.loads(substitute(request_text, values))
    expected = json.loads(substitute(reply_text, values))
    files = {alias: protocol.FileRef(**ref) for alias, ref in (request.get("files") or {}).items()}
    reply = Caller(nats_server.url, documented.prefix).named(
        request["name"], request.get("ctx"), timeout=request.get("timeout"), files=files or None
    )
    got = json.loads(protocol.encode(reply, protocol.JSON))
    assert got["status"] == expected["status"], got
    for key, value in expected.items():
        assert matches(value, got[key], lenient=key == "error"), (key, got[key])


def test_the_template_works_as_documented(nats_server: NatsServer, tmp_path: Path) -> None:
    """The template under 'Adding your own' runs when installed as billing/invoice_total.py."""
    text = DOC.read_text(encoding="utf-8")
    template = re.search(r"## Adding your own.*?```python\n(.*?)\n```", text, re.DOTALL)
    assert template is not None
    (tmp_path / "billing").mkdir()
    (tmp_path / "billing" / "invoice_total.py").write_text(template.group(1), encoding="utf-8")
    replica = start_replica(nats_server.url, EXECUTOR_SCRIPTS_DIR=str(tmp_path))
    try:
        caller = Caller(nats_server.url, replica.prefix)
        reply = caller.named(
            "billing.invoice_total", {"lines": [{"qty": 2, "price": 9.5}], "tax_rate": 0.1}
        )
        assert reply.status == "ok", reply.error
        assert reply.result == {"net": 19.0, "tax": 1.9, "total": 20.9}
        bad = caller.named("billing.invoice_total", {"lines": [], "tax_rate": 2})
        assert bad.error is not None
        assert bad.error.code == "invalid_request"
        assert "ctx.tax_rate" in bad.error.message
    finally:
        replica.stop()
