"""The network broker and its rules on their own: real sockets and a listener on loopback.

Names are ones /etc/hosts answers (``localhost``) or literals, so no lookup leaves the host.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from collections.abc import Iterator

import pytest

from sandbox.broker import MAX_REQUESTS, Broker, RunNetwork
from sandbox.netrules import NetworkRules, parse_allow
from sandbox.protocol import Connect, Connected, NetFailed, NetRefused, Resolve, Resolved
from tests.pools import Listener

PUBLIC = ipaddress.ip_address("93.184.216.34")


def rules(*allow: str, enabled: bool = True, own: tuple[str, ...] = ()) -> NetworkRules:
    return NetworkRules(
        enabled=enabled,
        ports=frozenset({80, 443}),
        allowed=tuple(parse_allow(entry) for entry in allow),
        own=frozenset(ipaddress.ip_address(address) for address in own),
    )


def later(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


@pytest.fixture
def port_listener() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


# -- the rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("100.64.0.1", "shared (carrier-grade NAT)"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address under test, not a bind
        ("240.0.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:a9fe:a9fe::1", "link-local"),  # 6to4 of 169.254.169.254
    ],
)
def test_special_addresses_are_refused_on_an_allowed_port(address: str, reason: str) -> None:
    """Loopback, link-local, private, shared, multicast, unspecified and reserved addresses,
    also embedded in IPv6, are refused on port 443, naming the range."""
    refusal = rules().refusal(ipaddress.ip_address(address), 443)
    assert refusal is not None
    assert f"({reason} address)" in refusal


def test_public_addresses_only_on_the_configured_ports() -> None:
    """A public address is allowed on 80 and 443 and refused on 22."""
    assert rules().refusal(PUBLIC, 443) is None
    assert rules().refusal(PUBLIC, 80) is None
    assert "port 22 is not allowed" in (rules().refusal(PUBLIC, 22) or "")


def test_the_executors_own_address_is_refused() -> None:
    """An address of the executor's own interfaces is refused even when public."""
    assert "own host" in (rules(own=(str(PUBLIC),)).refusal(PUBLIC, 443) or "")


def test_allow_entries_open_networks_and_ports() -> None:
    """EXECUTOR_NET_ALLOW entries allow a network on any port, or one port of a host."""
    assert rules("10.0.0.0/8").refusal(ipaddress.ip_address("10.9.9.9"), 5432) is None
    allowed = rules("127.0.0.1:8080")
    assert allowed.refusal(ipaddress.ip_address("127.0.0.1"), 8080) is None
    assert allowed.refusal(ipaddress.ip_address("127.0.0.1"), 8081) is not None


def test_a_host_name_entry_needs_the_name_resolved_for_the_run() -> None:
    """A name entry allows an address only together with a name that resolved to it."""
    named = rules("localhost:9999")
    loopback = ipaddress.ip_address("127.0.0.1")
    assert named.refusal(loopback, 9999) is not None
    assert named.refusal(loopback, 9999, {"localhost"}) is None


def test_the_network_off_refuses_everything() -> None:
    """With the network off even an allowed destination is refused."""
    off = rules("127.0.0.1:8080", enabled=False)
    assert "the network is off" in (off.refusal(ipaddress.ip_address("127.0.0.1"), 8080) or "")


# -- resolving ------------------------------------------------------------------------------------


def test_resolve_returns_only_the_addresses_the_run_may_reach() -> None:
    """localhost resolves to 127.0.0.1 and ::1; with only 127.0.0.1:PORT allowed, that one
    comes back, and the name is remembered for the run."""
    broker = Broker(rules("127.0.0.1:9999"))
    run = RunNetwork()
    answer = asyncio.run(broker.resolve(run, Resolve(host="localhost", port=9999), later()))
    assert isinstance(answer, Resolved)
    assert {entry.host for entry in answer.addresses} == {"127.0.0.1"}
    assert {entry.type for entry in answer.addresses} == {socket.SOCK_STREAM}
    assert "localhost" in run.names_of(ipaddress.ip_address("127.0.0.1"))


def test_resolve_refuses_a_name_with_only_refused_addresses() -> None:
    """With nothing allowed, resolving localhost is a refusal that says why."""
    answer = asyncio.run(
        Broker(rules()).resolve(RunNetwork(), Resolve(host="localhost", port=443), later())
    )
    assert isinstance(answer, NetRefused)
    assert "loopback address" in answer.message


def test_resolve_refuses_udp_and_an_offline_network() -> None:
    """No lookups for datagram sockets, and none at all with the network off."""
    udp = Resolve(host="localhost", port=53, type=socket.SOCK_DGRAM)
    answer = asyncio.run(Broker(rules("127.0.0.0/8")).resolve(RunNetwork(), udp, later()))
    assert isinstance(answer, NetRefused)
    off = Broker(rules(enabled=False))
    answer = asyncio.run(off.resolve(RunNetwork(), Resolve(host="localhost", port=80), later()))
    assert isinstance(answer, NetRefused)
    assert "the network is off" in answer.message


def test_resolve_reports_resolver_errors_as_such() -> None:
    """A resolver failure comes back as a resolver error (socket.gaierror in the run)."""
    request = Resolve(host="not-an-address", port=80, flags=socket.AI_NUMERICHOST)
    answer = asyncio.run(Broker(rules()).resolve(RunNetwork(), request, later()))
    assert isinstance(answer, NetFailed)
    assert answer.resolver
    assert answer.errno == socket.EAI_NONAME


# -- connecting -----------------------------------------------------------------------------------


def connect(broker: Broker, run: RunNetwork, host: str, port: int, family: int = 2) -> object:
    async def go() -> object:
        answer, sock = await broker.connect(
            run, Connect(host=host, port=port, family=family, timeout=5), later()
        )
        if sock is not None:
            peer = sock.getpeername()
            sock.sendall(b"via broker")
            sock.close()
            return answer, peer
        return answer

    return asyncio.run(go())


def test_connect_hands_back_a_socket_connected_to_the_allowed_destination(
    port_listener: Listener,
) -> None:
    """An allowed destination is connected by the broker; what is sent on it arrives."""
    broker = Broker(rules(f"127.0.0.1:{port_listener.port}"))
    answer, peer = connect(broker, RunNetwork(), "127.0.0.1", port_listener.port)  # type: ignore[misc]
    assert isinstance(answer, Connected)
    assert peer == ("127.0.0.1", port_listener.port)
    assert port_listener.take() == [b"via broker"]


def test_connect_refuses_before_any_connection_is_attempted(port_listener: Listener) -> None:
    """A refused destination is never connected: the listener is offered nothing."""
    answer = connect(Broker(rules()), RunNetwork(), "127.0.0.1", port_listener.port)
    assert isinstance(answer, NetRefused)
    assert f"127.0.0.1:{port_listener.port}" in answer.message
    assert port_listener.take() == []


def test_connect_by_name_uses_the_brokers_own_resolution(port_listener: Listener) -> None:
    """Connecting to ``localhost`` resolves it in the broker and connects an allowed address."""
    broker = Broker(rules(f"127.0.0.1:{port_listener.port}"))
    answer, peer = connect(broker, RunNetwork(), "localhost", port_listener.port)  # type: ignore[misc]
    assert isinstance(answer, Connected)
    assert peer[0] == "127.0.0.1"
    assert port_listener.take() == [b"via broker"]


def test_a_name_entry_allows_only_runs_that_resolved_the_name(port_listener: Listener) -> None:
    """With ``localhost:PORT`` allowed, a run connecting by name gets through; one that gives
    the address directly does not."""
    broker = Broker(rules(f"localhost:{port_listener.port}"))
    answer, _ = connect(broker, RunNetwork(), "localhost", port_listener.port)  # type: ignore[misc]
    assert isinstance(answer, Connected)
    assert port_listener.take() == [b"via broker"]
    direct = connect(broker, RunNetwork(), "127.0.0.1", port_listener.port)
    assert isinstance(direct, NetRefused)
    assert port_listener.take() == []


def test_connect_failures_come_back_with_their_errno() -> None:
    """An allowed port where nothing listens is ECONNREFUSED, as a plain connect would be."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    answer = connect(Broker(rules(f"127.0.0.1:{closed}")), RunNetwork(), "127.0.0.1", closed)
    assert isinstance(answer, NetFailed)
    assert answer.errno == errno.ECONNREFUSED
    assert not answer.resolver


def test_connect_needs_the_sockets_own_family(port_listener: Listener) -> None:
    """An IPv4 destination for an IPv6 socket fails instead of connecting another family."""
    broker = Broker(rules(f"127.0.0.1:{port_listener.port}"))
    answer = connect(broker, RunNetwork(), "127.0.0.1", port_listener.port, socket.AF_INET6)
    assert isinstance(answer, NetFailed)
    assert answer.errno == errno.EAFNOSUPPORT
    assert port_listener.take() == []


def test_a_run_has_a_bounded_number_of_requests() -> None:
    """Past MAX_REQUESTS every request of the run is refused."""
    broker = Broker(rules())
    run = RunNetwork(requests=MAX_REQUESTS)
    answer, sock = asyncio.run(broker.answer(run, Resolve(host="localhost", port=80), later()))
    assert sock is None
    assert isinstance(answer, NetRefused)
    assert str(MAX_REQUESTS) in answer.message
