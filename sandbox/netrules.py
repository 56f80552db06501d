"""The network rules: which resolved address and TCP port a run may be connected to.

Pure decisions, no sockets: the broker (``sandbox.broker``) applies them to the address it
actually connects to, after resolving any name itself. Loopback, link-local (cloud metadata),
private, shared, multicast, reserved and unspecified addresses and the executor's own
addresses are refused unless configuration allows them (``EXECUTOR_NET_ALLOW``), and so is any
port not configured for public addresses (``EXECUTOR_NET_PORTS``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_SHARED = ipaddress.ip_network("100.64.0.0/10")


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
        return Allowed(network=None, host=normal_name(host), port=port)


def normal_name(name: str) -> str:
    """A host name as the rules compare it: lower case, without a trailing dot."""
    return name.lower().rstrip(".")


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


def special(address: IPAddress) -> str | None:
    """Why ``address`` is not an ordinary public one, or None if it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or _nat64(address)
        if embedded is not None:
            return special(embedded)
    site_local = isinstance(address, ipaddress.IPv6Address) and address.is_site_local
    checks = (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("site-local", site_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("shared (carrier-grade NAT)", address in _SHARED),
        ("private", address.is_private),
    )
    return next((name for name, hit in checks if hit), None)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _show(address: IPAddress) -> str:
    """An address as messages show it; an IPv4-mapped one with its IPv4 part written out."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def _nat64(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class NetworkRules:
    """The rules every run of one pool follows."""

    enabled: bool
    ports: frozenset[int]
    allowed: tuple[Allowed, ...]
    own: frozenset[IPAddress]

    def refusal(self, address: IPAddress, port: int, names: Iterable[str] = ()) -> str | None:
        """Why a connection to ``address:port`` is refused, or None if it is allowed.

        ``names`` are the host names that the run resolved (through the broker) to this
        address; they count for host-name entries of the allow list.
        """
        shown = f"[{_show(address)}]:{port}" if address.version == 6 else f"{address}:{port}"
        if not self.enabled:
            return f"network access to {shown} (the network is off)"
        if any(rule.matches(address, port, names) for rule in self.allowed):
            return None
        if port not in self.ports:
            return f"network access to {shown} (port {port} is not allowed)"
        if address in self.own:
            return f"network access to {shown} (this executor's own host)"
        reason = special(address)
        if reason is not None:
            return f"network access to {shown} ({reason} address)"
        return None

    def address_refusal(self, address: IPAddress, names: Iterable[str] = ()) -> str | None:
        """Why no connection to ``address`` would be allowed on any port, or None."""
        shown = _show(address)
        if not self.enabled:
            return f"network access to {shown} (the network is off)"
        if any(rule.matches(address, rule.port or 0, names) for rule in self.allowed):
            return None
        if address in self.own:
            return f"network access to {shown} (this executor's own host)"
        reason = special(address)
        if reason is not None:
            return f"network access to {shown} ({reason} address)"
        return None

    def name_allowed(self, name: str) -> bool:
        """Whether an allow-list entry names this host (it may then resolve to any address)."""
        wanted = normal_name(name)
        return any(rule.host == wanted for rule in self.allowed)
