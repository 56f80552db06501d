"""The network layer inside a run: which addresses and ports a script's libraries may reach.

Installed in the child before the script's code exists, below anything a script can touch:
the methods of ``socket.socket`` that connect or send, and the resolver. Every outbound
address is checked before a packet leaves: loopback, link-local (cloud metadata), private,
shared, multicast and reserved ranges and the executor's own addresses are refused unless
configuration allows them (``EXECUTOR_NET_ALLOW``), and so is any port not configured.
Landlock's TCP rules enforce the ports again in the kernel where it has them.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Allowed:
    """One ``EXECUTOR_NET_ALLOW`` entry: a network or a host name, with an optional port."""

    network: IPNetwork | None
    host: str | None
    port: int | None

    def matches(self, address: IPAddress, port: int, names: Iterable[str]) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address in self.network
        return self.host is not None and self.host in names


def parse_allow(entry: str) -> Allowed:
    """``10.0.0.0/8``, ``192.168.1.5``, ``[::1]:8080``, ``127.0.0.1:8765``, ``example.com:443``."""
    text = entry.strip()
    port: int | None = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host = text
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port out of range in '{entry}'")
    try:
        return Allowed(network=ipaddress.ip_network(host, strict=False), host=None, port=port)
    except ValueError:
        if not host or any(ch in host for ch in "/ "):
            raise ValueError(f"'{entry}' is neither a network nor a host name") from None
        return Allowed(network=None, host=host.lower().rstrip("."), port=port)


def local_addresses() -> frozenset[IPAddress]:
    """The addresses of this host's interfaces (read where /proc shows them)."""
    found: set[IPAddress] = set()
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as trie:
            previous = ""
            for line in trie:
                if "/32 host LOCAL" in line and previous:
                    found.add(ipaddress.ip_address(previous))
                parts = line.split()
                if len(parts) >= 2 and parts[0] in ("|--", "+--"):
                    previous = parts[1].split("/")[0]
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as table:
            for line in table:
                raw = line.split()[0]
                found.add(ipaddress.ip_address(":".join(raw[i : i + 4] for i in range(0, 32, 4))))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)


def _special(address: IPAddress) -> str | None:
    """Why ``address`` is not an ordinary public one, or None if it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _special(address.ipv4_mapped)
    checks = (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("private", address.is_private),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("reserved", address.is_reserved),
        ("shared (carrier-grade NAT)", address in ipaddress.ip_network("100.64.0.0/10")),
    )
    return next((name for name, hit in checks if hit), None)


@dataclass
class NetworkPolicy:
    """The rules for one run, and the host names its resolver calls produced."""

    enabled: bool
    ports: frozenset[int]
    allowed: tuple[Allowed, ...]
    own: frozenset[IPAddress]
    refuse: Callable[[str], NoReturn]
    resolved: dict[IPAddress, set[str]] = field(default_factory=dict)

    def check(self, host: str, port: int) -> None:
        """Refuse a connection to ``host:port`` (``host`` an address) that the rules forbid."""
        if not self.enabled:
            self.refuse(f"network access to {host}:{port} (the network is off)")
        try:
            address = ipaddress.ip_address(host.split("%", maxsplit=1)[0])
        except ValueError:
            self.refuse(f"network access to '{host}' (not an IP address)")
        names = self.resolved.get(address, set())
        if any(rule.matches(address, port, names) for rule in self.allowed):
            return
        if port not in self.ports:
            self.refuse(f"network access to {address}:{port} (port {port} is not allowed)")
        if address in self.own:
            self.refuse(f"network access to {address}:{port} (this executor's own host)")
        reason = _special(address)
        if reason is not None:
            self.refuse(f"network access to {address}:{port} ({reason} address)")

    def remember(self, name: str, results: list[Any]) -> None:
        for family, _type, _proto, _canon, sockaddr in results:
            if family in (socket.AF_INET, socket.AF_INET6):
                address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
                self.resolved.setdefault(address, set()).add(name.lower().rstrip("."))


def install(policy: NetworkPolicy) -> None:
    """Wrap the resolver and the connecting and sending methods of Python sockets."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_sendto = socket.socket.sendto
    real_sendmsg = socket.socket.sendmsg

    def checked(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            policy.check(str(address[0]), int(address[1]))
        elif sock.family == socket.AF_UNIX:
            policy.refuse("connecting to a UNIX socket")

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if not policy.enabled:
            policy.refuse(f"resolving '{host}' (the network is off)")
        results: list[Any] = real_getaddrinfo(host, port, *args, **kwargs)
        if isinstance(host, str | bytes):
            name = host.decode() if isinstance(host, bytes) else host
            policy.remember(name, results)
        return results

    def connect(sock: socket.socket, address: Any) -> None:
        checked(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        checked(sock, address)
        return real_connect_ex(sock, address)

    def sendto(sock: socket.socket, data: Any, *args: Any) -> int:
        checked(sock, args[-1])
        return real_sendto(sock, data, *args)

    def sendmsg(sock: socket.socket, buffers: Any, *args: Any) -> int:
        if len(args) >= 3 and args[2] is not None:
            checked(sock, args[2])
        return real_sendmsg(sock, buffers, *args)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    socket.socket.sendto = sendto  # type: ignore[method-assign,assignment]
    socket.socket.sendmsg = sendmsg  # type: ignore[method-assign,assignment]
