"""A small async Python client for the backend: sign a request, send it, get a typed reply.

Every reply and completion is checked against the request it answers: it must be signed with
the client's own key for that request's subject and nonce (``v1-reply``), or the client raises
:class:`~pyexec_client.errors.BadReply`. The one exception is a refusal of the request's own
signature (``rejected`` / ``unauthorized``), which the executor cannot sign. Job ids are computed
here, before a job is submitted, with the contract's formula. Failures are raised as the
exceptions of :mod:`pyexec_client.errors`, grouped by what the caller does about them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import os
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Mapping
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.object_store import ObjectStore

from pyexec_client import messages as protocol
from pyexec_client.errors import (
    BadReply,
    ClientError,
    ConnectError,
    NoReplica,
    Refused,
    Timeout,
    from_nats,
)
from pyexec_client.messages import Completion, Encoding, Reply
from pyexec_client.objects import ObjectMismatch, read_object, write_object
from pyexec_client.signing import MSG_ID, NONCE_HEADER, job_id_for, sign, verify_reply
from pyexec_client.urls import redact, without_credentials

# Seconds the client waits past the script's own timeout for the reply to arrive.
REPLY_MARGIN = 5.0
DEFAULT_TIMEOUT = 30.0


async def _quiet(_exc: Exception) -> None:
    """Connection errors surface as exceptions from ``connect``; nothing to log twice."""


class Client:
    """Calls ``<prefix>.code`` and ``<prefix>.named`` with a signed API key.

    ``async with Client.connect(url, key_id, secret) as client:
    reply = await client.execute_code(source, {"x": 1})``
    """

    def __init__(
        self,
        nc: NatsClient,
        key_id: str,
        secret: str | bytes,
        *,
        prefix: str = "pyexec",
        encoding: Encoding = protocol.JSON,
        owns_connection: bool = False,
    ) -> None:
        self.nc = nc
        self.key_id = key_id
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self.prefix = prefix
        self.encoding: Encoding = encoding
        self._owns_connection = owns_connection
        # job id -> (subject, nonce) of every request sent for it: its completion is signed for
        # the one that stored it, which may be any of them (a retry after a lost reply).
        self._jobs: dict[str, list[tuple[str, str]]] = {}
        self._files: ObjectStore | None = None
        self._files_bucket = ""

    @classmethod
    def connect(
        cls,
        servers: str | list[str],
        key_id: str,
        secret: str | bytes,
        *,
        nats_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Connecting:
        """Open a connection of the client's own; closed with the client. Either form works:
        ``async with Client.connect(url, key_id, secret) as client:`` or
        ``client = await Client.connect(url, key_id, secret)`` (then ``await client.close()``).

        ``options`` go to the client (``prefix``, ``encoding``); ``nats_options`` to
        ``nats.connect`` (for example ``{"allow_reconnect": True}``, or credentials: by default
        a dropped connection is not re-established, so that a call fails at once with
        :class:`ConnectError` instead of waiting)."""
        return Connecting(
            functools.partial(cls._open, servers, key_id, secret, dict(nats_options or {}), options)
        )

    @classmethod
    async def _open(
        cls,
        servers: str | list[str],
        key_id: str,
        secret: str | bytes,
        nats_options: dict[str, Any],
        options: dict[str, Any],
    ) -> Client:
        settings: dict[str, Any] = {
            "connect_timeout": 5,
            "max_reconnect_attempts": 3,
            "allow_reconnect": False,
            "error_cb": _quiet,
        }
        settings.update(nats_options)
        try:
            nc = await nats.connect(servers=servers, **settings)
        except (OSError, TimeoutError, NatsError) as exc:
            listed = servers if isinstance(servers, str) else ",".join(servers)
            shown, why = without_credentials(listed), redact(exc, servers)
            raise ConnectError(f"cannot connect to NATS at {shown}: {why}") from None
        return cls(nc, key_id, secret, owns_connection=True, **options)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_connection and not self.nc.is_closed:
            await self.nc.close()

    def __repr__(self) -> str:
        return f"Client(key_id={self.key_id!r}, prefix={self.prefix!r})"

    def sign(self, subject: str, body: bytes) -> dict[str, str]:
        """The signature headers for ``body`` on ``subject``."""
        return sign(self.key_id, self._secret, subject, body)

    def job_id(self, request_id: str) -> str:
        """The job id the executor gives ``request_id`` under this client's key."""
        return job_id_for(self._secret, request_id)

    def check(
        self, reply: Reply, headers: dict[str, str] | None, body: bytes, subject: str, nonce: str
    ) -> Reply:
        """``reply`` if it is signed by this client's key for the request sent on ``subject``
        with ``nonce``; raises :class:`BadReply` otherwise."""
        if verify_reply(
            self._secret,
            self.key_id,
            headers,
            body,
            request_subject=subject,
            request_nonce=nonce,
        ):
            return reply
        error = reply.error
        if reply.status == "rejected" and error is not None and error.code == "unauthorized":
            return reply  # the executor could not verify the request, so it cannot sign
        raise BadReply(
            f"the answer to the request on '{subject}' is not signed with this client's key "
            "for that request; it was not sent by the executor"
        )

    async def execute_code(
        self,
        code: str,
        ctx: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        files: Mapping[str, protocol.FileRef] | None = None,
    ) -> Reply:
        """Run ``code`` (which defines ``execute(ctx)``) and return the reply. ``files`` maps
        aliases to objects put with :meth:`put_file`: the script reads them at ``in/<alias>``."""
        request = protocol.CodeRequest(
            code=code, ctx=ctx, timeout=timeout, request_id=request_id, files=_files(files)
        )
        return await self.send(f"{self.prefix}.code", request, timeout)

    async def execute_named(
        self,
        name: str,
        ctx: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        files: Mapping[str, protocol.FileRef] | None = None,
    ) -> Reply:
        """Run the installed script ``name`` and return the reply."""
        request = protocol.NamedRequest(
            name=name, ctx=ctx, timeout=timeout, request_id=request_id, files=_files(files)
        )
        return await self.send(f"{self.prefix}.named", request, timeout)

    async def submit_code(
        self,
        code: str,
        ctx: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        files: Mapping[str, protocol.FileRef] | None = None,
    ) -> str:
        """Store a job in the jobs stream (JetStream); return its job id."""
        request = protocol.CodeRequest(
            code=code,
            ctx=ctx,
            timeout=timeout,
            mode="async",
            request_id=request_id or str(uuid.uuid4()),
            files=_files(files),
        )
        return await self.submit(request)

    async def submit_named(
        self,
        name: str,
        ctx: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        files: Mapping[str, protocol.FileRef] | None = None,
    ) -> str:
        """Store a job that runs the installed script ``name``; return its job id."""
        request = protocol.NamedRequest(
            name=name,
            ctx=ctx,
            timeout=timeout,
            mode="async",
            request_id=request_id or str(uuid.uuid4()),
            files=_files(files),
        )
        return await self.submit(request)

    async def submit(self, request: protocol.Request, *, subject: str | None = None) -> str:
        """Sign and publish a job straight into the jobs stream (``<prefix>.jobs.code`` or
        ``.jobs.named`` by the request's kind, unless ``subject`` says otherwise); the PubAck
        is the receipt. The job id follows from the key and the request id (one is made when
        the request has none), so a retry is the same job. Returns the job id."""
        if subject is None:
            kind = "code" if isinstance(request, protocol.CodeRequest) else "named"
            subject = f"{self.prefix}.jobs.{kind}"
        if request.request_id is None:
            request = msgspec.structs.replace(request, request_id=str(uuid.uuid4()))
        assert request.request_id is not None
        job_id = self.job_id(request.request_id)
        body = protocol.encode(request, self.encoding)
        headers = self.sign(subject, body)
        headers[MSG_ID] = job_id
        if self.encoding == protocol.MSGPACK:
            headers["Content-Type"] = protocol.MSGPACK_CONTENT_TYPE
        tried_before = job_id in self._jobs
        # Noted before publishing: a publish whose acknowledgement is lost may still store it.
        self._sent(job_id, subject, headers[NONCE_HEADER])
        try:
            ack = await self.nc.jetstream().publish(subject, body, headers=headers, timeout=5)
        except (NatsError, TimeoutError) as exc:
            raise from_nats(exc, "the job could not be stored") from None
        if ack.duplicate and not tried_before:
            # The stream holds another message under this job id (inside its duplicate
            # window), and not one this client stored: this job was not stored.
            raise Refused(
                f"job id {job_id} is held in the jobs stream by a message this client did not "
                "store; the job was not stored (use a new request_id)"
            )
        return job_id

    def _sent(self, job_id: str, subject: str, nonce: str) -> None:
        self._jobs.setdefault(job_id, []).append((subject, nonce))

    async def wait(self, job_id: str, timeout: float = DEFAULT_TIMEOUT) -> Completion:
        """The completion of ``job_id`` from the results stream, waiting up to ``timeout``.

        The completion is the first message on the job's results subject whose body names the
        job and, for a job this client submitted, that is signed with this client's key for
        one of the requests that stored it; anything else found there is skipped. For a job
        submitted elsewhere (its requests' nonces unknown here) the signature cannot be
        checked: the first message naming the job is returned."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        js = self.nc.jetstream()
        subscription = await js.subscribe(f"{self.prefix}.results.{job_id}", ordered_consumer=True)
        skipped = 0
        try:
            while True:
                try:
                    msg = await subscription.next_msg(timeout=max(deadline - loop.time(), 0.001))
                except NatsTimeout:
                    note = (
                        f" ({skipped} message(s) there were not its completion)" if skipped else ""
                    )
                    raise Timeout(
                        f"no completion for job {job_id} within {timeout:g} s{note}"
                    ) from None
                reply = self._completion(job_id, msg.data, msg.headers)
                if reply is not None:
                    return reply
                skipped += 1
        finally:
            await subscription.unsubscribe()

    def _completion(
        self, job_id: str, data: bytes, headers: dict[str, str] | None
    ) -> Completion | None:
        """The completion of ``job_id`` in ``data``, or None if it is not that (another job's
        body, a receipt (a completion is never ``accepted``), undecodable, or not signed for a
        request of this client that stored the job)."""
        encoding = protocol.reply_encoding((headers or {}).get("Content-Type"))
        try:
            completion = protocol.decode_completion(data, encoding)
        except msgspec.DecodeError:
            return None
        if completion.job_id != job_id:
            return None
        return completion if self._from_job(job_id, headers, data) else None

    def _from_job(self, job_id: str, headers: dict[str, str] | None, data: bytes) -> bool:
        """Whether ``data`` is signed for one of the requests this client sent that stored
        ``job_id`` (true when it sent none: a job submitted elsewhere cannot be checked)."""
        sent = self._jobs.get(job_id)
        return not sent or any(
            verify_reply(
                self._secret,
                self.key_id,
                headers,
                data,
                request_subject=subject,
                request_nonce=nonce,
            )
            for subject, nonce in sent
        )

    async def completions(self, durable: str) -> AsyncIterator[Completion]:
        """Every completion, once each, through a durable consumer named by the caller; a
        message that is not the completion of the job its subject names (see :meth:`wait`) is
        acknowledged and skipped."""
        js = self.nc.jetstream()
        subscription = await js.pull_subscribe(f"{self.prefix}.results.>", durable=durable)
        while True:
            try:
                messages = await subscription.fetch(10, timeout=5)
            except NatsTimeout:
                continue
            for msg in messages:
                reply = self._completion(msg.subject.rsplit(".", 1)[-1], msg.data, msg.headers)
                await msg.ack()
                if reply is not None:
                    yield reply

    async def status(self, job_id: str, timeout: float = 10.0) -> protocol.JobStatus:
        """Where the job is (``queued``, ``running``, ``done``, ``cancelled``; ``unknown`` for an
        id this key has no job under), its last progress event, and its completion once final,
        answered by any replica and checked against this request's signature. A refusal raises
        :class:`Refused`."""
        data, encoding = await self._lifecycle("status", job_id, timeout)
        try:
            return protocol.decode_status(data, encoding)
        except msgspec.DecodeError as exc:
            raise BadReply(f"the status answer could not be decoded: {exc}") from None

    async def cancel(self, job_id: str, timeout: float = 10.0) -> protocol.JobCancel:
        """Cancel the job: a queued one never runs, a running one is stopped. The answer is
        the state it is in now (``cancelled``; ``done`` if it had finished; ``unknown``)."""
        data, encoding = await self._lifecycle("cancel", job_id, timeout)
        try:
            return protocol.decode_cancel(data, encoding)
        except msgspec.DecodeError as exc:
            raise BadReply(f"the cancel answer could not be decoded: {exc}") from None

    async def _lifecycle(self, action: str, job_id: str, timeout: float) -> tuple[bytes, Encoding]:
        """Send ``<prefix>.job.<action>`` for ``job_id``; the checked answer's body."""
        subject = f"{self.prefix}.job.{action}"
        body = protocol.encode(protocol.JobRef(job_id=job_id), self.encoding)
        headers = self.sign(subject, body)
        if self.encoding == protocol.MSGPACK:
            headers["Content-Type"] = protocol.MSGPACK_CONTENT_TYPE
        msg = await self._request(subject, body, headers, timeout)
        encoding = protocol.reply_encoding((msg.headers or {}).get("Content-Type"))
        if not verify_reply(
            self._secret,
            self.key_id,
            msg.headers,
            msg.data,
            request_subject=subject,
            request_nonce=headers[NONCE_HEADER],
        ):
            refusal = _decode(msg.data, (msg.headers or {}).get("Content-Type"))
            error = refusal.error
            if refusal.status == "rejected" and error is not None and error.code == "unauthorized":
                raise Refused(f"the {action} request was refused: {error.message}")
            raise BadReply(
                f"the answer to the {action} request is not signed with this client's key "
                "for that request; it was not sent by the executor"
            )
        try:
            refusal = protocol.decode_reply(msg.data, encoding)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return msg.data, encoding
        message = refusal.error.message if refusal.error else refusal.status
        raise Refused(f"the {action} request was refused: {message}")

    def progress(self, job_id: str) -> ProgressEvents:
        """The job's progress events as they are published (core NATS, best effort):
        ``async with client.progress(job_id) as events: async for event in events: ...``.
        Subscribed on entering, so enter before submitting the job. Only events signed for a
        request of this client that stored the job are given (with none known yet, every
        well-formed event naming the job)."""
        return ProgressEvents(self, job_id)

    def _progress_event(
        self, job_id: str, data: bytes, headers: dict[str, str] | None
    ) -> protocol.Progress | None:
        try:
            event = protocol.decode_progress(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if event.job_id != job_id:
            return None
        return event if self._from_job(job_id, headers, data) else None

    async def put_file(
        self, data: bytes | str | os.PathLike[str], name: str | None = None
    ) -> protocol.FileRef:
        """Put a file (bytes, or the path of one) into ``PYEXEC_FILES`` under this key's id
        (``<key id>/<name>``; a random name when none is given) and return the reference a
        request's ``files`` takes, with the SHA-256 computed here."""
        await self._file_store()
        object_name = f"{self.key_id}/{name or uuid.uuid4().hex}"
        js = self.nc.jetstream()
        try:
            if isinstance(data, bytes):
                _, sha256 = await write_object(
                    js, self._files_bucket, object_name, io.BytesIO(data)
                )
            else:
                with open(data, "rb") as reader:  # noqa: ASYNC230 - read a chunk at a time
                    _, sha256 = await write_object(js, self._files_bucket, object_name, reader)
        except NatsError as exc:
            raise from_nats(exc, f"{object_name} could not be stored") from None
        return protocol.FileRef(object=object_name, sha256=sha256)

    async def get_file(
        self,
        object_name: str,
        path: str | os.PathLike[str] | None = None,
        *,
        sha256: str | None = None,
    ) -> bytes | None:
        """An object of ``PYEXEC_FILES`` (an output listed in a reply's ``files``): its bytes,
        or written to ``path`` (then None). Its digest is checked by the object store, and
        against ``sha256`` when given (raises :class:`BadReply` if it differs)."""
        store = await self._file_store()
        try:
            info = await store.get_info(object_name)
            expected = sha256 or protocol.hex_digest(info.digest)
            if path is None:
                buffer = io.BytesIO()
                await read_object(self.nc.jetstream(), self._files_bucket, info, buffer, expected)
                return buffer.getvalue()
            with open(path, "wb") as writer:  # noqa: ASYNC230 - written as the chunks come
                await read_object(self.nc.jetstream(), self._files_bucket, info, writer, expected)
        except ObjectMismatch:
            raise BadReply(f"{object_name} does not hold what its size and SHA-256 say") from None
        except NatsError as exc:
            raise from_nats(exc, f"{object_name} cannot be read") from None
        return None

    async def _file_store(self) -> ObjectStore:
        if self._files is None:
            bucket = protocol.stream_name(protocol.FILES_BUCKET, self.prefix)
            try:
                self._files = await self.nc.jetstream().object_store(bucket)
                self._files_bucket = bucket
            except NatsError as exc:
                raise from_nats(exc, f"the file store {bucket} cannot be opened") from None
        return self._files

    async def send(
        self, subject: str, request: protocol.Request, timeout: float | None = None
    ) -> Reply:
        """Encode, sign and send one request; decode the reply."""
        body = protocol.encode(request, self.encoding)
        headers = self.sign(subject, body)
        if self.encoding == protocol.MSGPACK:
            headers["Content-Type"] = protocol.MSGPACK_CONTENT_TYPE
        if request.mode == "async" and request.request_id is not None:
            # Known before sending: the completion may answer this request even if its reply
            # is lost on the way.
            self._sent(self.job_id(request.request_id), subject, headers[NONCE_HEADER])
        return await self.send_raw(subject, body, timeout=timeout, headers=headers)

    async def send_raw(
        self,
        subject: str,
        body: bytes,
        *,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Send ``body`` as it is, signed unless ``headers`` are given, decode the reply and
        check its signature (see :meth:`check`)."""
        if headers is None:
            headers = self.sign(subject, body)
            if self.encoding == protocol.MSGPACK:
                headers["Content-Type"] = protocol.MSGPACK_CONTENT_TYPE
        nonce = protocol.header(headers, NONCE_HEADER) or ""
        wait = (DEFAULT_TIMEOUT if timeout is None else timeout) + REPLY_MARGIN
        msg = await self._request(subject, body, headers, wait)
        reply = self.check(
            _decode(msg.data, (msg.headers or {}).get("Content-Type")),
            msg.headers,
            msg.data,
            subject,
            nonce,
        )
        if reply.status == "accepted" and reply.job_id:
            known = self._jobs.setdefault(reply.job_id, [])
            if (subject, nonce) not in known:
                known.append((subject, nonce))
        return reply

    async def _request(
        self, subject: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> Msg:
        """One NATS request, its failures as the client's errors."""
        try:
            return await self.nc.request(subject, body, timeout=timeout, headers=headers)
        except NoRespondersError:
            raise NoReplica(f"no executor is listening on '{subject}'") from None
        except (NatsTimeout, TimeoutError):
            raise Timeout(f"no reply on '{subject}' within {timeout:g} s") from None
        except NatsError as exc:
            raise from_nats(exc, f"the request on '{subject}' failed") from None


class Connecting:
    """What :meth:`Client.connect` returns: await it for the client, or use it as an async
    context manager that closes the client on the way out."""

    def __init__(self, opener: Callable[[], Coroutine[Any, Any, Client]]) -> None:
        self._open = opener
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._open()
        return self._client

    async def __aexit__(self, *_exc: object) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class ProgressEvents:
    """The subscription behind :meth:`Client.progress`."""

    def __init__(self, client: Client, job_id: str) -> None:
        self._client = client
        self.job_id = job_id
        self._subscription: Subscription | None = None

    async def __aenter__(self) -> ProgressEvents:
        nc = self._client.nc
        self._subscription = await nc.subscribe(f"{self._client.prefix}.progress.{self.job_id}")
        await nc.flush()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def __aiter__(self) -> AsyncIterator[protocol.Progress]:
        if self._subscription is None:
            raise ClientError("use 'async with client.progress(job_id) as events' first")
        async for msg in self._subscription.messages:
            event = self._client._progress_event(self.job_id, msg.data, msg.headers)
            if event is not None:
                yield event


def _files(files: Mapping[str, protocol.FileRef] | None) -> dict[str, protocol.FileRef] | None:
    return None if files is None else dict(files)


def _decode(data: bytes, content_type: str | None) -> Reply:
    encoding: Encoding = (
        protocol.MSGPACK if content_type == protocol.MSGPACK_CONTENT_TYPE else protocol.JSON
    )
    try:
        return protocol.decode_reply(data, encoding)
    except msgspec.DecodeError as exc:
        raise BadReply(f"the reply could not be decoded: {exc}") from None
