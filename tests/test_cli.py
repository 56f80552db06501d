"""The ``pyexec`` command line: keygen, scripts, and serve/call against the embedded server."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consumer.config import environment_with
from consumer.embedded import free_port
from tests.conftest import stop_process

PYEXEC = [sys.executable, "-m", "consumer"]
CONSOLE_SCRIPT = Path(sys.executable).parent / "pyexec"
URL_LINE = re.compile(r"embedded NATS server at (nats://127\.0\.0\.1:(\d+))")
KEY_LINE = re.compile(r"development key made: EXECUTOR_API_KEYS=(dev:[0-9a-f]{64})\s*$")
ENV_LINE = re.compile(r"settings for 'pyexec call' written to (\S+)\s*$")


def run_pyexec(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYEXEC, *args],
        cwd=cwd,
        env=env if env is not None else environment_with(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def nats_server_pids(cwd: Path) -> list[int]:
    """Ids of running nats-server processes storing under ``cwd``'s .pyexec folder."""
    store = (cwd / ".pyexec" / "jetstream").resolve()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            where = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if not argv[0].endswith("nats-server") or "-sd" not in argv[:-1]:
            continue
        if (where / argv[argv.index("-sd") + 1]).resolve() == store:
            pids.append(int(entry.name))
    return pids


def port_accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


# -- keygen and scripts ------------------------------------------------------------------------


def test_keygen_prints_an_id_and_a_64_hex_secret(tmp_path: Path) -> None:
    """`pyexec keygen` prints one id:secret line with a 64-hex-digit secret, new each time."""
    lines = []
    for _ in range(2):
        done = subprocess.run(
            [str(CONSOLE_SCRIPT), "keygen"],
            cwd=tmp_path,
            env=environment_with(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        lines.append(done.stdout.strip())
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}:[0-9a-f]{64}", line), line
    assert lines[0] != lines[1]


def test_keygen_honours_id(tmp_path: Path) -> None:
    """`pyexec keygen --id backend-2025` uses that id before the colon."""
    done = run_pyexec("keygen", "--id", "backend-2025", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"backend-2025:[0-9a-f]{64}", done.stdout.strip()), done.stdout


def test_keygen_refuses_an_id_with_a_colon(tmp_path: Path) -> None:
    """`pyexec keygen --id 'a:b'` exits 2 and explains which characters an id may hold."""
    done = run_pyexec("keygen", "--id", "a:b", cwd=tmp_path)
    assert done.returncode == 2
    assert "--id" in done.stderr
    assert done.stdout == ""


def test_scripts_lists_the_shipped_scripts_with_summaries(tmp_path: Path) -> None:
    """`pyexec scripts` lists text.normalize and sql.transpile with their one-line summaries."""
    done = run_pyexec("scripts", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    listed = {
        line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1].strip()
        for line in done.stdout.splitlines()
        if line.strip()
    }
    assert listed["text.normalize"] == "Normalize text: Unicode form, whitespace and case."
    assert listed["sql.transpile"] == "Translate SQL from one dialect to another with sqlglot."


def test_scripts_with_a_name_shows_its_description_and_input(tmp_path: Path) -> None:
    """`pyexec scripts NAME` prints the docstring and the class Input; unknown names fail."""
    done = run_pyexec("scripts", "sql.transpile", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Translate SQL from one dialect to another with sqlglot." in done.stdout
    assert "class Input:" in done.stdout
    assert "pretty: bool = False" in done.stdout
    missing = run_pyexec("scripts", "no.such", cwd=tmp_path)
    assert missing.returncode == 1
    assert "no script named 'no.such'" in missing.stderr


# -- the embedded default ----------------------------------------------------------------------


@dataclass
class EmbeddedServe:
    """`pyexec serve` with no NATS_URL and no keys, run in its own working directory."""

    cwd: Path
    process: subprocess.Popen[str]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)
    metrics_port: int = 0

    def wait_for_log(self, event: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stderr):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("event") == event:
                    return dict(record)
            if self.process.poll() is not None:
                raise RuntimeError("serve exited: " + "".join(self.stdout + self.stderr)[-3000:])
            time.sleep(0.05)
        raise TimeoutError(f"no '{event}' log line within {timeout} s")

    def printed(self, pattern: re.Pattern[str]) -> re.Match[str]:
        for line in self.stdout:
            found = pattern.search(line)
            if found:
                return found
        raise AssertionError(f"no line matching {pattern.pattern!r} in {self.stdout!r}")

    @property
    def port(self) -> int:
        return int(self.printed(URL_LINE).group(2))

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        try:
            return stop_process(self.process, signum, timeout)
        finally:
            for reader in self.readers:
                reader.join(timeout=5)
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()
            for pid in nats_server_pids(self.cwd):  # left behind only if serve was killed
                os.kill(pid, signal.SIGKILL)


def start_embedded(cwd: Path, **settings: str) -> EmbeddedServe:
    """Start `pyexec serve` in ``cwd`` with the embedded defaults (and ``settings``) and wait
    until it serves."""
    process = subprocess.Popen(
        [*PYEXEC, "serve"],
        cwd=cwd,
        env=environment_with(
            **{
                "EXECUTOR_METRICS_PORT": "0",
                "EXECUTOR_WORKERS": "2",
                "EXECUTOR_LOG_FORMAT": "json",
                **settings,
            }
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # as a shell job: a process group of its own
    )
    serve = EmbeddedServe(cwd=cwd, process=process)
    for pipe, sink in ((process.stdout, serve.stdout), (process.stderr, serve.stderr)):

        def collect(pipe: Any = pipe, sink: list[str] = sink) -> None:
            for line in pipe:
                sink.append(line)

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        serve.readers.append(reader)
    try:
        serve.wait_for_log("replica ready")
    except BaseException:
        serve.stop()
        raise
    return serve


def listening_addresses(pid: int, port: int) -> set[str]:
    """The addresses process ``pid`` has a listening TCP socket on at ``port`` (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            address, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port or inode not in inodes:
                continue  # 0A: LISTEN
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word of the address in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, words))
    return found


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServe]:
    """One embedded `pyexec serve` for the module's call tests, its metrics on a free port
    with the default address."""
    metrics_port = free_port()
    serve = start_embedded(
        tmp_path_factory.mktemp("embedded"), EXECUTOR_METRICS_PORT=str(metrics_port)
    )
    serve.metrics_port = metrics_port
    try:
        yield serve
    finally:
        serve.stop()


def call(embedded: EmbeddedServe, *args: str) -> tuple[int, dict[str, Any], str]:
    """`pyexec call ARGS` in the serve's directory: exit code, the printed reply, stderr."""
    done = run_pyexec("call", *args, cwd=embedded.cwd)
    reply = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, reply, done.stderr


def test_embedded_serve_prints_url_and_dev_key(embedded: EmbeddedServe) -> None:
    """Serve without NATS_URL prints its local URL, a dev key and where dev.env was written."""
    url = embedded.printed(URL_LINE).group(1)
    key = embedded.printed(KEY_LINE).group(1)
    env_file = Path(embedded.printed(ENV_LINE).group(1))
    if not env_file.is_absolute():
        env_file = embedded.cwd / env_file
    assert env_file.resolve() == (embedded.cwd / ".pyexec" / "dev.env").resolve()
    assert port_accepts(embedded.port)
    lines = env_file.read_text().splitlines()
    assert f"NATS_URL={url}" in lines
    assert f"EXECUTOR_API_KEYS={key}" in lines


def test_embedded_serve_keeps_metrics_and_probes_on_loopback(embedded: EmbeddedServe) -> None:
    """Without NATS_URL (and no EXECUTOR_METRICS_HOST) /metrics, /healthz and /readyz listen on
    127.0.0.1 only: the development default offers nothing to the network."""
    assert listening_addresses(embedded.process.pid, embedded.metrics_port) == {"127.0.0.1"}
    for path in ("/healthz", "/readyz", "/metrics"):
        connection = http.client.HTTPConnection("127.0.0.1", embedded.metrics_port, timeout=10)
        try:
            connection.request("GET", path)
            assert connection.getresponse().status == 200, path
        finally:
            connection.close()


def test_embedded_serve_listens_where_the_metrics_host_says(tmp_path: Path) -> None:
    """An EXECUTOR_METRICS_HOST set explicitly wins over the embedded default."""
    metrics_port = free_port()
    serve = start_embedded(
        tmp_path, EXECUTOR_METRICS_PORT=str(metrics_port), EXECUTOR_METRICS_HOST="127.0.0.2"
    )
    try:
        assert listening_addresses(serve.process.pid, metrics_port) == {"127.0.0.2"}
    finally:
        assert serve.stop() == 0


def test_dev_env_is_readable_by_its_owner_only(embedded: EmbeddedServe) -> None:
    """The dev.env holding the dev secret has mode 0600."""
    mode = stat.S_IMODE((embedded.cwd / ".pyexec" / "dev.env").stat().st_mode)
    assert mode == 0o600


def test_embedded_keeps_jetstream_data_under_dot_pyexec(embedded: EmbeddedServe) -> None:
    """With EXECUTOR_DATA_DIR unset the embedded server stores its data in ./.pyexec."""
    assert (embedded.cwd / ".pyexec" / "jetstream").is_dir()


def test_call_by_name_finds_the_embedded_server(embedded: EmbeddedServe) -> None:
    """`pyexec call --name text.normalize` in the same directory needs no NATS_URL and exits 0."""
    code, reply, stderr = call(embedded, "--name", "text.normalize", "--ctx", '{"text": " a  b "}')
    assert code == 0, stderr
    assert reply["status"] == "ok"
    assert reply["result"] == {"text": "a b", "changed": True}
    assert reply["error"] is None


def test_call_file_runs_it(embedded: EmbeddedServe, tmp_path: Path) -> None:
    """`pyexec call FILE.py --ctx ...` runs the file's execute(ctx) and prints its result."""
    script = tmp_path / "add.py"
    script.write_text("def execute(ctx):\n    print('adding')\n    return ctx['a'] + ctx['b']\n")
    code, reply, stderr = call(embedded, str(script), "--ctx", '{"a": 2, "b": 40}')
    assert code == 0, stderr
    assert reply["status"] == "ok"
    assert reply["result"] == 42
    assert "adding" in reply["stdout"]


def test_call_echoes_request_id(embedded: EmbeddedServe, tmp_path: Path) -> None:
    """`pyexec call --request-id` sends the id and the printed reply carries it back."""
    script = tmp_path / "one.py"
    script.write_text("def execute(ctx):\n    return 1\n")
    code, reply, stderr = call(embedded, str(script), "--request-id", "cli-42")
    assert code == 0, stderr
    assert reply["request_id"] == "cli-42"


def test_call_script_error_exits_1(embedded: EmbeddedServe, tmp_path: Path) -> None:
    """A script that raises prints an error reply and `pyexec call` exits 1."""
    script = tmp_path / "boom.py"
    script.write_text("def execute(ctx):\n    raise ValueError('boom')\n")
    code, reply, _ = call(embedded, str(script))
    assert code == 1
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "script_error"
    assert reply["error"]["message"] == "boom"


def test_call_rejection_exits_2(embedded: EmbeddedServe) -> None:
    """An unknown script name prints a rejected reply and `pyexec call` exits 2."""
    code, reply, _ = call(embedded, "--name", "no.such.script")
    assert code == 2
    assert reply["status"] == "rejected"
    assert reply["error"]["code"] == "unknown_script"


def test_call_with_ctx_not_json_exits_2(embedded: EmbeddedServe) -> None:
    """`--ctx` that is not JSON exits 2 with a message naming --ctx, before anything is sent."""
    code, reply, stderr = call(embedded, "--name", "text.normalize", "--ctx", "{text: a}")
    assert code == 2
    assert reply == {}
    assert "--ctx" in stderr
    assert "JSON" in stderr
    assert "Traceback" not in stderr


def test_call_with_ctx_not_an_object_exits_2(embedded: EmbeddedServe) -> None:
    """`--ctx '[1, 2]'` exits 2 saying ctx must be a JSON object."""
    code, _, stderr = call(embedded, "--name", "text.normalize", "--ctx", "[1, 2]")
    assert code == 2
    assert "--ctx" in stderr
    assert "object" in stderr


def test_call_async_submits_a_job_and_prints_its_completion(embedded: EmbeddedServe) -> None:
    """`pyexec call --async` submits a job, waits for its completion and prints it."""
    code, reply, stderr = call(
        embedded, "--name", "text.normalize", "--ctx", '{"text": " a  b "}', "--async"
    )
    assert code == 0, stderr
    assert reply["status"] == "ok"
    assert reply["result"]["text"] == "a b"
    assert reply["job_id"]
    assert "accepted" in stderr


def test_call_with_files_in_and_out(embedded: EmbeddedServe, tmp_path: Path) -> None:
    """`pyexec call --file data=PATH --out DIR` puts the file, the script reads in/data and
    writes out/, and the output is saved into DIR with the digest the reply lists."""
    (tmp_path / "rows.csv").write_text("a\n1\n2\n")
    script = tmp_path / "double.py"
    script.write_text(
        "import pandas as pd\n"
        "def execute(ctx):\n"
        "    frame = pd.read_csv('in/data.csv')\n"
        "    (frame * 2).to_csv('out/doubled.csv', index=False)\n"
        "    return int(frame['a'].sum())\n"
    )
    out = tmp_path / "results"
    code, reply, stderr = call(
        embedded, str(script), "--file", f"data.csv={tmp_path / 'rows.csv'}", "--out", str(out)
    )
    assert code == 0, stderr
    assert reply["result"] == 3
    [listed] = reply["files"]
    saved = (out / "doubled.csv").read_bytes()
    assert saved == b"a\n2\n4\n"
    assert listed["sha256"] == hashlib.sha256(saved).hexdigest()
    bad = call(embedded, str(script), "--file", "data.csv")
    assert bad[0] == 2
    assert "ALIAS=PATH" in bad[2]


def test_job_status_and_cancel(embedded: EmbeddedServe, tmp_path: Path) -> None:
    """`pyexec job status ID` and `pyexec job cancel ID` print the job's state; an id no job
    has is unknown and exits 1."""
    code, reply, stderr = call(
        embedded, "--name", "text.normalize", "--ctx", '{"text": "x"}', "--async"
    )
    assert code == 0, stderr
    job_id = reply["job_id"]
    status = run_pyexec("job", "status", job_id, cwd=embedded.cwd)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["state"] == "done"
    assert shown["completion"]["result"]["text"] == "x"
    cancel = run_pyexec("job", "cancel", job_id, cwd=embedded.cwd)
    assert json.loads(cancel.stdout) == {"job_id": job_id, "state": "done"}
    unknown = run_pyexec("job", "status", "0" * 32, cwd=embedded.cwd)
    assert unknown.returncode == 1
    assert json.loads(unknown.stdout)["state"] == "unknown"


def test_call_without_server_settings_explains(tmp_path: Path) -> None:
    """`pyexec call` with no NATS_URL and no dev.env in its directory exits 2 naming NATS_URL."""
    done = run_pyexec("call", "--name", "text.normalize", cwd=tmp_path)
    assert done.returncode == 2
    assert "NATS_URL" in done.stderr
    assert "Traceback" not in done.stderr


def test_sigterm_stops_serve_and_its_nats_server(tmp_path: Path) -> None:
    """On SIGTERM the embedded serve exits 0 and takes its nats-server (and its port) down."""
    serve = start_embedded(tmp_path)
    try:
        port = serve.port
        assert port_accepts(port)
        assert len(nats_server_pids(tmp_path)) == 1
        serve.process.send_signal(signal.SIGTERM)
        code = serve.process.wait(timeout=30)
        left = nats_server_pids(tmp_path)
    finally:
        serve.stop()
    assert code == 0
    assert left == []
    assert not port_accepts(port)
    events = [json.loads(line).get("event") for line in serve.stderr if line.startswith("{")]
    assert "stopped" in events


def test_ctrl_c_on_the_terminal_stops_serve_cleanly(tmp_path: Path) -> None:
    """SIGINT to serve's whole process group (Ctrl-C) still drains, exits 0 and stops NATS.

    Regression: the embedded nats-server shared serve's process group, so Ctrl-C killed it
    first and the replica's drain then waited forever for a reconnection.
    """
    serve = start_embedded(tmp_path)
    try:
        port = serve.port
        os.killpg(serve.process.pid, signal.SIGINT)
        code = serve.process.wait(timeout=30)
        left = nats_server_pids(tmp_path)
    finally:
        serve.stop()
    assert code == 0
    assert left == []
    assert not port_accepts(port)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_call_with_a_stale_dev_env_explains(tmp_path: Path) -> None:
    """`pyexec call` whose dev.env names a stopped server exits 2 with one clear error line."""
    (tmp_path / ".pyexec").mkdir()
    url = f"nats://127.0.0.1:{closed_port()}"
    (tmp_path / ".pyexec" / "dev.env").write_text(
        f"NATS_URL={url}\nEXECUTOR_API_KEYS=dev:{'a' * 64}\n"
    )
    done = run_pyexec("call", "--name", "text.normalize", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("pyexec: error:")


def test_dev_env_is_made_private_even_if_it_existed(tmp_path: Path) -> None:
    """A dev.env left world-readable from before is 0600 once serve writes the new dev key."""
    (tmp_path / ".pyexec").mkdir()
    old = tmp_path / ".pyexec" / "dev.env"
    old.write_text("NATS_URL=nats://127.0.0.1:1\n")
    old.chmod(0o644)
    serve = start_embedded(tmp_path)
    try:
        key = serve.printed(KEY_LINE).group(1)
        written = old.read_text()
        mode = stat.S_IMODE(old.stat().st_mode)
    finally:
        serve.stop()
    assert f"EXECUTOR_API_KEYS={key}" in written
    assert mode == 0o600
