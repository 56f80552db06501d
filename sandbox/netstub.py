"""The network inside a run: library sockets ask the broker, over the run's channel, instead of
the kernel.

Installed in the child before the script's code exists. ``socket.getaddrinfo`` (and the
``gethostbyname`` family) and ``socket.socket.connect``/``connect_ex`` become requests to the
broker (``sandbox.broker``), which resolves and connects outside the sandbox and sends back the
connected socket; it is then ``dup2``-ed onto the socket the library made, so ``requests``,
``urllib3`` and ``httpx`` work unchanged. None of this is a security boundary by itself: a
script that goes around it meets seccomp, which refuses every network system call a run could
make on its own, and Landlock. What this layer adds is that allowed connections work and
refused ones end the run with a policy violation that says why.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import operator
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from sandbox.errors import ProtocolError
from sandbox.protocol import (
    BrokerAnswer,
    Connect,
    Connected,
    NetFailed,
    NetRefused,
    Resolve,
    Resolved,
    frame,
    recv_message,
)

Refuse = Callable[[str], NoReturn]
ANSWER_LIMIT = 1024 * 1024
_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# Options libraries set before connecting; the connected socket gets them again.
_OPTIONS = (
    (socket.IPPROTO_TCP, socket.TCP_NODELAY),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
)


class Channel:
    """The child's end of its socket to the pool: one request and its answer at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def ask(self, request: Resolve | Connect) -> tuple[BrokerAnswer, list[int]]:
        """Send ``request`` to the broker; its answer and the descriptors that came with it."""
        fds: list[int] = []
        with self._lock:
            self.sock.sendall(frame(request))
            answer = recv_message(self.sock, ANSWER_LIMIT, fds)
        if isinstance(answer, Resolved | Connected | NetRefused | NetFailed):
            return answer, fds
        for fd in fds:
            os.close(fd)
        raise ProtocolError(f"unexpected {type(answer).__name__} from the broker")

    def tell(self, data: bytes) -> None:
        """Send one frame that wants no answer."""
        with self._lock:
            self.sock.sendall(data)

    def try_tell(self, data: bytes) -> bool:
        """Send one frame unless the socket is in use (a signal handler must not wait for a
        lock its own thread may hold); False if it was."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self.sock.sendall(data)
        finally:
            self._lock.release()
        return True


def _text(value: Any, what: str) -> str:
    """A host as an exact ``str`` (a subclass of str or bytes is copied, never asked)."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("ascii")
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


def _numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _port(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str | bytes):
        text = _text(value, "port")
        if text.isdigit():
            return int(text)
        return socket.getservbyname(text, "tcp")
    return operator.index(value)


def _failure(answer: NetFailed) -> OSError:
    if answer.resolver:
        return socket.gaierror(answer.errno, answer.message)
    if answer.errno == errno.ETIMEDOUT:
        return TimeoutError("timed out")
    return OSError(answer.errno, answer.message)


class BrokeredSockets:
    """The resolver and the connect of this process, answered by the broker."""

    def __init__(self, channel: Channel, refuse: Refuse) -> None:
        self.channel = channel
        self.refuse = refuse
        self.real_getaddrinfo = socket.getaddrinfo
        self.real_getnameinfo = socket.getnameinfo

    def getaddrinfo(  # noqa: PLR0917 - the signature of socket.getaddrinfo
        self, host: Any, port: Any, family: int = 0, type: int = 0,  # noqa: A002
        proto: int = 0, flags: int = 0,
    ) -> list[Any]:  # fmt: skip
        if host is None:
            return self.real_getaddrinfo(None, port, family, type, proto, flags)
        name = _text(host, "host")
        if _numeric(name):
            # An address needs no resolver; this never leaves the process.
            flags |= socket.AI_NUMERICHOST
            return self.real_getaddrinfo(name, port, family, type, proto, flags)
        request = Resolve(host=name, port=_port(port), family=int(family), type=int(type),
                          proto=int(proto), flags=int(flags))  # fmt: skip
        answer = self._answer(request)
        if not isinstance(answer, Resolved):
            raise ProtocolError("unexpected answer to a resolve request")
        results = []
        for entry in answer.addresses:
            sockaddr: tuple[Any, ...] = (entry.host, entry.port)
            if entry.family == socket.AF_INET6:
                sockaddr = (entry.host, entry.port, entry.flowinfo, entry.scope_id)
            results.append(
                (socket.AddressFamily(entry.family), socket.SocketKind(entry.type), entry.proto,
                 entry.canonname, sockaddr)
            )  # fmt: skip
        return results

    def getnameinfo(self, sockaddr: Any, flags: int) -> tuple[str, str]:
        numeric = flags | socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
        return self.real_getnameinfo(sockaddr, numeric)

    def connect(self, sock: socket.socket, address: Any) -> None:
        if sock.family not in _FAMILIES or sock.type != socket.SOCK_STREAM:
            self.refuse(f"connecting a {sock.family.name} {sock.type.name} socket (only TCP "
                        "over IPv4 or IPv6 is available)")  # fmt: skip
        if not isinstance(address, tuple) or len(address) < 2:
            raise TypeError(f"{sock.family.name} address must be a tuple (host, port)")
        host, port = _text(address[0], "host"), operator.index(address[1])
        request = Connect(host=host, port=port, family=int(sock.family), timeout=sock.gettimeout())
        fds: list[int] = []
        answer = self._answer(request, fds)
        if not isinstance(answer, Connected) or not fds:
            raise ProtocolError("unexpected answer to a connect request")
        received, *extra = fds
        for fd in extra:
            os.close(fd)
        options = _read_options(sock)
        timeout = sock.gettimeout()
        try:
            os.dup2(received, sock.fileno(), inheritable=False)
        finally:
            os.close(received)
        sock.settimeout(timeout)  # the received description's blocking mode, set again
        _write_options(sock, options)

    def _answer(self, request: Resolve | Connect, fds: list[int] | None = None) -> BrokerAnswer:
        """The broker's answer; a refusal or a failure is raised as the run would see it."""
        answer, received = self.channel.ask(request)
        if fds is None:
            for fd in received:
                os.close(fd)
        else:
            fds.extend(received)
        if isinstance(answer, NetRefused | NetFailed):
            for fd in fds or ():
                os.close(fd)
            if isinstance(answer, NetRefused):
                self.refuse(answer.message)
            raise _failure(answer)
        return answer


def install(channel: Channel, refuse: Refuse) -> None:
    """Route the resolver and TCP connections of this process through the broker."""
    stub = BrokeredSockets(channel, refuse)

    def gethostbyname(name: Any) -> str:
        entries = stub.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
        return str(entries[0][4][0])

    def gethostbyname_ex(name: Any) -> tuple[str, list[str], list[str]]:
        entries = stub.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
        return _text(name, "host"), [], sorted({str(entry[4][0]) for entry in entries})

    def gethostbyaddr(_address: Any) -> NoReturn:
        raise socket.herror(1, "reverse name lookups are not available in the sandbox")

    def connect(sock: socket.socket, address: Any) -> None:
        stub.connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        try:
            stub.connect(sock, address)
        except OSError as exc:
            return exc.errno or errno.ETIMEDOUT
        return 0

    def bind(_sock: socket.socket, _address: Any) -> NoReturn:
        refuse("binding a socket (a run can only connect out, through the network rules)")

    def listen(_sock: socket.socket, *_backlog: Any) -> NoReturn:
        refuse("listening on a socket (a run can only connect out)")

    socket.getaddrinfo = stub.getaddrinfo
    socket.getnameinfo = stub.getnameinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex
    socket.gethostbyaddr = gethostbyaddr
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    socket.socket.bind = bind  # type: ignore[method-assign,assignment]
    socket.socket.listen = listen  # type: ignore[method-assign,assignment]


def _read_options(sock: socket.socket) -> list[tuple[int, int, int]]:
    found = []
    for level, option in _OPTIONS:
        with contextlib.suppress(OSError):
            found.append((level, option, sock.getsockopt(level, option)))
    return found


def _write_options(sock: socket.socket, options: list[tuple[int, int, int]]) -> None:
    for level, option, value in options:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, value)
