"""The network below the interpreter: seccomp, Landlock and the broker, each on its own.

With the policy layer off a script is plain Python (``import socket``, ``_socket``), so what
stops it is the layer under test alone; a pool with every layer off is the control where the
same attempts work. Every destination is a listener of the test's own on loopback; the
refusals of metadata and private addresses run in a network namespace of the test's own, where
nothing could be reached even if a refusal failed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import secrets
import select
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import landlock, seccomp
from sandbox.config import PoolConfig
from tests.pools import (
    ROOT_ONLY,
    Listener,
    LivePool,
    assert_policy_violation,
    attempt,
    live,
    ok_result,
    only,
    refusal,
)

QUIET = 0.3
DENIED = refusal("PermissionError", "EPERM")


# -- receivers the runs try to reach ---------------------------------------------------------------


class UdpReceiver:
    """A UDP socket on 127.0.0.1 that reports the datagrams it got."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    def take(self, wait: float = QUIET) -> list[bytes]:
        got = []
        while select.select([self.sock], [], [], wait)[0]:
            got.append(self.sock.recv(65536))
            wait = 0
        return got


class UnixListener:
    """A listening UNIX socket, named in a world-writable folder or abstract."""

    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(address)
        if isinstance(address, str):
            os.chmod(address, 0o777)  # noqa: S103 - the world-writable socket of the finding
        self.sock.listen(8)

    def take(self, wait: float = QUIET) -> int:
        """How many connections were offered."""
        count = 0
        while select.select([self.sock], [], [], wait)[0]:
            conn, _ = self.sock.accept()
            conn.close()
            count += 1
            wait = 0
        return count


@pytest.fixture(scope="module")
def udp() -> Iterator[UdpReceiver]:
    receiver = UdpReceiver()
    yield receiver
    receiver.sock.close()


@pytest.fixture(scope="module")
def named_unix() -> Iterator[UnixListener]:
    folder = tempfile.mkdtemp(prefix="pyexec-unix-")
    os.chmod(folder, 0o777)  # noqa: S103 - reachable by the runs' user
    listener = UnixListener(os.path.join(folder, "open.sock"))
    yield listener
    listener.sock.close()
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(folder, "open.sock"))
        os.rmdir(folder)


@pytest.fixture(scope="module")
def abstract_unix() -> Iterator[UnixListener]:
    listener = UnixListener(b"\0pyexec-test-" + secrets.token_hex(8).encode())
    yield listener
    listener.sock.close()


# -- pools ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_pool(scratch_base: Path) -> Iterator[LivePool]:
    """Every layer off: the control where every attempt below works."""
    with live(only(None, scratch_base)) as pool:
        yield pool


@pytest.fixture(scope="module")
def seccomp_pool(scratch_base: Path) -> Iterator[LivePool]:
    if seccomp.supported() is not None:
        pytest.skip(seccomp.supported() or "")
    with live(only("seccomp", scratch_base)) as pool:
        yield pool


@pytest.fixture(scope="module")
def landlock_pool(scratch_base: Path) -> Iterator[LivePool]:
    if landlock.abi_version() == 0:
        pytest.skip("Landlock is not available in this kernel")
    with live(only("landlock", scratch_base)) as pool:
        yield pool


@pytest.fixture(scope="module")
def broker_pool(scratch_base: Path) -> Iterator[LivePool]:
    """The network layer alone (the broker), default ports and no allow list."""
    with live(only("network", scratch_base)) as pool:
        yield pool


@pytest.fixture(scope="module")
def allowing_pool(scratch_base: Path, tcp_listener: Listener) -> Iterator[LivePool]:
    """The broker alone, allowing the module's listener."""
    allow = (f"127.0.0.1:{tcp_listener.port}",)
    with live(only("network", scratch_base, net_allow=allow)) as pool:
        yield pool


@pytest.fixture(scope="module")
def offline_pool(scratch_base: Path, tcp_listener: Listener) -> Iterator[LivePool]:
    """The broker alone with the network off, the listener allowed all the same."""
    allow = (f"127.0.0.1:{tcp_listener.port}",)
    with live(only("network", scratch_base, network="off", net_allow=allow)) as pool:
        yield pool


@pytest.fixture(scope="module")
def full_pool(scratch_base: Path, tcp_listener: Listener) -> Iterator[LivePool]:
    """Every layer on, the listener allowed."""
    config = PoolConfig(
        workers=1,
        warm_children=1,
        scratch_dir=str(scratch_base),
        net_allow=(f"127.0.0.1:{tcp_listener.port}",),
    )
    with live(config) as pool:
        yield pool


# -- probes ---------------------------------------------------------------------------------------

RAW_CONNECT = attempt(
    """
    import _socket
    # The C socket class under socket.socket: none of the Python-level code applies.
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect((ctx["host"], ctx["port"]))
        sock.send(b"raw")
    finally:
        sock.close()
    value = "connected"
    """
)
CREATE_CONNECTION = attempt(
    """
    import socket
    with socket.create_connection((ctx["host"], ctx["port"]), timeout=5) as sock:
        sock.sendall(b"brokered")
        value = sock.getpeername()[1]
    """
)
UDP_SEND = attempt(
    """
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"udp", ("127.0.0.1", ctx["port"]))
    value = "sent"
    """
)
UNIX_CONNECT = attempt(
    """
    import socket
    address = ctx["path"] if "path" in ctx else b"\\0" + ctx["abstract"].encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(address)
    value = "connected"
    """
)
OPEN_SOCKET = attempt(
    """
    import socket
    sock = socket.socket(ctx["family"], ctx["kind"], ctx["proto"])
    sock.close()
    value = "opened"
    """
)
LISTEN = attempt(
    """
    import _socket
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
    finally:
        sock.close()
    value = "listening"
    """
)
FAST_OPEN = attempt(
    """
    import _socket
    # TCP Fast Open: a sendto with an address connects without connect().
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.sendto(b"tfo", 0x20000000, ("127.0.0.1", ctx["port"]))
    finally:
        sock.close()
    value = "sent"
    """
)
INTERFACES = attempt(
    """
    import _socket, fcntl, struct
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        buffer = bytearray(4096)
        request = struct.pack("iL", len(buffer), 0)
        value = len(fcntl.ioctl(sock.fileno(), 0x8912, request))  # SIOCGIFCONF
    finally:
        sock.close()
    """
)
READ = attempt(
    """
    with open(ctx["path"], encoding="utf-8", errors="replace") as handle:
        value = len(handle.read())
    """
)
KILL = attempt(
    """
    import os, signal
    os.kill(ctx["pid"], signal.SIGTERM)
    value = "signalled"
    """
)
# An address whose str() names a public host while the text connected to is loopback.
DISGUISED = """
import socket
class Disguised(str):
    def __str__(self):
        return "93.184.216.34"
def execute(ctx):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect((Disguised("127.0.0.1"), ctx["port"]))
        sock.sendall(b"disguised")
    return "connected"
"""
PROC_NET = ("/proc/self/net/tcp", "/proc/self/net/unix", "/proc/net/tcp", "/proc/net/route")


# -- controls --------------------------------------------------------------------------------------


def test_control_every_route_works_with_every_layer_off(
    bare_pool: LivePool,
    listener: Listener,
    udp: UdpReceiver,
    named_unix: UnixListener,
    abstract_unix: UnixListener,
) -> None:
    """With every layer off, TCP, UDP, named and abstract UNIX sockets and /proc/net all work."""
    assert ok_result(bare_pool.run(RAW_CONNECT, host="127.0.0.1", port=listener.port)) == {
        "value": "connected"
    }
    assert listener.take() == [b"raw"]
    assert ok_result(bare_pool.run(UDP_SEND, port=udp.port)) == {"value": "sent"}
    assert udp.take() == [b"udp"]
    assert isinstance(named_unix.address, str)
    assert ok_result(bare_pool.run(UNIX_CONNECT, path=named_unix.address)) == {"value": "connected"}
    assert named_unix.take() == 1
    abstract = bytes(abstract_unix.address)[1:].decode()
    assert ok_result(bare_pool.run(UNIX_CONNECT, abstract=abstract)) == {"value": "connected"}
    assert abstract_unix.take() == 1
    assert ok_result(bare_pool.run(READ, path="/proc/self/net/tcp"))["value"] > 0
    assert ok_result(bare_pool.run(LISTEN)) == {"value": "listening"}


# -- seccomp alone --------------------------------------------------------------------------------


def test_seccomp_alone_refuses_a_tcp_connect_below_the_socket_module(
    seccomp_pool: LivePool, listener: Listener
) -> None:
    """Seccomp alone: a connect made with _socket directly fails EPERM; nothing arrives."""
    outcome = seccomp_pool.run(RAW_CONNECT, host="127.0.0.1", port=listener.port)
    assert ok_result(outcome) == DENIED
    assert listener.take() == []


def test_seccomp_alone_refuses_tcp_to_https_on_loopback(seccomp_pool: LivePool) -> None:
    """Seccomp alone refuses TCP :443 on 127.0.0.1 before the kernel could answer it."""
    outcome = seccomp_pool.run(RAW_CONNECT, host="127.0.0.1", port=443)
    assert ok_result(outcome) == DENIED


def test_seccomp_alone_refuses_udp(seccomp_pool: LivePool, udp: UdpReceiver) -> None:
    """Seccomp alone: no UDP socket, so no datagram reaches the receiver."""
    assert ok_result(seccomp_pool.run(UDP_SEND, port=udp.port)) == DENIED
    assert udp.take() == []


def test_seccomp_alone_refuses_named_and_abstract_unix_sockets(
    seccomp_pool: LivePool, named_unix: UnixListener, abstract_unix: UnixListener
) -> None:
    """Seccomp alone refuses UNIX sockets: neither the world-writable named socket nor the
    abstract one is offered a connection."""
    assert isinstance(named_unix.address, str)
    assert ok_result(seccomp_pool.run(UNIX_CONNECT, path=named_unix.address)) == DENIED
    abstract = bytes(abstract_unix.address)[1:].decode()
    assert ok_result(seccomp_pool.run(UNIX_CONNECT, abstract=abstract)) == DENIED
    assert named_unix.take() == 0
    assert abstract_unix.take() == 0


@pytest.mark.parametrize(
    ("family", "kind", "proto"),
    [
        (socket.AF_PACKET, socket.SOCK_RAW, 0),
        (socket.AF_NETLINK, socket.SOCK_RAW, 0),
        (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
        (socket.AF_INET6, socket.SOCK_DGRAM, 0),
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP),
    ],
    ids=["packet", "netlink", "raw-icmp", "udp6", "sctp"],
)
def test_seccomp_alone_refuses_every_socket_but_tcp(
    seccomp_pool: LivePool, family: int, kind: int, proto: int
) -> None:
    """Seccomp alone refuses packet, netlink, raw, UDP and SCTP sockets, even to a root run."""
    outcome = seccomp_pool.run(OPEN_SOCKET, family=family, kind=kind, proto=proto)
    assert ok_result(outcome) == DENIED


def test_seccomp_alone_still_lets_a_tcp_socket_be_made(seccomp_pool: LivePool) -> None:
    """Making a TCP socket is allowed (libraries make one before the broker connects it)."""
    outcome = seccomp_pool.run(OPEN_SOCKET, family=socket.AF_INET, kind=socket.SOCK_STREAM, proto=0)
    assert ok_result(outcome) == {"value": "opened"}


def test_seccomp_alone_refuses_listening_and_fast_open(
    seccomp_pool: LivePool, listener: Listener
) -> None:
    """No bind or listen, and no TCP Fast Open send with an address (a connect in disguise)."""
    assert ok_result(seccomp_pool.run(LISTEN)) == DENIED
    assert ok_result(seccomp_pool.run(FAST_OPEN, port=listener.port)) == DENIED
    assert listener.take() == []


def test_seccomp_alone_hides_the_interface_table(seccomp_pool: LivePool) -> None:
    """SIOCGIFCONF (the host's interfaces and addresses) is refused."""
    assert ok_result(seccomp_pool.run(INTERFACES)) == DENIED


def test_seccomp_alone_refuses_signals_to_other_processes(seccomp_pool: LivePool) -> None:
    """A run (uid 0 here, as the test) cannot signal a process of the same uid outside it."""
    import subprocess

    target = subprocess.Popen(["sleep", "60"])
    try:
        assert ok_result(seccomp_pool.run(KILL, pid=target.pid)) == DENIED
        assert target.poll() is None
    finally:
        target.kill()
        target.wait()


def test_seccomp_alone_lets_a_run_signal_itself(seccomp_pool: LivePool) -> None:
    """Signals to the run itself keep working (signal.raise_signal, os.kill of its own pid)."""
    source = """
        import os, signal
        def execute(ctx):
            seen = []
            signal.signal(signal.SIGUSR1, lambda *_: seen.append("usr1"))
            os.kill(os.getpid(), signal.SIGUSR1)
            signal.raise_signal(signal.SIGUSR1)
            return seen
        """
    assert ok_result(seccomp_pool.run(source)) == ["usr1", "usr1"]


def test_seccomp_alone_refuses_changing_another_process(seccomp_pool: LivePool) -> None:
    """prlimit and setpriority on a process outside the run fail EPERM; on itself they work."""
    source = """
        import os, resource
        def execute(ctx):
            out = []
            for call in (
                lambda pid: resource.prlimit(pid, resource.RLIMIT_NOFILE, (16, 16)),
                lambda pid: os.setpriority(os.PRIO_PROCESS, pid, 19),
            ):
                try:
                    call(ctx["pid"])
                    out.append("changed")
                except PermissionError:
                    out.append("EPERM")
            resource.prlimit(0, resource.RLIMIT_CORE, (0, 0))
            os.setpriority(os.PRIO_PROCESS, 0, 1)
            return out
        """
    assert ok_result(seccomp_pool.run(source, pid=os.getpid())) == ["EPERM", "EPERM"]
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0


def test_seccomp_alone_refuses_memory_files(seccomp_pool: LivePool) -> None:
    """memfd_create (memory outside the address-space limit) is refused."""
    probe = attempt(
        """
        import os
        value = os.memfd_create("fill")
        """
    )
    assert ok_result(seccomp_pool.run(probe)) == DENIED


# System calls that make objects outliving the run (System V IPC, POSIX message queues) or a
# Landlock ruleset of the run's own (its rules would keep deleted files' space allocated), by
# x86-64 number, with arguments that would succeed unrefused.
IPC_CALLS = {
    "shmget": (29, 0, 4096, 0o1666),  # IPC_PRIVATE, IPC_CREAT | 0666
    "semget": (64, 0, 1, 0o1666),
    "msgget": (68, 0, 0o1666),
    "mq_open": (240, "'/pyexec-probe'", 0o102, 0o600),  # O_CREAT | O_RDWR
    "landlock_create_ruleset": (444, 0, 0, 1),  # LANDLOCK_CREATE_RULESET_VERSION
}


@pytest.mark.parametrize("name", IPC_CALLS)
def test_seccomp_alone_refuses_ipc_and_rulesets(seccomp_pool: LivePool, name: str) -> None:
    """shmget, semget, msgget, mq_open and landlock_create_ruleset fail EPERM: nothing a run
    makes outlives it or is seen by a later run."""
    number, *arguments = IPC_CALLS[name]
    call = ", ".join(
        f"ctypes.c_char_p(b{value})" if isinstance(value, str) else f"ctypes.c_long({value})"
        for value in arguments
    )
    source = f"""
        import ctypes
        def execute(ctx):
            libc = ctypes.CDLL(None, use_errno=True)
            result = libc.syscall(ctypes.c_long({number}), {call})
            return [result, ctypes.get_errno()]
        """
    if platform.machine() != "x86_64":
        pytest.skip("the numbers here are x86-64's")
    assert ok_result(seccomp_pool.run(source)) == [-1, errno.EPERM]


# -- Landlock alone -------------------------------------------------------------------------------


def test_landlock_alone_refuses_every_tcp_connect(
    landlock_pool: LivePool, listener: Listener
) -> None:
    """Landlock alone refuses TCP connects to any port (the broker connects for runs)."""
    for port in (listener.port, 443, 80):
        outcome = landlock_pool.run(RAW_CONNECT, host="127.0.0.1", port=port)
        assert ok_result(outcome) == refusal("PermissionError", "EACCES"), port
    assert listener.take() == []


@pytest.mark.parametrize("path", PROC_NET)
def test_landlock_alone_hides_the_host_network_tables(landlock_pool: LivePool, path: str) -> None:
    """/proc/self/net and /proc/net (sockets, routes, UNIX socket paths) are unreadable."""
    assert ok_result(landlock_pool.run(READ, path=path)) == refusal("PermissionError", "EACCES")


def test_landlock_alone_hides_mounts_and_tasks_but_not_status(landlock_pool: LivePool) -> None:
    """Of its own /proc entry a run reads status, not mounts or its tasks' net tables."""
    source = """
        import os
        def execute(ctx):
            out = {}
            tid = os.getpid()
            for name in ("status", "mounts", "mountinfo", f"task/{tid}/net/tcp", "environ"):
                try:
                    with open(f"/proc/self/{name}", encoding="utf-8") as handle:
                        out[name] = len(handle.read()) > 0
                except PermissionError:
                    out[name] = "EACCES"
            return out
        """
    seen = ok_result(landlock_pool.run(source))
    task = next(key for key in seen if key.startswith("task/"))
    assert seen.pop(task) == "EACCES"
    assert seen == {"status": True, "mounts": "EACCES", "mountinfo": "EACCES",
                    "environ": "EACCES"}  # fmt: skip


@pytest.mark.skipif(landlock.abi_version() < 6, reason="abstract-socket scoping needs ABI 6")
def test_landlock_alone_refuses_abstract_unix_sockets_outside_the_run(
    landlock_pool: LivePool, abstract_unix: UnixListener
) -> None:
    """With ABI 6 Landlock alone refuses connecting to an abstract socket outside the run."""
    abstract = bytes(abstract_unix.address)[1:].decode()
    assert ok_result(landlock_pool.run(UNIX_CONNECT, abstract=abstract)) == DENIED
    assert abstract_unix.take() == 0


# -- the broker alone -----------------------------------------------------------------------------


def test_broker_alone_refuses_an_unlisted_loopback_port(
    broker_pool: LivePool, listener: Listener
) -> None:
    """The broker refuses 127.0.0.1:PORT that is not allowed; the listener sees nothing."""
    outcome = broker_pool.run(CREATE_CONNECTION, host="127.0.0.1", port=listener.port)
    assert_policy_violation(outcome, f"127.0.0.1:{listener.port}", "is not allowed")
    assert listener.take() == []


def test_broker_alone_connects_a_listed_destination(
    allowing_pool: LivePool, listener: Listener
) -> None:
    """With net_allow naming the listener, the broker connects and the run's data arrives."""
    outcome = allowing_pool.run(CREATE_CONNECTION, host="127.0.0.1", port=listener.port)
    assert ok_result(outcome) == {"value": listener.port}
    assert listener.take() == [b"brokered"]


def test_broker_resolves_names_itself(allowing_pool: LivePool, listener: Listener) -> None:
    """``localhost`` is resolved by the broker: only the allowed address comes back (not ::1),
    and connecting by that name reaches the listener."""
    source = """
        import socket
        def execute(ctx):
            found = socket.getaddrinfo("localhost", ctx["port"], type=socket.SOCK_STREAM)
            with socket.create_connection(("localhost", ctx["port"]), timeout=5) as sock:
                sock.sendall(b"by name")
            return sorted({entry[4][0] for entry in found})
        """
    assert ok_result(allowing_pool.run(source, port=listener.port)) == ["127.0.0.1"]
    assert listener.take() == [b"by name"]


def test_broker_checks_the_address_it_connects_not_what_the_script_says(
    broker_pool: LivePool, listener: Listener
) -> None:
    """An address object whose str() names a public host is connected as the text it holds
    (loopback), which the rules refuse; nothing reaches the listener."""
    outcome = broker_pool.run(DISGUISED, port=listener.port)
    assert_policy_violation(outcome, f"127.0.0.1:{listener.port}")
    assert listener.take() == []


def test_broker_with_the_network_off_refuses_lookups_and_connections(
    offline_pool: LivePool, listener: Listener
) -> None:
    """With network="off" the broker refuses the listener net_allow names, and every lookup."""
    outcome = offline_pool.run(CREATE_CONNECTION, host="127.0.0.1", port=listener.port)
    assert_policy_violation(outcome, "the network is off")
    outcome = offline_pool.run(CREATE_CONNECTION, host="localhost", port=listener.port)
    assert_policy_violation(outcome, "resolving 'localhost' (the network is off)")
    assert listener.take() == []


@ROOT_ONLY
def test_network_off_also_gives_root_services_an_empty_namespace(
    offline_pool: LivePool, listener: Listener
) -> None:
    """With network="off" and a root service even a connect below the broker has no route."""
    outcome = offline_pool.run(RAW_CONNECT, host="127.0.0.1", port=listener.port)
    assert ok_result(outcome) == refusal("OSError", "ENETUNREACH")
    assert listener.take() == []


@ROOT_ONLY
@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("169.254.169.254", "link-local address"),
        ("10.0.0.1", "private address"),
        ("100.64.0.1", "shared (carrier-grade NAT) address"),
        ("::ffff:169.254.169.254", "link-local address"),
    ],
    ids=["metadata", "private", "shared", "mapped-metadata"],
)
def test_broker_refuses_special_ranges_before_connecting(
    scratch_base: Path, host: str, reason: str
) -> None:
    """The broker refuses metadata, private and shared addresses on port 80, naming the range
    (in a network namespace of the test's own: nothing could be reached anyway)."""
    with live(only("network", scratch_base), empty_network=True) as pool:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        source = f"""
            import socket
            def execute(ctx):
                with socket.socket({family}, socket.SOCK_STREAM) as sock:
                    sock.connect((ctx["host"], 80))
                return "connected"
            """
        outcome = pool.run(source, host=host)
    shown = f"[{host}]:80" if family == socket.AF_INET6 else f"{host}:80"
    assert_policy_violation(outcome, f"network access to {shown} ({reason})")


# -- everything on ---------------------------------------------------------------------------------


def test_every_layer_on_requests_goes_through_the_broker(
    full_pool: LivePool, listener: Listener
) -> None:
    """With every layer on, requests reaches an allowed destination through the broker (its
    HTTP request arrives), and a port that is not allowed ends the run policy_violation."""
    source = """
        import requests
        def execute(ctx):
            try:
                requests.get(f"http://127.0.0.1:{ctx['port']}/probe", timeout=1)
            except requests.exceptions.ReadTimeout:
                return "sent, no answer"
            return "answered"
        """
    assert ok_result(full_pool.run(source, port=listener.port)) == "sent, no answer"
    (received,) = listener.take()
    assert received.startswith(b"GET /probe HTTP/1.1")
    other = listener.port + 1 if listener.port < 65535 else listener.port - 1
    assert_policy_violation(full_pool.run(source, port=other), f"127.0.0.1:{other}")
