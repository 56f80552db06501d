"""Signatures and job ids: the request and reply canonical strings, signing a request, checking
a reply, and the job id a key gives a request id.

The contract (docs/protocol.md, "Signed API key"): a request carries ``Pyexec-Key-Id``,
``Pyexec-Timestamp``, ``Pyexec-Nonce`` and ``Pyexec-Signature`` = HMAC-SHA256(secret,
``"v1\\n" + subject + "\\n" + timestamp + "\\n" + nonce + "\\n" + hex(SHA256(body))``); a reply
to it is signed with the same key over ``"v1-reply\\n" + request_subject + "\\n" +
request_nonce + "\\n" + timestamp + "\\n" + hex(SHA256(reply body))``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from typing import Final

KEY_ID_HEADER: Final = "Pyexec-Key-Id"
TIMESTAMP_HEADER: Final = "Pyexec-Timestamp"
NONCE_HEADER: Final = "Pyexec-Nonce"
SIGNATURE_HEADER: Final = "Pyexec-Signature"
SIGNATURE_HEADERS: Final = (KEY_ID_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)
REPLY_SIGNATURE_HEADERS: Final = (KEY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
# The JetStream message id of a job: its job id, so that a retried submission is one job.
MSG_ID: Final = "Nats-Msg-Id"
# Seconds a request's timestamp may be from the executor's clock.
WINDOW_SECONDS: Final = 60

TIMESTAMP: Final = re.compile(r"^[0-9]{1,12}$")
NONCE: Final = re.compile(r"^(?:[0-9a-f]{2}){16,64}$")
SIGNATURE: Final = re.compile(r"^[0-9a-f]{64}$")
KEY_ID: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def canonical(subject: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """The bytes that are signed: version, subject, timestamp, nonce and the body's SHA-256."""
    digest = hashlib.sha256(body).hexdigest()
    return f"v1\n{subject}\n{timestamp}\n{nonce}\n{digest}".encode()


def signature(secret: bytes, subject: str, timestamp: str, nonce: str, body: bytes) -> str:
    return hmac.new(secret, canonical(subject, timestamp, nonce, body), hashlib.sha256).hexdigest()


def reply_canonical(request_subject: str, request_nonce: str, timestamp: str, body: bytes) -> bytes:
    """The bytes a reply's signature covers: it names the request it answers (its subject and
    nonce), the time it was signed and the reply body's SHA-256."""
    digest = hashlib.sha256(body).hexdigest()
    return f"v1-reply\n{request_subject}\n{request_nonce}\n{timestamp}\n{digest}".encode()


def reply_signature(
    secret: bytes, request_subject: str, request_nonce: str, timestamp: str, body: bytes
) -> str:
    message = reply_canonical(request_subject, request_nonce, timestamp, body)
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(
    key_id: str,
    secret: bytes,
    subject: str,
    body: bytes,
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The four signature headers for ``body`` published to ``subject``."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    nonce = secrets.token_hex(16) if nonce is None else nonce
    return {
        KEY_ID_HEADER: key_id,
        TIMESTAMP_HEADER: stamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: signature(secret, subject, stamp, nonce, body),
    }


def sign_reply(
    key_id: str,
    secret: bytes,
    request_subject: str,
    request_nonce: str,
    body: bytes,
    *,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The three headers that sign ``body`` as the answer to the request named."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {
        KEY_ID_HEADER: key_id,
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: reply_signature(secret, request_subject, request_nonce, stamp, body),
    }


def verify_reply(
    secret: bytes,
    key_id: str,
    headers: Mapping[str, str] | None,
    body: bytes,
    *,
    request_subject: str,
    request_nonce: str,
) -> bool:
    """Whether a reply (or completion) is signed by ``key_id``'s secret for the request sent on
    ``request_subject`` with ``request_nonce``."""
    found = {name.lower(): value for name, value in (headers or {}).items()}
    given_key = found.get(KEY_ID_HEADER.lower())
    stamp = found.get(TIMESTAMP_HEADER.lower(), "")
    given = found.get(SIGNATURE_HEADER.lower(), "")
    if given_key != key_id or not TIMESTAMP.fullmatch(stamp) or not SIGNATURE.fullmatch(given):
        return False
    expected = reply_signature(secret, request_subject, request_nonce, stamp, body)
    return hmac.compare_digest(expected, given)


def job_id_for(secret: bytes, request_id: str) -> str:
    """The contract's job id: the first 32 hex digits of HMAC-SHA256(secret, "v1-job\\n" +
    request_id). Per key, and unguessable without the key's secret."""
    mac = hmac.new(secret, b"v1-job\n" + request_id.encode(), hashlib.sha256)
    return mac.hexdigest()[:32]
