"""The docs stay honest: the worked signature example, the variables and the error codes."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path

import pytest
from pyexec_client import signing
from pyexec_client.signing import job_id_for

from consumer import auth, errors, protocol
from consumer.config import Keyring

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"
CONFIGURATION_DOC = ROOT / "docs" / "configuration.md"
VARIABLE = re.compile(r"\b(?:EXECUTOR_[A-Z0-9_]*[A-Z0-9]|NATS_URL)\b")


def protocol_text() -> str:
    return PROTOCOL_DOC.read_text(encoding="utf-8")


def worked_example() -> dict[str, str]:
    """The ``name: value`` lines of the fenced block that starts with ``key_id:``."""
    found = re.search(r"^```text\n(key_id: .*?)\n```$", protocol_text(), re.DOTALL | re.MULTILINE)
    assert found, "docs/protocol.md has no fenced block starting with 'key_id: '"
    example = {}
    for line in found.group(1).splitlines():
        name, separator, value = line.partition(": ")
        assert separator, f"not a 'name: value' line: {line!r}"
        example[name] = value
    return example


def contract_path() -> Path | None:
    candidates = [ROOT.parent / "shared" / "CONTRACT.md", ROOT / "CONTRACT.md"]
    if os.environ.get("PYEXEC_CONTRACT"):
        candidates.insert(0, Path(os.environ["PYEXEC_CONTRACT"]))
    return next((path for path in candidates if path.is_file()), None)


def test_worked_example_has_every_input_and_output() -> None:
    """The worked example lists its inputs and every derived value."""
    assert set(worked_example()) == {
        "key_id", "secret", "subject", "timestamp", "nonce", "body", "body_length",
        "body_sha256", "canonical", "canonical_length", "signature",
    }  # fmt: skip


def test_worked_example_matches_the_executor_code() -> None:
    """pyexec_client.signing gives the documented digest, canonical string and signature."""
    ex = worked_example()
    body = ex["body"].encode()
    canonical = signing.canonical(ex["subject"], ex["timestamp"], ex["nonce"], body)
    assert len(body) == int(ex["body_length"])
    assert canonical == ex["canonical"].replace("\\n", "\n").encode()
    assert len(canonical) == int(ex["canonical_length"])
    signature = signing.signature(
        ex["secret"].encode(), ex["subject"], ex["timestamp"], ex["nonce"], body
    )
    assert signature == ex["signature"]
    headers = signing.sign(
        ex["key_id"],
        ex["secret"].encode(),
        ex["subject"],
        body,
        timestamp=int(ex["timestamp"]),
        nonce=ex["nonce"],
    )
    assert headers[signing.SIGNATURE_HEADER] == ex["signature"]


def test_worked_example_matches_an_independent_computation() -> None:
    """Plain hashlib and hmac, following the documented recipe, give the same bytes."""
    ex = worked_example()
    body = ex["body"].encode("utf-8")
    digest = hashlib.sha256(body).hexdigest()
    assert digest == ex["body_sha256"]
    canonical = "\n".join(["v1", ex["subject"], ex["timestamp"], ex["nonce"], digest])
    assert canonical == ex["canonical"].replace("\\n", "\n")
    mac = hmac.new(ex["secret"].encode("utf-8"), canonical.encode("utf-8"), hashlib.sha256)
    assert mac.hexdigest() == ex["signature"]


def test_worked_example_is_accepted_by_the_verifier() -> None:
    """At the documented time the executor accepts the example and its body is a valid request."""
    ex = worked_example()
    body = ex["body"].encode()
    verifier = auth.Verifier(
        Keyring({ex["key_id"]: ex["secret"]}), clock=lambda: float(ex["timestamp"])
    )
    headers = {
        auth.KEY_ID_HEADER: ex["key_id"],
        auth.TIMESTAMP_HEADER: ex["timestamp"],
        auth.NONCE_HEADER: ex["nonce"],
        auth.SIGNATURE_HEADER: ex["signature"],
    }
    assert verifier.verify(ex["subject"], headers, body) == ex["key_id"]
    request = protocol.decode_request(
        "code", body, protocol.JSON, max_bytes=1024 * 1024, max_depth=32
    )
    assert isinstance(request, protocol.CodeRequest)


def test_hex_decoded_secret_value_is_the_wrong_one() -> None:
    """The signature quoted for a hex-decoded secret really is what that mistake gives."""
    ex = worked_example()
    found = re.search(r"If you get `([0-9a-f]{64})` instead", protocol_text())
    assert found
    canonical = ex["canonical"].replace("\\n", "\n").encode()
    wrong = hmac.new(bytes.fromhex(ex["secret"]), canonical, hashlib.sha256).hexdigest()
    assert found.group(1) == wrong != ex["signature"]


def test_example_body_is_the_same_in_every_snippet() -> None:
    """Every snippet of protocol.md that carries the example body carries it byte for byte."""
    ex = worked_example()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```$", protocol_text(), re.DOTALL | re.MULTILINE)
    with_body = [
        block
        for block in blocks
        if "doc-example-1" in block and "v1-reply" not in block and "reply_key_id" not in block
    ]
    assert len(with_body) >= 4
    for block in with_body:
        assert ex["body"] in block


def test_every_environment_variable_is_documented() -> None:
    """Each EXECUTOR_* and NATS_URL name in the code's settings appears in configuration.md."""
    names: set[str] = set()
    for source in ("variables.py", "config.py", "cli.py"):
        names |= set(VARIABLE.findall((ROOT / "consumer" / source).read_text(encoding="utf-8")))
    assert "NATS_URL" in names
    assert "EXECUTOR_WORKERS" in names
    documented = set(VARIABLE.findall(CONFIGURATION_DOC.read_text(encoding="utf-8")))
    assert sorted(names - documented) == []


def test_every_contract_error_code_is_documented() -> None:
    """Each error code and status of the contract's reply table appears in protocol.md."""
    path = contract_path()
    if path is None:
        pytest.skip("CONTRACT.md not found (set PYEXEC_CONTRACT to its path)")
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| status |"))
    statuses: set[str] = set()
    codes: set[str] = set()
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        statuses |= set(re.findall(r"`([a-z_]+)`", cells[0]))
        codes |= set(re.findall(r"`([a-z_]+)`", cells[2]))
    assert len(codes) >= 12
    text = protocol_text()
    assert sorted(c for c in codes | statuses if f"`{c}`" not in text) == []


def test_micro_header_numbers_match_the_code() -> None:
    """The error code table gives each rejection the number the executor sends."""
    rows = re.findall(r"^\| `([a-z_]+)` \| `rejected` \| (\d{3}) \|", protocol_text(), re.MULTILINE)
    documented = {code: int(number) for code, number in rows}
    rejections = (
        errors.Unauthorized,
        errors.InvalidRequest,
        errors.UnknownScript,
        errors.Overloaded,
        errors.Conflict,
    )
    assert documented == {cls.code: cls.http for cls in rejections}


OPERATIONS_DOC = ROOT / "docs" / "operations.md"


def test_every_metric_is_documented() -> None:
    """Each metric the service exports has a row in the metrics table of operations.md."""
    from consumer.metrics import Metrics

    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    metrics = Metrics(version="test", longest_timeout=60)
    documented = set(re.findall(r"^\| `(pyexec_[a-z_]+)` \|", text, re.MULTILINE))
    # A histogram is documented once, by its base name.
    exported = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for name in metrics.names()
        if name.startswith("pyexec_")
    }
    assert exported == documented


def test_every_alert_has_a_runbook_section() -> None:
    """Each alert rule links a section of operations.md that exists."""
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    alerts = re.findall(r"^\s*- alert: (\w+)", rules, re.MULTILINE)
    assert alerts
    headings = set(
        re.findall(r"^### (\w+)$", OPERATIONS_DOC.read_text(encoding="utf-8"), re.MULTILINE)
    )
    for alert in alerts:
        assert alert in headings, alert
        assert "{{ $externalLabels.runbook_base }}#" + alert.lower() in rules, alert


def reply_example() -> dict[str, str]:
    """The ``name: value`` lines of the fenced block that starts with ``reply_key_id:``."""
    found = re.search(
        r"^```text\n(reply_key_id: .*?)\n```$", protocol_text(), re.DOTALL | re.MULTILINE
    )
    assert found, "docs/protocol.md has no fenced block starting with 'reply_key_id: '"
    return dict(line.partition(": ")[::2] for line in found.group(1).splitlines())


def test_reply_example_matches_an_independent_computation_and_the_executor() -> None:
    """The documented reply signature and job id follow from the documented inputs, computed
    here from the rule and by the executor's own code; the reply answers the request example."""
    ex, request = reply_example(), worked_example()
    secret = request["secret"].encode()
    body = ex["reply_body"].encode()
    assert ex["reply_key_id"] == request["key_id"]
    assert ex["reply_request_subject"] == request["subject"]
    assert ex["reply_request_nonce"] == request["nonce"]
    digest = hashlib.sha256(body).hexdigest()
    assert digest == ex["reply_body_sha256"]
    parts = ["v1-reply", ex["reply_request_subject"], ex["reply_request_nonce"]]
    canonical = "\n".join([*parts, ex["reply_timestamp"], digest])
    assert canonical == ex["reply_canonical"].replace("\\n", "\n")
    mac = hmac.new(secret, canonical.encode(), hashlib.sha256).hexdigest()
    assert mac == ex["reply_signature"]
    headers = signing.sign_reply(
        ex["reply_key_id"],
        secret,
        ex["reply_request_subject"],
        ex["reply_request_nonce"],
        body,
        timestamp=int(ex["reply_timestamp"]),
    )
    assert headers[signing.SIGNATURE_HEADER] == ex["reply_signature"]
    assert auth.verify_reply(
        secret,
        ex["reply_key_id"],
        headers,
        body,
        request_subject=ex["reply_request_subject"],
        request_nonce=ex["reply_request_nonce"],
    )
    job = hmac.new(secret, b"v1-job\ndoc-example-1", hashlib.sha256).hexdigest()[:32]
    assert job == ex["job_id_of_doc_example_1"]
    assert job_id_for(secret, "doc-example-1") == job


def test_the_long_job_example_prints_what_the_doc_shows(tmp_path: Path) -> None:
    """The Python program under "A long job with files, progress and cancel" runs against a
    real replica and nats-server and prints exactly the output shown below it."""
    import subprocess
    import sys

    from tests.conftest import NatsServer, environment_with, free_port, start_replica

    text = protocol_text()
    section = text[text.index("### A long job with files, progress and cancel") :]
    program = re.search(r"```python\n(.*?)\n```", section, re.DOTALL)
    shown = re.search(r"It prints:\n\n```text\n(.*?)\n```", section, re.DOTALL)
    assert program is not None
    assert shown is not None
    secret = "d0c5" * 16
    server = NatsServer(port=free_port(), store=tmp_path / "js")
    server.start()
    replica = start_replica(
        server.url, "pyexec", EXECUTOR_API_KEYS=f"backend-1:{secret}", EXECUTOR_MAX_TIMEOUT="60"
    )
    try:
        script = tmp_path / "long_job.py"
        script.write_text(program.group(1), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, str(script)],
            env=environment_with(NATS_URL=server.url, PYEXEC_SECRET=secret, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        replica.stop()
        server.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == shown.group(1).splitlines()
