"""pyexec-client: call the pyexec execution service from a backend.

``async with Client.connect(url, key_id, secret) as client:
reply = await client.execute_code(source, {"x": 1})``

Needs only nats-py and msgspec. The wire messages (:mod:`pyexec_client.messages`), signing and
job ids (:mod:`pyexec_client.signing`) are the same the executor uses.
"""

from __future__ import annotations

from pyexec_client.client import Client, Connecting, ProgressEvents
from pyexec_client.errors import (
    BadReply,
    ClientError,
    ConnectError,
    NoReplica,
    Refused,
    Timeout,
)
from pyexec_client.messages import (
    CodeRequest,
    Completion,
    ErrorBody,
    FileRef,
    JobCancel,
    JobStatus,
    NamedRequest,
    OutFile,
    Progress,
    Reply,
)
from pyexec_client.signing import job_id_for

__all__ = [
    "BadReply",
    "Client",
    "ClientError",
    "CodeRequest",
    "Completion",
    "ConnectError",
    "Connecting",
    "ErrorBody",
    "FileRef",
    "JobCancel",
    "JobStatus",
    "NamedRequest",
    "NoReplica",
    "OutFile",
    "Progress",
    "ProgressEvents",
    "Refused",
    "Reply",
    "Timeout",
    "job_id_for",
]
