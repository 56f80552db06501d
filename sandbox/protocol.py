"""Messages between the pool, the warm parent and the children, and how they are framed.

Control messages (pool <-> warm parent) travel over a SOCK_SEQPACKET socket, one message per
packet, with file descriptors attached where noted. A run's request and result travel over a
stream socket as frames: a 4-byte big-endian length, then that many bytes of JSON. Everything is
decoded by typed msgspec decoders with a size cap; nothing is ever unpickled.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Annotated, Any, Literal

import msgspec

from sandbox.api import ErrorInfo, Status
from sandbox.config import PoolConfig
from sandbox.errors import ProtocolError
from sandbox.isolation import LayerStatus

_HEADER = struct.Struct(">I")
CONTROL_PACKET_MAX = 128 * 1024


# -- pool <-> warm parent -------------------------------------------------------------------------


class Start(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="start"):
    """Pool to warm parent, first message: the settings every child runs with."""

    config: PoolConfig
    tier: Literal["stdlib", "full"] = "full"
    """Which modules the parent imports before it forks (see ``sandbox.tiers``)."""


class Spawn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="spawn"):
    """Pool to warm parent: fork this many more waiting children."""

    count: int


class Started(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="started"):
    """Warm parent to pool: libraries are imported and children can be forked."""

    pid: int
    preload_ms: float
    failed_imports: list[str]
    layers: list[LayerStatus]
    scratch_root: str
    code_format: str
    """What compiled code must match to run here (see ``compiler.code_format``)."""
    timings: dict[str, float]
    """Milliseconds of one-time work (import, warm-up) and of each step a child takes."""
    huge_pages_mb: float = 0.0
    """The parent's memory in huge pages once it is ready (shared with every child)."""


class Ready(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="ready"):
    """Warm parent to pool: a child waits; attached are its socket and its pidfd."""

    pid: int
    folder: str
    """The name of its scratch folder under the pool's scratch root."""


class Exited(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="exited"):
    """Warm parent to pool: a child was reaped. ``returncode`` is negative for a signal."""

    pid: int
    returncode: int


ToParent = Start | Spawn
FromParent = Started | Ready | Exited

_control_encoder = msgspec.json.Encoder()
_to_parent = msgspec.json.Decoder(ToParent)
_from_parent = msgspec.json.Decoder(FromParent)


def encode_control(message: ToParent | FromParent) -> bytes:
    return _control_encoder.encode(message)


def decode_to_parent(data: bytes) -> ToParent:
    try:
        message: ToParent = _to_parent.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad control message: {exc}") from None
    return message


def decode_from_parent(data: bytes) -> FromParent:
    try:
        message: FromParent = _from_parent.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad control message: {exc}") from None
    return message


# -- pool <-> child --------------------------------------------------------------------------------
#
# The child's stream socket carries, from the pool: the run request, then the broker's answers;
# from the child: broker requests (resolve a name, connect), then the result. A connected socket
# travels with its ``Connected`` answer as SCM_RIGHTS.


class _Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind"):
    """A message on a child's socket, tagged by its ``kind``."""


class RunRequest(_Message, frozen=True, tag="run"):
    """Pool to child: the one script this child runs."""

    source: str
    ctx: dict[str, Any]
    timeout: float
    code: bytes | None = None
    """The script compiled under the policy by the pool (marshal), when the pool has it."""
    progress: bool = False
    """The run is a job: its ``progress()`` reports go to the pool (else nowhere)."""


class ChildReady(_Message, frozen=True, tag="ready"):
    """Child to pool, first: isolated, its scratch folder made, waiting for its run."""


class Resolve(_Message, frozen=True, tag="resolve"):
    """Child to pool: resolve a host name (``socket.getaddrinfo``) through the broker."""

    host: Annotated[str, msgspec.Meta(max_length=1024)]
    port: int | None
    family: int = 0
    type: int = 0
    proto: int = 0
    flags: int = 0


class Connect(_Message, frozen=True, tag="connect"):
    """Child to pool: connect a TCP socket to ``host:port`` through the broker."""

    host: Annotated[str, msgspec.Meta(max_length=1024)]
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)]
    family: int
    timeout: float | None = None


class Address(msgspec.Struct, frozen=True, array_like=True):
    """One ``getaddrinfo`` entry; ``flowinfo`` and ``scope_id`` are IPv6's."""

    family: int
    type: int
    proto: int
    canonname: str
    host: str
    port: int
    flowinfo: int = 0
    scope_id: int = 0


class Resolved(_Message, frozen=True, tag="resolved"):
    """Pool to child: the addresses a name resolved to that the run may connect to."""

    addresses: list[Address]


class Connected(_Message, frozen=True, tag="connected"):
    """Pool to child: the connected socket is attached to this message."""


class NetRefused(_Message, frozen=True, tag="refused"):
    """Pool to child: the network rules refuse the request (a policy violation)."""

    message: str


class NetFailed(_Message, frozen=True, tag="failed"):
    """Pool to child: the request was allowed but failed (``errno``, or a resolver error)."""

    errno: int
    message: str
    resolver: bool = False
    """A ``socket.gaierror`` (``errno`` is then an EAI_* code), not an OSError."""


class Progress(_Message, frozen=True, tag="progress"):
    """Child to pool: the script's latest ``progress()`` report."""

    fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None
    message: Annotated[str, msgspec.Meta(max_length=200)]


class RunResult(_Message, frozen=True, tag="result"):
    """Child to pool: how the run ended. ``result`` is plain JSON already."""

    status: Status
    result: Any = None
    error: ErrorInfo | None = None
    stdout: str = ""
    run_ms: float = 0.0
    compiled: bool = False
    """The source compiled under the policy (so the pool may compile and keep it)."""


ToChild = RunRequest | Resolved | Connected | NetRefused | NetFailed
FromChild = ChildReady | Resolve | Connect | Progress | RunResult
BrokerAnswer = Resolved | Connected | NetRefused | NetFailed

_run_encoder = msgspec.json.Encoder()
_to_child = msgspec.json.Decoder(ToChild)
_from_child = msgspec.json.Decoder(FromChild)


def frame(message: ToChild | FromChild) -> bytes:
    """A length-prefixed frame holding one message."""
    body = _run_encoder.encode(message)
    return _HEADER.pack(len(body)) + body


def frame_length(header: bytes, limit: int) -> int:
    """The body length a frame header announces, refused above ``limit``."""
    (length,) = _HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes is over the {limit}-byte limit")
    return int(length)


HEADER_SIZE = _HEADER.size


def decode_to_child(body: bytes) -> ToChild:
    try:
        message: ToChild = _to_child.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad message to the child: {exc}") from None
    return message


def decode_from_child(body: bytes) -> FromChild:
    try:
        message: FromChild = _from_child.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad message from the child: {exc}") from None
    return message


def recv_exactly(sock: socket.socket, size: int, fds: list[int] | None = None) -> bytes:
    """Blocking read of exactly ``size`` bytes (the child's side); file descriptors that come
    with them are appended to ``fds`` (or closed when it is None)."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk, received, _flags, _addr = socket.recv_fds(sock, size - len(chunks), 4)
        for fd in received:
            if fds is None:
                os.close(fd)
            else:
                fds.append(fd)
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        chunks += chunk
    return bytes(chunks)


def recv_message(sock: socket.socket, limit: int, fds: list[int] | None = None) -> ToChild:
    """Blocking read of one message from the pool (the child's side)."""
    length = frame_length(recv_exactly(sock, HEADER_SIZE, fds), limit)
    return decode_to_child(recv_exactly(sock, length, fds))


def recv_request(sock: socket.socket, limit: int) -> RunRequest:
    """Blocking read of the run request (the child's side)."""
    message = recv_message(sock, limit)
    if not isinstance(message, RunRequest):
        raise ProtocolError(f"expected a run request, got {type(message).__name__}")
    return message
