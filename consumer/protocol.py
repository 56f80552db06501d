"""The wire contract's messages (request and reply bodies) and their JSON/MessagePack codecs."""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final, Literal

import msgspec

from consumer.errors import InvalidRequest

Encoding = Literal["json", "msgpack"]
JSON: Final = "json"
MSGPACK: Final = "msgpack"
MSGPACK_CONTENT_TYPE = "application/msgpack"
JSON_CONTENT_TYPES = frozenset({"", "application/json"})

Status = Literal["ok", "error", "timeout", "rejected", "accepted", "cancelled"]
Mode = Literal["sync", "async"]
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Timeout = Annotated[float, msgspec.Meta(gt=0)]
# No upper bound here: a name no script has, however long, is 'unknown_script'.
ScriptName = Annotated[str, msgspec.Meta(min_length=1)]


# A file name in a run's folder: in/<alias>, out/<name>.
FILE_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"
MAX_FILES = 100


class FileRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One input file of a request: an object of ``PYEXEC_FILES`` and its SHA-256 (hex)."""

    object: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}$")]


# Aliases and object names are checked by consumer.files, with messages naming the alias.
Files = Annotated[dict[str, FileRef], msgspec.Meta(max_length=MAX_FILES)]


class CodeRequest(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, omit_defaults=True
):
    """Body of ``pyexec.code``: run the source sent."""

    code: str
    ctx: dict[str, Any] | None = None
    timeout: Timeout | None = None
    mode: Mode | None = None
    request_id: RequestId | None = None
    files: Files | None = None


class NamedRequest(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, omit_defaults=True
):
    """Body of ``pyexec.named``: run an installed script by name."""

    name: ScriptName
    ctx: dict[str, Any] | None = None
    timeout: Timeout | None = None
    mode: Mode | None = None
    request_id: RequestId | None = None
    files: Files | None = None


Request = CodeRequest | NamedRequest


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """The ``error`` object of a reply."""

    code: str
    type: str
    message: str
    traceback: str | None = None


class OutFile(msgspec.Struct, frozen=True, kw_only=True):
    """A file the script left in ``out/``, as stored in ``PYEXEC_FILES``."""

    name: str
    object: str
    bytes: int
    sha256: str


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """The reply body. Unknown fields are tolerated when decoding, for later additions.
    ``files`` is left out (UNSET) unless the request sent files or the script wrote some."""

    request_id: str
    job_id: str | None = None
    status: Status
    result: Any = None
    error: ErrorBody | None = None
    stdout: str = ""
    duration_ms: float = 0.0
    files: list[OutFile] | msgspec.UnsetType = msgspec.UNSET


JobState = Literal["queued", "running", "done", "cancelled", "unknown"]
JobId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class JobRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Body of ``<prefix>.job.status``: which job."""

    job_id: JobId


class JobStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Reply of ``<prefix>.job.status``: where the job is, and its completion once it has one."""

    job_id: str
    state: JobState
    progress: Any = None
    completion: Any = None


class JobCancel(msgspec.Struct, frozen=True, kw_only=True):
    """Reply of ``<prefix>.job.cancel``: the state the job is in after the cancel."""

    job_id: str
    state: JobState


class Progress(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A job's progress event, as published on ``<prefix>.progress.<job_id>`` (with
    ``job_id``) and kept as the last one in its status (without)."""

    fraction: float | None
    message: str
    at: str
    job_id: str | None = None


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
_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_reply_decoders: dict[str, Any] = {
    JSON: msgspec.json.Decoder(Reply),
    MSGPACK: msgspec.msgpack.Decoder(Reply),
}
_job_ref_decoders: dict[str, Any] = {
    JSON: msgspec.json.Decoder(JobRef),
    MSGPACK: msgspec.msgpack.Decoder(JobRef),
}
_status_decoders: dict[str, Any] = {
    JSON: msgspec.json.Decoder(JobStatus),
    MSGPACK: msgspec.msgpack.Decoder(JobStatus),
}
_cancel_decoders: dict[str, Any] = {
    JSON: msgspec.json.Decoder(JobCancel),
    MSGPACK: msgspec.msgpack.Decoder(JobCancel),
}


def reply_encoding(content_type: str | None) -> Encoding:
    """The encoding a reply uses: MessagePack if the request said so, JSON otherwise."""
    value = (content_type or "").split(";")[0].strip().lower()
    return MSGPACK if value == MSGPACK_CONTENT_TYPE else JSON


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


def decode_status(body: bytes, encoding: Encoding = JSON) -> JobStatus:
    status: JobStatus = _status_decoders[encoding].decode(body)
    return status


def decode_cancel(body: bytes, encoding: Encoding = JSON) -> JobCancel:
    answer: JobCancel = _cancel_decoders[encoding].decode(body)
    return answer


_progress_decoder = msgspec.json.Decoder(Progress)


def decode_progress(body: bytes) -> Progress:
    """A progress event (always JSON)."""
    event: Progress = _progress_decoder.decode(body)
    return event


def decode_any(body: bytes, encoding: Encoding) -> Any:
    """A stored body (a completion) as plain values, for embedding in another reply."""
    if encoding == MSGPACK:
        return msgspec.msgpack.decode(body)
    return msgspec.json.decode(body)


def encode(
    message: Reply | Request | JobStatus | JobCancel | JobRef | Progress, encoding: Encoding
) -> bytes:
    if encoding == MSGPACK:
        return _msgpack_encoder.encode(message)
    return _json_encoder.encode(message)


def decode_reply(body: bytes, encoding: Encoding = JSON) -> Reply:
    reply: Reply = _reply_decoders[encoding].decode(body)
    return reply


FILES_BUCKET = "PYEXEC_FILES"


def stream_name(base: str, prefix: str) -> str:
    """``PYEXEC_JOBS`` for the default prefix; otherwise the prefix is appended with every
    character that is not a letter or digit made ``_``: ``PYEXEC_JOBS_STAGING`` for
    ``staging``, ``PYEXEC_JOBS_STAGING_PYEXEC`` for ``staging.pyexec``. Buckets likewise."""
    if prefix == "pyexec":
        return base
    return f"{base}_{re.sub(r'[^A-Za-z0-9]', '_', prefix).upper()}"


def hex_digest(digest: str | None) -> str:
    """An object store digest (``SHA-256=<base64url>``) as lowercase hex; "" if it is none."""
    if not digest or not digest.upper().startswith("SHA-256="):
        return ""
    try:
        return base64.urlsafe_b64decode(digest[len("SHA-256=") :]).hex()
    except ValueError:
        return ""


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A header's value, its name matched without regard to case."""
    if not headers:
        return None
    if name in headers:
        return headers[name]
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)
