"""The machine-readable contract: the JSON Schemas in docs/schema/ are the wire Structs', real
messages of a real replica follow them, and docs/asyncapi.yaml is a valid AsyncAPI 3.0 document
(checked with the official parser, @asyncapi/parser) that describes every channel."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml
from pyexec_client import Client, Refused, schema
from pyexec_client import messages as wire
from pyexec_client.signing import MSG_ID, sign

from tests.conftest import KEY_ID, ROOT, SECRET, Caller, NatsServer, ReplicaProcess

SCHEMAS = ROOT / "docs" / "schema"
ASYNCAPI = ROOT / "docs" / "asyncapi.yaml"
PARSER = ROOT / "tests" / "asyncapi"


def validator(stem: str) -> jsonschema.Draft202012Validator:
    document = json.loads((SCHEMAS / f"{stem}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(document)
    return jsonschema.Draft202012Validator(document)


def problems(stem: str, body: Any) -> list[str]:
    return [error.message for error in validator(stem).iter_errors(body)]


def test_schemas_are_generated_from_the_structs() -> None:
    """docs/schema/ holds exactly what the generator writes now: a change to a wire Struct
    without regenerating (python -m pyexec_client.schema docs/schema) fails here."""
    on_disk = {path.name for path in SCHEMAS.glob("*.schema.json")}
    assert on_disk == {f"{stem}.schema.json" for stem in schema.MESSAGES}
    for stem in schema.MESSAGES:
        written = (SCHEMAS / f"{stem}.schema.json").read_text(encoding="utf-8")
        assert written == schema.render(stem), f"{stem}.schema.json drifted from its Struct"


def test_only_the_reply_schema_is_named_reply() -> None:
    """Generators look up the reply by name: exactly one schema file's name says 'reply'."""
    assert [p.name for p in SCHEMAS.glob("*reply*.schema.json")] == ["reply.schema.json"]


def test_the_error_codes_are_the_documented_ones() -> None:
    """The codes each status carries (one list, used by the schemas' descriptions and the
    metrics' initial series) are the table of docs/protocol.md, "Statuses"."""
    table = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = table.split("### Statuses", 1)[1].split("###", 1)[0]
    documented = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            codes = tuple(c.strip("` ") for c in cells[2].split(",") if c.strip().startswith("`"))
            if codes:
                documented[cells[0].strip("`")] = codes
    assert documented == wire.ERROR_CODES


def test_a_struct_change_is_drift(tmp_path: Path) -> None:
    """The drift check sees a changed field: a Reply with one more field renders differently."""

    class Reply(wire.Reply, frozen=True, kw_only=True):
        extra: int = 0

    before = schema.render("reply")
    original = schema.MESSAGES["reply"]
    schema.MESSAGES["reply"] = (original[0], Reply, original[2])
    try:
        assert schema.render("reply") != before
    finally:
        schema.MESSAGES["reply"] = original


def test_request_schema_accepts_what_the_executor_accepts() -> None:
    """Bodies the client sends validate; bodies the executor refuses (unknown field, both or
    neither of code and name, a bad timeout) do not."""
    good = [
        msgspec.json.decode(wire.encode(wire.CodeRequest(code="x", ctx={"a": 1}), wire.JSON)),
        msgspec.json.decode(
            wire.encode(
                wire.NamedRequest(
                    name="text.normalize",
                    timeout=2.5,
                    mode="async",
                    request_id="r-1",
                    files={"a.txt": wire.FileRef(object=f"{KEY_ID}/a", sha256="0" * 64)},
                ),
                wire.JSON,
            )
        ),
    ]
    for body in good:
        assert problems("request", body) == []
    bad = [
        {"code": "x", "extra": 1},
        {"code": "x", "name": "y"},
        {},
        {"code": "x", "timeout": 0},
        {"code": "x", "mode": "later"},
        {"name": "y", "files": {"a": {"object": "k/a", "sha256": "short"}}},
    ]
    for body in bad:
        assert problems("request", body), body


def _json(data: bytes) -> Any:
    return msgspec.json.decode(data)


def test_real_replies_follow_the_reply_schema(caller: Caller) -> None:
    """Every status a replica answers with (ok, error, timeout, rejected, accepted), JSON and
    MessagePack alike, validates against reply.schema.json."""
    cases = {
        "ok": (
            {
                "code": "def execute(ctx):\n    print('hi')\n    return {'n': ctx['n']}\n",
                "ctx": {"n": 3},
            },
            "code",
        ),
        "script_error": ({"code": "def execute(ctx):\n    raise ValueError('no')\n"}, "code"),
        "syntax_error": ({"code": "def execute(ctx:\n"}, "code"),
        "policy_violation": ({"code": "import os\ndef execute(ctx):\n    return 1\n"}, "code"),
        "timeout": (
            {"code": "def execute(ctx):\n    while True:\n        pass\n", "timeout": 0.5},
            "code",
        ),
        "invalid_request": ({"code": "x", "surprise": True}, "code"),
        "unknown_script": ({"name": "no.such.script"}, "named"),
        "accepted": (
            {
                "code": "def execute(ctx):\n    return 1\n",
                "mode": "async",
                "request_id": f"contract-{uuid.uuid4()}",
            },
            "code",
        ),
    }
    seen = {}
    for case, (body, kind) in cases.items():
        raw = caller.raw(kind, msgspec.json.encode(body))
        assert problems("reply", _json(raw.data)) == [], case
        seen[case] = raw.reply.error.code if raw.reply.error else raw.reply.status
    assert seen == {
        "ok": "ok",
        "script_error": "script_error",
        "syntax_error": "syntax_error",
        "policy_violation": "policy_violation",
        "timeout": "timeout",
        "invalid_request": "invalid_request",
        "unknown_script": "unknown_script",
        "accepted": "accepted",
    }
    unsigned = caller.raw("code", b'{"code": "x"}', signed=False)
    assert unsigned.reply.error is not None
    assert unsigned.reply.error.code == "unauthorized"
    assert problems("reply", _json(unsigned.data)) == []
    packed = msgspec.msgpack.encode({"code": "def execute(ctx):\n    return [1, 'a']\n"})
    raw = caller.raw(
        "code",
        packed,
        headers={
            **sign(KEY_ID, SECRET.encode(), caller.subject("code"), packed),
            "Content-Type": wire.MSGPACK_CONTENT_TYPE,
        },
    )
    assert raw.reply.status == "ok"
    assert problems("reply", msgspec.msgpack.decode(raw.data)) == []


def test_the_reply_schema_refuses_what_is_not_a_reply() -> None:
    """The schema is not vacuous: a reply without request_id, with an unknown status, or with
    a malformed error object fails it."""
    for body in (
        {"status": "ok"},
        {"request_id": "r", "status": "maybe"},
        {"request_id": "r", "status": "error", "error": {"code": "script_error"}},
        {"request_id": "r", "status": "ok", "files": [{"name": "a"}]},
    ):
        assert problems("reply", body), body


def test_real_job_messages_follow_their_schemas(
    nats_server: NatsServer, replica: ReplicaProcess
) -> None:
    """A job's progress event, its completion, its status and a cancel answer, as a replica
    sends them, each validate against its schema; the status request body against job-ref."""
    prefix = replica.prefix
    source = "def execute(ctx):\n    progress(0.5, 'half')\n    return {'done': True}\n"

    async def scenario() -> dict[str, Any]:
        async with await Client.connect(nats_server.url, KEY_ID, SECRET, prefix=prefix) as client:
            nc = client.nc
            request_id = f"contract-job-{uuid.uuid4()}"
            job_id = client.job_id(request_id)
            events = await nc.subscribe(f"{prefix}.progress.{job_id}")
            await nc.flush()
            request = wire.CodeRequest(code=source, mode="async", request_id=request_id)
            body = wire.encode(request, wire.JSON)
            headers = client.sign(f"{prefix}.jobs.code", body)
            headers[MSG_ID] = job_id
            await nc.jetstream().publish(f"{prefix}.jobs.code", body, headers=headers)
            event = await events.next_msg(timeout=60)
            completion = await client.wait(job_id, timeout=60)
            assert completion.status == "ok", completion.error
            results = await nc.jetstream().subscribe(
                f"{prefix}.results.{job_id}", ordered_consumer=True
            )
            stored = await results.next_msg(timeout=10)
            await results.unsubscribe()
            answers = {}
            for action in ("status", "cancel"):
                subject = f"{prefix}.job.{action}"
                ref = wire.encode(wire.JobRef(job_id=job_id), wire.JSON)
                answer = await nc.request(
                    subject, ref, headers=client.sign(subject, ref), timeout=20
                )
                answers[action] = _json(answer.data)
            return {
                "progress": _json(event.data),
                "completion": _json(stored.data),
                "job-status": answers["status"],
                "job-cancel": answers["cancel"],
                "job-ref": _json(ref),
            }

    bodies = asyncio.run(scenario())
    for stem, body in bodies.items():
        assert problems(stem, body) == [], (stem, body)
    assert bodies["job-status"]["state"] == "done"
    assert bodies["job-status"]["progress"]["message"] == "half"
    assert bodies["job-cancel"]["state"] == "done"
    assert problems("completion", {**bodies["completion"], "status": "accepted"})


def test_file_ref_schema_matches_what_put_file_returns(
    nats_server: NatsServer, replica: ReplicaProcess
) -> None:
    """The reference the client's put_file returns validates against file-ref.schema.json."""

    async def put() -> Any:
        async with await Client.connect(
            nats_server.url, KEY_ID, SECRET, prefix=replica.prefix
        ) as client:
            # The replica creates the bucket; wait until it has.
            for _ in range(100):
                try:
                    return await client.put_file(b"contract", "contract.txt")
                except Refused:  # the bucket is not there yet
                    await asyncio.sleep(0.2)
            raise AssertionError("the file store never appeared")

    ref = asyncio.run(put())
    assert problems("file-ref", msgspec.json.decode(msgspec.json.encode(ref))) == []


def _parser() -> Path | None:
    node = shutil.which("node")
    if node is None or not (PARSER / "node_modules" / "@asyncapi" / "parser").is_dir():
        if os.environ.get("CI"):
            pytest.fail(
                "node and tests/asyncapi/node_modules are needed (npm ci in tests/asyncapi)"
            )
        pytest.skip("the AsyncAPI parser is not installed (cd tests/asyncapi && npm ci)")
    return Path(node)


def _parse(document: Path) -> tuple[int, list[dict[str, Any]]]:
    node = _parser()
    done = subprocess.run(
        [str(node), str(PARSER / "validate.mjs"), str(document)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, lines


def test_asyncapi_document_is_valid() -> None:
    """The official parser reads docs/asyncapi.yaml (and every schema it refers to) with no
    error, as AsyncAPI 3.0."""
    code, lines = _parse(ASYNCAPI)
    errors = [line for line in lines if line.get("severity") == 0]
    assert not errors
    assert code == 0
    summary = next(line for line in lines if "channels" in line)
    assert summary["version"].startswith("3.0")


def test_asyncapi_parser_reports_a_broken_document(tmp_path: Path) -> None:
    """The check can fail: a payload that refers to a missing schema file is an error."""
    shutil.copytree(SCHEMAS, tmp_path / "schema")
    broken = ASYNCAPI.read_text(encoding="utf-8").replace(
        "./schema/reply.schema.json", "./schema/missing.schema.json"
    )
    (tmp_path / "asyncapi.yaml").write_text(broken, encoding="utf-8")
    code, lines = _parse(tmp_path / "asyncapi.yaml")
    assert code != 0
    assert any(line.get("severity") == 0 for line in lines)


def test_asyncapi_describes_every_channel_of_the_contract() -> None:
    """Every subject of the contract is a channel, each message carries the signature headers
    it needs, and payloads refer to the generated schemas."""
    document = yaml.safe_load(ASYNCAPI.read_text(encoding="utf-8"))
    addresses = {c["address"] for c in document["channels"].values() if c.get("address")}
    assert addresses >= {
        "{prefix}.code",
        "{prefix}.named",
        "{prefix}.jobs.code",
        "{prefix}.jobs.named",
        "{prefix}.results.{job_id}",
        "{prefix}.job.status",
        "{prefix}.job.cancel",
        "{prefix}.progress.{job_id}",
        "$SRV.PING",
        "$SRV.INFO",
        "$SRV.STATS",
    }
    components = document["components"]
    required = set(components["schemas"]["requestHeaders"]["required"])
    assert required == {"Pyexec-Key-Id", "Pyexec-Timestamp", "Pyexec-Nonce", "Pyexec-Signature"}
    reply_headers = set(components["schemas"]["replyHeaders"]["properties"])
    assert {"Pyexec-Key-Id", "Pyexec-Timestamp", "Pyexec-Signature"} <= reply_headers
    referenced = set()
    for message in components["messages"].values():
        ref = message["payload"].get("schema", {}).get("$ref", "")
        if ref:
            referenced.add(ref.split("#")[0].removeprefix("./schema/"))
    assert referenced == {f"{stem}.schema.json" for stem in schema.MESSAGES} - {
        "file-ref.schema.json"
    }


@pytest.mark.parametrize("stem", sorted(schema.MESSAGES))
def test_every_schema_is_a_valid_json_schema(stem: str) -> None:
    validator(stem)
