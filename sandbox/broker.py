"""The network broker: resolves names and connects TCP sockets for runs, outside the sandbox.

A run has no network system calls of its own: seccomp refuses ``connect``, ``bind``, ``listen``,
``accept``, addressed sends and every socket but a TCP one, and Landlock refuses TCP connect and
bind again where the kernel has TCP rules. What a run's libraries do with ``socket.getaddrinfo``
and ``socket.socket.connect`` is sent to the broker over the run's channel instead. The broker
lives in the pool's process: it resolves the name itself, applies the network rules to every
address it would connect to, connects, and the pool hands the connected socket to the run
(SCM_RIGHTS). Whatever a run asks for, the address that is connected is one the broker chose
and checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import time
from dataclasses import dataclass, field

from sandbox.netrules import IPAddress, NetworkRules, normal_name
from sandbox.protocol import (
    Address,
    BrokerAnswer,
    Connect,
    Connected,
    NetFailed,
    NetRefused,
    Resolve,
    Resolved,
)

RESOLVE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 30.0
MAX_ADDRESSES = 32
MAX_REQUESTS = 10_000
# getaddrinfo flags a run may pass on; anything else is dropped.
_FLAGS = (
    socket.AI_CANONNAME | socket.AI_NUMERICHOST | socket.AI_NUMERICSERV | socket.AI_ADDRCONFIG
    | socket.AI_V4MAPPED | socket.AI_ALL
)  # fmt: skip
_FAMILIES = (socket.AF_INET, socket.AF_INET6)


@dataclass
class RunNetwork:
    """What the broker remembers of one run: the names it resolved for it, and its requests."""

    names: dict[IPAddress, set[str]] = field(default_factory=dict)
    requests: int = 0

    def names_of(self, address: IPAddress) -> set[str]:
        return self.names.get(address, set())


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _shown(host: str) -> str:
    """A host as a message shows it: printable and short."""
    text = "".join(ch if ch.isprintable() else "?" for ch in host[:100])
    return text + ("..." if len(host) > 100 else "")


class Broker:
    """Answers the resolve and connect requests of runs under one pool's network rules."""

    def __init__(
        self,
        rules: NetworkRules,
        *,
        resolve_timeout: float = RESOLVE_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.rules = rules
        self.resolve_timeout = resolve_timeout
        self.connect_timeout = connect_timeout

    async def answer(
        self, run: RunNetwork, request: Resolve | Connect, deadline: float
    ) -> tuple[BrokerAnswer, socket.socket | None]:
        """The answer to one request, and the connected socket that goes with a ``Connected``
        (the caller sends it and closes it). ``deadline`` is the run's, on the monotonic clock."""
        run.requests += 1
        if run.requests > MAX_REQUESTS:
            return NetRefused(message=f"more than {MAX_REQUESTS} network requests in one run"), None
        if isinstance(request, Resolve):
            return await self.resolve(run, request, deadline), None
        return await self.connect(run, request, deadline)

    # -- resolving ----------------------------------------------------------------------------

    async def resolve(self, run: RunNetwork, request: Resolve, deadline: float) -> BrokerAnswer:
        host = request.host
        if not self.rules.enabled:
            return NetRefused(message=f"resolving '{_shown(host)}' (the network is off)")
        if request.type not in (0, socket.SOCK_STREAM):
            return NetRefused(message="resolving for a socket other than TCP (no UDP or raw)")
        found = await self._lookup(
            run, host, request.port, family=request.family, flags=request.flags, deadline=deadline
        )
        if isinstance(found, NetFailed):
            return found
        allowed, refusal = self._allowed(run, found, request.port)
        if not allowed:
            return NetRefused(message=refusal or f"resolving '{_shown(host)}' (no address)")
        return Resolved(addresses=allowed)

    async def _lookup(
        self,
        run: RunNetwork,
        host: str,
        port: int | None,
        *,
        family: int,
        flags: int,
        deadline: float,
    ) -> list[Address] | NetFailed:
        """The TCP addresses ``host`` resolves to here; the names are remembered for the run."""
        if family not in (0, *_FAMILIES):
            return NetFailed(errno=socket.EAI_FAMILY, message="address family not supported",
                             resolver=True)  # fmt: skip
        loop = asyncio.get_running_loop()
        wait = max(min(self.resolve_timeout, deadline - time.monotonic()), 0.01)
        try:
            async with asyncio.timeout(wait):
                results = await loop.getaddrinfo(
                    host, port, family=family, type=socket.SOCK_STREAM,
                    proto=socket.IPPROTO_TCP, flags=flags & _FLAGS,
                )  # fmt: skip
        except socket.gaierror as exc:
            return NetFailed(errno=exc.errno or socket.EAI_FAIL, message=str(exc.strerror),
                             resolver=True)  # fmt: skip
        except (TimeoutError, UnicodeError, OSError, ValueError) as exc:
            text = "the name did not resolve in time" if isinstance(exc, TimeoutError) else str(exc)
            return NetFailed(errno=socket.EAI_AGAIN, message=text, resolver=True)
        name = normal_name(host)
        addresses: list[Address] = []
        for found_family, kind, proto, canonname, sockaddr in results[:MAX_ADDRESSES]:
            if found_family not in _FAMILIES:
                continue
            address = _address(str(sockaddr[0]))
            if address is None:
                continue
            run.names.setdefault(address, set()).add(name)
            extra = tuple(sockaddr[2:4]) if found_family == socket.AF_INET6 else (0, 0)
            addresses.append(
                Address(int(found_family), int(kind), proto, canonname, str(sockaddr[0]),
                        int(sockaddr[1]), int(extra[0]), int(extra[1]))
            )  # fmt: skip
        return addresses

    def _allowed(
        self, run: RunNetwork, addresses: list[Address], port: int | None
    ) -> tuple[list[Address], str | None]:
        """The addresses the run may connect to (on ``port``, or on any port it may use) and,
        when there are none, why the first one is refused."""
        allowed: list[Address] = []
        first_refusal: str | None = None
        for entry in addresses:
            address = _address(entry.host)
            assert address is not None
            names = run.names_of(address)
            if port:
                refusal = self.rules.refusal(address, port, names)
            else:
                refusal = self.rules.address_refusal(address, names)
            if refusal is None:
                allowed.append(entry)
            elif first_refusal is None:
                first_refusal = refusal
        return allowed, first_refusal

    # -- connecting ---------------------------------------------------------------------------

    async def connect(
        self, run: RunNetwork, request: Connect, deadline: float
    ) -> tuple[BrokerAnswer, socket.socket | None]:
        host, port = request.host, request.port
        if request.family not in _FAMILIES:
            return NetRefused(message="connecting a socket other than TCP over IPv4 or IPv6"), None
        literal = _address(host)
        if not self.rules.enabled:
            return NetRefused(message=f"network access to {_shown(host)}:{port} "
                              "(the network is off)"), None  # fmt: skip
        if literal is not None:
            family = socket.AF_INET if literal.version == 4 else socket.AF_INET6
            targets = [Address(family, socket.SOCK_STREAM, 0, "", host, port)]
        else:
            found = await self._lookup(
                run, host, port, family=request.family, flags=0, deadline=deadline
            )
            if isinstance(found, NetFailed):
                return found, None
            targets = found
        failed: NetFailed | None = None
        refused: NetRefused | None = None
        for target in targets:
            address = _address(target.host)
            assert address is not None
            refusal = self.rules.refusal(address, port, run.names_of(address))
            if refusal is not None:
                refused = refused or NetRefused(message=refusal)
                continue
            if target.family != request.family:
                failed = NetFailed(errno=errno.EAFNOSUPPORT, message="address family mismatch")
                continue
            wait = min(request.timeout or self.connect_timeout, self.connect_timeout)
            wait = max(min(wait, deadline - time.monotonic()), 0.01)
            outcome = await self._dial(target, port, wait)
            if isinstance(outcome, socket.socket):
                return Connected(), outcome
            failed = outcome
        # A refusal is the answer only when nothing allowed was even tried.
        answer = failed or refused or NetFailed(errno=errno.EHOSTUNREACH, message="no address")
        return answer, None

    @staticmethod
    async def _dial(target: Address, port: int, wait: float) -> socket.socket | NetFailed:
        loop = asyncio.get_running_loop()
        sock = socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        if target.family == socket.AF_INET6:
            sockaddr: tuple[object, ...] = (target.host, port, target.flowinfo, target.scope_id)
        else:
            sockaddr = (target.host, port)
        try:
            async with asyncio.timeout(wait):
                await loop.sock_connect(sock, sockaddr)
        except TimeoutError:
            sock.close()
            return NetFailed(errno=errno.ETIMEDOUT, message="timed out")
        except OSError as exc:
            sock.close()
            code = exc.errno or errno.EIO
            return NetFailed(errno=code, message=os.strerror(code))
        except BaseException:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        return sock
