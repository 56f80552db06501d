"""pyexec-client installed alone: a virtual environment with only the client and its two
dependencies calls a real replica through every call, and sees each group of errors.

The environment is made by the README's test command (``.venv-client``, from
``client/requirements.lock`` and ``./client``), since tests do not download packages;
``PYEXEC_CLIENT_PYTHON`` may name another one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import KEY_ID, ROOT, SECRET, NatsServer, ReplicaProcess

CLIENT = ROOT / "client"


def client_python() -> Path:
    given = os.environ.get("PYEXEC_CLIENT_PYTHON")
    python = Path(given) if given else ROOT / ".venv-client" / "bin" / "python"
    if not python.exists():
        if os.environ.get("CI"):
            pytest.fail(f"no client-only environment at {python} (see the README's test command)")
        pytest.skip(f"no client-only environment at {python} (see the README's test command)")
    return python


def test_the_client_needs_only_nats_py_and_msgspec() -> None:
    """The distribution declares two dependencies and nothing of the service."""
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == "pyexec-client"
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == {"nats-py", "msgspec"}


def locked(path: Path) -> dict[str, str]:
    """``name -> version`` of a lock file's pins."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, _, version = line.split(" ")[0].partition("==")
            pins[name] = version
    return pins


def test_the_client_lock_pins_what_the_service_is_tested_with() -> None:
    """client/requirements.lock pins nats-py and msgspec at the test lock's versions (and
    their hashes), so the client alone runs what the service's tests ran."""
    client = locked(CLIENT / "requirements.lock")
    assert set(client) == {"nats-py", "msgspec"}
    tested = locked(ROOT / "requirements" / "test.lock")
    assert client == {name: tested[name] for name in client}
    text = (CLIENT / "requirements.lock").read_text(encoding="utf-8")
    assert text.count("--hash=sha256:") >= 2


def test_the_client_package_imports_nothing_of_the_service() -> None:
    """No module of pyexec_client imports consumer, sandbox or a library of the scripts."""
    forbidden = ("consumer", "sandbox", "RestrictedPython", "structlog", "prometheus_client")
    for path in (CLIENT / "pyexec_client").glob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert not words[1].startswith(forbidden), f"{path.name}: {line}"


def test_the_client_alone_calls_a_real_replica(
    nats_server: NatsServer, replica: ReplicaProcess
) -> None:
    """In an environment with only pyexec-client, nats-py and msgspec: code, named, a job with
    a file, its progress, completion, status and cancel, the output file; and the five error
    groups, each for what provokes it."""
    python = client_python()
    done = subprocess.run(
        [
            str(python),
            str(ROOT / "tests" / "client_alone.py"),
            nats_server.url,
            replica.prefix,
            KEY_ID,
            SECRET,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd="/",  # nothing of the working copy on the path
        env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    installed = report["installed"]
    assert set(installed["distributions"]) - {"pip", "setuptools", "wheel"} == {
        "pyexec-client",
        "nats-py",
        "msgspec",
    }
    assert all(installed["absent"].values()), installed["absent"]
    calls = report["calls"]
    assert calls["execute_code"] == ["ok", 2]
    assert calls["execute_named"] == ["ok", {"text": "Hello World", "changed": True}]
    assert calls["submit"] is True
    assert calls["progress"] == [0.5, "half"]
    assert calls["completion"] == ["ok", {"n": 42, "text": "abc"}, True]
    assert calls["get_file"] == "ABC"
    assert calls["status"] == ["done", "ok"]
    assert calls["cancel"] == "done"
    assert calls["errors"] == {
        "could not connect": "ConnectError",
        "no replica": "NoReplica",
        "refused": "Refused",
        "timed out": "Timeout",
        "bad reply": "BadReply",
    }
    assert sys.executable != str(python)
