"""Isolation as an operator sees it: pyexec doctor, the start-up check, and the settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from consumer.config import environment_with
from tests.conftest import NatsServer, ReplicaProcess, replica_env, start_replica

PYEXEC = [sys.executable, "-m", "consumer"]


def run_pyexec(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYEXEC, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_doctor_reports_every_layer_active_on_this_host() -> None:
    """pyexec doctor names each layer, says it is active here, and exits 0."""
    done = run_pyexec("doctor", "--timings", env=environment_with())
    assert done.returncode == 0, done.stdout + done.stderr
    for layer in ("policy", "limits", "user", "seccomp", "landlock", "network"):
        line = next(line for line in done.stdout.splitlines() if line.startswith(layer))
        assert "active" in line, line
        assert "INACTIVE" not in line, line
    assert "child: landlock" in done.stdout
    assert "all isolation layers are active" in done.stdout


def test_doctor_exits_1_and_says_why_when_a_layer_is_missing() -> None:
    """A layer that cannot work (no such user to run as) is INACTIVE with its reason; exit 1."""
    done = run_pyexec("doctor", env=environment_with(EXECUTOR_RUN_AS_USER="no-such-user-here"))
    assert done.returncode == 1, done.stdout + done.stderr
    user = next(line for line in done.stdout.splitlines() if line.startswith("user"))
    assert "INACTIVE" in user
    assert "no-such-user-here" in user
    assert "missing: user" in done.stdout


def test_require_isolation_refuses_to_serve_with_a_layer_missing(
    nats_server: NatsServer,
) -> None:
    """EXECUTOR_REQUIRE_ISOLATION=1 stops serve when a layer is not active, naming it."""
    env = replica_env(
        nats_server.url,
        "requireiso",
        EXECUTOR_REQUIRE_ISOLATION="1",
        EXECUTOR_RUN_AS_USER="no-such-user-here",
    )
    done = subprocess.run(
        [*PYEXEC, "serve"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2
    assert "EXECUTOR_REQUIRE_ISOLATION=1" in done.stderr
    assert "user" in done.stderr.splitlines()[-1]


def test_missing_layer_without_requirement_serves_with_a_loud_warning(
    nats_server: NatsServer,
) -> None:
    """Without the requirement the replica serves, and logs ISOLATION INCOMPLETE once."""
    replica: ReplicaProcess = start_replica(
        nats_server.url, EXECUTOR_RUN_AS_USER="no-such-user-here"
    )
    try:
        warning = replica.wait_for("ISOLATION INCOMPLETE: scripts run without some layers")
    finally:
        replica.stop()
    assert warning["level"] == "warning"
    assert warning["missing"] == "user"


def test_unsafe_disable_cannot_be_combined_with_require_isolation(tmp_path: Path) -> None:
    """Switching layers off while requiring isolation is a configuration error."""
    done = run_pyexec(
        "doctor",
        env=environment_with(
            EXECUTOR_REQUIRE_ISOLATION="1", EXECUTOR_UNSAFE_DISABLE_LAYERS="seccomp"
        ),
    )
    assert done.returncode == 2
    assert "EXECUTOR_UNSAFE_DISABLE_LAYERS" in done.stderr


def test_isolation_settings_are_checked_with_the_variable_named() -> None:
    """Malformed isolation settings stop the start with a message naming the variable."""
    cases = {
        "EXECUTOR_NETWORK": "sometimes",
        "EXECUTOR_NET_PORTS": "http",
        "EXECUTOR_NET_ALLOW": "10.0.0.0/33",
        "EXECUTOR_UNSAFE_DISABLE_LAYERS": "firewall",
        "EXECUTOR_REQUIRE_ISOLATION": "maybe",
        "EXECUTOR_POOL_MODE": "lukewarm",
    }
    for variable, value in cases.items():
        done = run_pyexec("doctor", env=environment_with(**{variable: value}))
        assert done.returncode == 2, (variable, done.stderr)
        assert variable in done.stderr, (variable, done.stderr)
