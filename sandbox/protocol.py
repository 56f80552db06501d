"""Messages between the pool, the warm parent and the children, and how they are framed.

Control messages (pool <-> warm parent) travel over a SOCK_SEQPACKET socket, one message per
packet, with file descriptors attached where noted. A run's request and result travel over a
stream socket as frames: a 4-byte big-endian length, then that many bytes of JSON. Everything is
decoded by typed msgspec decoders with a size cap; nothing is ever unpickled.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

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
    timings: dict[str, float]
    """Milliseconds of one-time work (import, warm-up) and of each step a child takes."""


class Ready(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="ready"):
    """Warm parent to pool: a child waits; attached are its socket and its pidfd."""

    pid: int


class Exited(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="exited"):
    """Warm parent to pool: a child was reaped. ``returncode`` is negative for a signal."""

    pid: int
    returncode: int


class Learn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="learn"):
    """Pool to warm parent: a script that compiled in a child; compile and keep it."""

    source: str


ToParent = Start | Spawn | Learn
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


class RunRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Pool to child: the one script this child runs."""

    source: str
    ctx: dict[str, Any]
    timeout: float


class RunResult(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Child to pool: how the run ended. ``result`` is plain JSON already."""

    status: Status
    result: Any = None
    error: ErrorInfo | None = None
    stdout: str = ""
    run_ms: float = 0.0
    compiled: bool = False
    """The source compiled under the policy (so the warm parent may learn it)."""


_run_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(RunRequest)
_result_decoder = msgspec.json.Decoder(RunResult)


def frame(message: RunRequest | RunResult) -> bytes:
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


def decode_request(body: bytes) -> RunRequest:
    try:
        return _request_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad run request: {exc}") from None


def decode_result(body: bytes) -> RunResult:
    try:
        return _result_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad run result: {exc}") from None


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Blocking read of exactly ``size`` bytes (the child's side)."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        chunks += chunk
    return bytes(chunks)


def recv_request(sock: socket.socket, limit: int) -> RunRequest:
    """Blocking read of one run request (the child's side)."""
    length = frame_length(recv_exactly(sock, HEADER_SIZE), limit)
    return decode_request(recv_exactly(sock, length))
