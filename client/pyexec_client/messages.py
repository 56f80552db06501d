"""The wire contract's messages: request, reply, completion, job status, progress and file
bodies, with their JSON and MessagePack codecs.

These Structs are the one definition of the protocol: the executor decodes and encodes with them,
this package's client does, and the JSON Schemas under ``docs/schema/`` are generated from them
(:mod:`pyexec_client.schema`). Replies are decoded leniently (unknown fields are ignored, for
later additions); requests are strict (an unknown field is ``invalid_request``).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

import msgspec

Encoding = Literal["json", "msgpack"]
JSON: Final = "json"
MSGPACK: Final = "msgpack"
MSGPACK_CONTENT_TYPE: Final = "application/msgpack"
JSON_CONTENT_TYPES: Final = frozenset({"", "application/json"})

Status = Literal["ok", "error", "timeout", "rejected", "accepted", "cancelled"]
CompletionStatus = Literal["ok", "error", "timeout", "rejected", "cancelled"]
Mode = Literal["sync", "async"]
JobState = Literal["queued", "running", "done", "cancelled", "unknown"]

# The contract's error codes, by the status that carries them. ErrorBody.code stays a string on
# the wire so that a caller built today still decodes a code added later.
ERROR_CODES: Final = {
    "error": (
        "policy_violation",
        "syntax_error",
        "script_error",
        "memory_limit",
        "output_limit",
        "disk_limit",
        "result_not_serializable",
        "worker_lost",
    ),
    "timeout": ("timeout",),
    "rejected": ("unauthorized", "invalid_request", "unknown_script", "overloaded", "conflict"),
    "cancelled": ("cancelled",),
}

RequestId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=200,
        description="The caller's id for the request, echoed in the reply; the job id of an "
        "async request follows from it and the key.",
    ),
]
Timeout = Annotated[
    float,
    msgspec.Meta(
        gt=0,
        description="Seconds the script may run (default 30), capped by the executor "
        "(EXECUTOR_MAX_TIMEOUT for sync, EXECUTOR_MAX_JOB_TIMEOUT for async): over the cap "
        "is invalid_request.",
    ),
]
# No upper bound here: a name no script has, however long, is 'unknown_script'.
ScriptName = Annotated[
    str,
    msgspec.Meta(min_length=1, description="An installed script's name (text.lemmatize_ru)."),
]
Context = Annotated[
    dict[str, Any],
    msgspec.Meta(
        description="The script's input, given to execute(ctx); a JSON object, size and nesting "
        "bounded by the executor."
    ),
]
JobId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=64,
        description='The first 32 lowercase hex digits of HMAC-SHA256(secret, "v1-job\\n" + '
        "request_id).",
    ),
]

# A file name in a run's folder: in/<alias>, out/<name>.
FILE_NAME: Final = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"
MAX_FILES: Final = 100
FILES_BUCKET: Final = "PYEXEC_FILES"


class FileRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One input file of a request: an object of the PYEXEC_FILES object store, named
    ``<key id>/...``, and its SHA-256."""

    object: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=1024,
            description="The object's name; it starts with the caller's key id and '/'.",
        ),
    ]
    sha256: Annotated[
        str,
        msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}$", description="The object's SHA-256, hex."),
    ]


# Aliases and object names are checked by the executor, with messages naming the alias.
Files = Annotated[
    dict[str, FileRef],
    msgspec.Meta(
        max_length=MAX_FILES,
        description="Input files by alias (a plain file name): the script reads in/<alias>.",
    ),
]


class CodeRequest(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, omit_defaults=True
):
    """Body of ``<prefix>.code`` and ``<prefix>.jobs.code``: run the source sent, which defines
    ``execute(ctx)``."""

    code: Annotated[str, msgspec.Meta(description="Python source that defines execute(ctx).")]
    ctx: Context | None = None
    timeout: Timeout | None = None
    mode: Mode | None = None
    request_id: RequestId | None = None
    files: Files | None = None


class NamedRequest(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, omit_defaults=True
):
    """Body of ``<prefix>.named`` and ``<prefix>.jobs.named``: run an installed script."""

    name: ScriptName
    ctx: Context | None = None
    timeout: Timeout | None = None
    mode: Mode | None = None
    request_id: RequestId | None = None
    files: Files | None = None


Request = CodeRequest | NamedRequest


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """The ``error`` object of a reply."""

    code: Annotated[
        str,
        msgspec.Meta(
            description="The contract's error code: "
            + "; ".join(f"{status}: {', '.join(codes)}" for status, codes in ERROR_CODES.items())
        ),
    ]
    type: Annotated[str, msgspec.Meta(description="The exception's class name, where one is.")]
    message: str
    traceback: Annotated[
        str | None,
        msgspec.Meta(description="The script's own frames only (lines of <script>)."),
    ] = None


class OutFile(msgspec.Struct, frozen=True, kw_only=True):
    """A file the script left in ``out/``, stored in the PYEXEC_FILES object store as
    ``<key id>/<job_id or request_id>/<name>``."""

    name: str
    object: str
    bytes: int
    sha256: str


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """The reply to ``<prefix>.code`` / ``<prefix>.named``. ``files`` is absent unless the
    request sent files or the script wrote some."""

    request_id: str
    job_id: Annotated[
        str | None, msgspec.Meta(description="Set when the request was an async job.")
    ] = None
    status: Status
    result: Annotated[Any, msgspec.Meta(description="execute(ctx)'s value, as JSON.")] = None
    error: ErrorBody | None = None
    stdout: Annotated[
        str, msgspec.Meta(description="What the script printed, cut at a limit (marked).")
    ] = ""
    duration_ms: float = 0.0
    files: list[OutFile] | msgspec.UnsetType = msgspec.UNSET


class Completion(Reply, frozen=True, kw_only=True):
    """An async job's one completion, on ``<prefix>.results.<job_id>``: a reply that names its
    job and whose status is final (never ``accepted``)."""

    job_id: str  # required here, optional in a reply
    status: CompletionStatus  # a completion is never "accepted"


class JobRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Body of ``<prefix>.job.status`` and ``<prefix>.job.cancel``: which job."""

    job_id: JobId


class Progress(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A job's progress event, as published on ``<prefix>.progress.<job_id>`` (with
    ``job_id``) and kept as the last one in its status (without)."""

    fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] | None
    message: Annotated[str, msgspec.Meta(max_length=200)]
    at: Annotated[str, msgspec.Meta(description="ISO-8601 time the script reported it.")]
    job_id: str | None = None


class JobStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Reply of ``<prefix>.job.status``: where the job is, and its completion once it has one.
    Another key's job is ``unknown``, exactly like an id that never existed."""

    job_id: str
    state: JobState
    progress: Annotated[
        Progress | None, msgspec.Meta(description="The last progress event, if any.")
    ] = None
    completion: Annotated[
        Completion | None,
        msgspec.Meta(description="The job's completion once it is done or cancelled."),
    ] = None


class JobCancel(msgspec.Struct, frozen=True, kw_only=True):
    """Reply of ``<prefix>.job.cancel``: the state the job is in after the cancel."""

    job_id: str
    state: JobState


Message = Request | Reply | JobStatus | JobCancel | JobRef | Progress

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def _decoders(kind: type[Any]) -> dict[str, Any]:
    return {JSON: msgspec.json.Decoder(kind), MSGPACK: msgspec.msgpack.Decoder(kind)}


_reply_decoders = _decoders(Reply)
_completion_decoders = _decoders(Completion)
_status_decoders = _decoders(JobStatus)
_cancel_decoders = _decoders(JobCancel)
_progress_decoder = msgspec.json.Decoder(Progress)


def encode(message: Message, encoding: Encoding) -> bytes:
    if encoding == MSGPACK:
        return _msgpack_encoder.encode(message)
    return _json_encoder.encode(message)


def reply_encoding(content_type: str | None) -> Encoding:
    """The encoding a reply uses: MessagePack if the request said so, JSON otherwise."""
    value = (content_type or "").split(";")[0].strip().lower()
    return MSGPACK if value == MSGPACK_CONTENT_TYPE else JSON


def decode_reply(body: bytes, encoding: Encoding = JSON) -> Reply:
    reply: Reply = _reply_decoders[encoding].decode(body)
    return reply


def decode_completion(body: bytes, encoding: Encoding = JSON) -> Completion:
    completion: Completion = _completion_decoders[encoding].decode(body)
    return completion


def decode_status(body: bytes, encoding: Encoding = JSON) -> JobStatus:
    status: JobStatus = _status_decoders[encoding].decode(body)
    return status


def decode_cancel(body: bytes, encoding: Encoding = JSON) -> JobCancel:
    answer: JobCancel = _cancel_decoders[encoding].decode(body)
    return answer


def decode_progress(body: bytes) -> Progress:
    """A progress event (always JSON)."""
    event: Progress = _progress_decoder.decode(body)
    return event


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
