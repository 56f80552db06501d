"""The executor's side of the wire contract: decoding and bound-checking request bodies.

The messages themselves (request, reply, completion, status, progress, files) and their encoders
are defined once, in the client package (:mod:`pyexec_client.messages`), and re-exported here:
the executor and its callers speak with the same Structs.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable
from typing import Any

import msgspec
from pyexec_client.messages import (
    FILE_NAME,
    FILES_BUCKET,
    JSON,
    JSON_CONTENT_TYPES,
    MSGPACK,
    MSGPACK_CONTENT_TYPE,
    CodeRequest,
    Completion,
    Encoding,
    ErrorBody,
    FileRef,
    JobCancel,
    JobRef,
    JobState,
    JobStatus,
    NamedRequest,
    OutFile,
    Progress,
    Reply,
    Request,
    Status,
    decode_cancel,
    decode_completion,
    decode_progress,
    decode_reply,
    decode_status,
    encode,
    header,
    hex_digest,
    reply_encoding,
    stream_name,
)

from consumer.errors import InvalidRequest

__all__ = [
    "FILES_BUCKET",
    "FILE_NAME",
    "JSON",
    "MSGPACK",
    "MSGPACK_CONTENT_TYPE",
    "CodeRequest",
    "Completion",
    "Encoding",
    "ErrorBody",
    "FileRef",
    "JobCancel",
    "JobRef",
    "JobState",
    "JobStatus",
    "NamedRequest",
    "OutFile",
    "Progress",
    "Reply",
    "Request",
    "Status",
    "check_ctx",
    "decode_any",
    "decode_cancel",
    "decode_completion",
    "decode_job_ref",
    "decode_progress",
    "decode_reply",
    "decode_request",
    "decode_status",
    "encode",
    "encoding_of",
    "header",
    "hex_digest",
    "reply_encoding",
    "request_id_of",
    "stream_name",
]


class _RequestIdOnly(msgspec.Struct):
    """Used to echo the request id of a body that failed validation, where it has one."""

    request_id: Any = None


_decoders: dict[tuple[str, str], Any] = {
    ("code", JSON): msgspec.json.Decoder(CodeRequest),
    ("named", JSON): msgspec.json.Decoder(NamedRequest),
    ("code", MSGPACK): msgspec.msgpack.Decoder(CodeRequest),
    ("named", MSGPACK): msgspec.msgpack.Decoder(NamedRequest),
}
_id_decoders: dict[str, Any] = {
    JSON: msgspec.json.Decoder(_RequestIdOnly),
    MSGPACK: msgspec.msgpack.Decoder(_RequestIdOnly),
}
_job_ref_decoders: dict[str, Any] = {
    JSON: msgspec.json.Decoder(JobRef),
    MSGPACK: msgspec.msgpack.Decoder(JobRef),
}


def encoding_of(content_type: str | None) -> Encoding:
    """The body encoding a ``Content-Type`` header names."""
    value = (content_type or "").split(";")[0].strip().lower()
    if value == MSGPACK_CONTENT_TYPE:
        return MSGPACK
    if value in JSON_CONTENT_TYPES:
        return JSON
    raise InvalidRequest(
        f"unsupported Content-Type '{content_type}': use application/json or application/msgpack"
    )


def decode_request(
    kind: str, body: bytes, encoding: Encoding, *, max_bytes: int, max_depth: int
) -> Request:
    """Decode and bound-check a request body, raising :class:`InvalidRequest`."""
    if len(body) > max_bytes:
        raise InvalidRequest(f"the body is {len(body)} bytes, over the limit of {max_bytes}")
    try:
        request: Request = _decoders[kind, encoding].decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid request: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        name = "JSON" if encoding == JSON else "MessagePack"
        raise InvalidRequest(f"the body is not valid {name}: {exc}") from None
    except RecursionError:
        raise InvalidRequest(f"ctx is nested deeper than {max_depth} levels") from None
    if request.ctx is not None:
        check_ctx(request.ctx, max_depth)
    return request


_SCALARS = (str, int, float, bool, type(None))


def check_ctx(ctx: dict[str, Any], max_depth: int) -> None:
    """Make ``ctx`` what a JSON caller would have sent, in place, or refuse it.

    The one rule for MessagePack ``ctx``: binary values become base64 strings (standard
    alphabet, padded) and MessagePack timestamps ISO-8601 strings (``isoformat()``, UTC offset
    ``+00:00``); any other extension type, a map key that is not a string, and nesting deeper
    than ``max_depth`` levels (ctx itself is level 1) are ``invalid_request``. A JSON body can
    hold none of these, so for JSON this only checks the depth.
    """
    stack: list[tuple[Any, int]] = [(ctx, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                raise InvalidRequest("ctx holds an object key that is not a string")
            slots: Iterable[tuple[Any, Any]] = item.items()
        elif isinstance(item, list):
            slots = enumerate(item)
        else:
            continue
        if depth > max_depth:
            raise InvalidRequest(f"ctx is nested deeper than {max_depth} levels")
        for slot, value in list(slots):
            if isinstance(value, _SCALARS):
                continue
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1))
            elif isinstance(value, bytes):
                item[slot] = base64.b64encode(value).decode("ascii")
            elif isinstance(value, dt.datetime):
                item[slot] = value.isoformat()
            else:
                name = "extension type" if isinstance(value, msgspec.msgpack.Ext) else "value"
                raise InvalidRequest(
                    f"ctx holds a MessagePack {name} ({type(value).__name__}) with no JSON form"
                )


def request_id_of(body: bytes, encoding: Encoding) -> str | None:
    """The ``request_id`` of a body that failed validation, if it carries a usable one."""
    try:
        value = _id_decoders[encoding].decode(body).request_id
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, TypeError):
        return None
    if isinstance(value, str) and 0 < len(value) <= 200:
        return value
    return None


def decode_job_ref(body: bytes, encoding: Encoding) -> JobRef:
    """Decode a ``{"job_id": ...}`` body, raising :class:`InvalidRequest`."""
    try:
        ref: JobRef = _job_ref_decoders[encoding].decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid request: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        name = "JSON" if encoding == JSON else "MessagePack"
        raise InvalidRequest(f"the body is not valid {name}: {exc}") from None
    return ref


def decode_any(body: bytes, encoding: Encoding) -> Any:
    """A stored body (a completion) as plain values, for embedding in another reply."""
    if encoding == MSGPACK:
        return msgspec.msgpack.decode(body)
    return msgspec.json.decode(body)
