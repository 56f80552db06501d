"""Files larger than a message, through the JetStream object store ``PYEXEC_FILES``.

- In: a request's ``files`` maps an alias (a plain file name) to an object under the caller's
  key id and its SHA-256. Before anything runs, every object must exist, be a plain object
  (not a link), fit the limits, and match its digest; each is copied to a temporary file here,
  hashed as it arrives, and the run gets it read-only at ``in/<alias>``. Anything wrong is
  ``invalid_request`` naming the alias.
- Out: the regular files a run that ended ``ok`` left in ``out/`` are stored as
  ``<key id>/<job id or request id>/<name>`` and listed in the reply with size and digest.

An object's name says whose it is, and the digest in the signed request says what it holds:
an object replaced by anyone else on the account no longer matches and is refused, never run.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import quote

import structlog
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo, ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore
from pyexec_client.objects import ObjectMismatch, read_object, write_object, written_for

from consumer.config import Settings
from consumer.errors import InvalidRequest, Overloaded
from consumer.metrics import Metrics
from consumer.protocol import FILE_NAME, FILES_BUCKET, FileRef, OutFile, hex_digest
from sandbox import InputFile, OutputFile

log = structlog.get_logger("pyexec.files")

_ALIAS = re.compile(FILE_NAME)
_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_MB = 1024 * 1024


def check_refs(files: Mapping[str, FileRef], key_id: str) -> None:
    """Refuse aliases and object names outside the rules, naming the alias."""
    own = f"{key_id}/"
    for alias, ref in files.items():
        if not _ALIAS.fullmatch(alias):
            raise InvalidRequest(
                f"files: alias {alias[:120]!r} is not a plain file name (letters, digits, '.', "
                "'_' and '-', 1 to 100 characters, not starting with '.')"
            )
        name = ref.object
        if not name.startswith(own):
            raise InvalidRequest(
                f"files[{alias!r}]: object {name[:200]!r} is not under this key's prefix {own!r}"
            )
        parts = name[len(own) :].split("/")
        if any(part in ("", ".", "..") for part in parts) or not name.isprintable() or "\\" in name:
            raise InvalidRequest(
                f"files[{alias!r}]: object name {name[:200]!r} has an empty, '.' or '..' part, "
                "a backslash or an unprintable character"
            )


def out_prefix(key_id: str, run_id: str) -> str:
    """Where a run's outputs are stored: ``<key id>/<job id or request id>/``. A request id
    that is not a plain path segment is percent-encoded, so it never adds or removes a level."""
    segment = run_id if _SAFE_SEGMENT.fullmatch(run_id) and run_id not in (".", "..") else ""
    if not segment:
        segment = quote(run_id, safe="").replace(".", "%2E")
    return f"{key_id}/{segment}/"


@dataclass
class Staged:
    """A request's input files, copied here for one run; :meth:`close` drops them."""

    inputs: tuple[InputFile, ...] = ()
    _files: list[IO[bytes]] = field(default_factory=list, repr=False)

    @property
    def total(self) -> int:
        return sum(item.size for item in self.inputs)

    def close(self) -> None:
        for handle in self._files:
            with contextlib.suppress(OSError):
                handle.close()
        self._files.clear()


class FileStore:
    """The ``PYEXEC_FILES`` bucket of one fleet."""

    def __init__(self, js: JetStreamContext, settings: Settings, metrics: Metrics) -> None:
        self.js = js
        self.settings = settings
        self.metrics = metrics
        self.bucket = settings.stream(FILES_BUCKET)
        self._store: ObjectStore | None = None
        # A run's files share its scratch quota: the lower of the two limits applies
        # (EXECUTOR_FILES_MAX_MB is the pool's limit on out/ too).
        self.max_bytes = min(settings.pool.out_files_mb, settings.pool.scratch_limit_mb) * _MB

    async def open(self) -> None:
        """Open the bucket, creating it when it is missing."""
        try:
            self._store = await self.js.object_store(self.bucket)
        except BucketNotFoundError:
            self._store = await self.js.create_object_store(
                bucket=self.bucket,
                config=ObjectStoreConfig(
                    bucket=self.bucket,
                    description="pyexec: files in and out of runs",
                    ttl=self.settings.files_max_age,
                    storage=StorageType.FILE,
                    replicas=self.settings.stream_replicas,
                ),
            )
            log.info("object store created", bucket=self.bucket)

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            raise Overloaded("the file store is not open yet; retry shortly")
        return self._store

    def check_names(self, key_id: str, files: Mapping[str, FileRef]) -> None:
        """The aliases and object names, without a look at the store."""
        check_refs(files, key_id)

    async def check(self, key_id: str, files: Mapping[str, FileRef]) -> None:
        """What can be told without reading the objects (names, existence, sizes, digests):
        for a job, at submission."""
        check_refs(files, key_id)
        await self._infos(files)

    async def stage(self, key_id: str, files: Mapping[str, FileRef]) -> Staged:
        """Copy the request's objects here, each checked against its digest as it arrives."""
        check_refs(files, key_id)
        infos = await self._infos(files)
        staged = Staged()
        try:
            for alias, ref in files.items():
                handle = tempfile.TemporaryFile(dir=self.settings.pool.scratch_dir or None)  # noqa: SIM115 - closed by Staged.close
                staged._files.append(handle)
                size = await self._download(alias, ref, infos[alias], handle)
                staged.inputs = (
                    *staged.inputs,
                    InputFile(alias=alias, fd=handle.fileno(), size=size),
                )
        except BaseException:
            staged.close()
            raise
        self.metrics.files.labels(direction="in").inc(len(staged.inputs))
        self.metrics.file_bytes.labels(direction="in").inc(staged.total)
        return staged

    async def _infos(self, files: Mapping[str, FileRef]) -> dict[str, ObjectInfo]:
        infos: dict[str, ObjectInfo] = {}
        total = 0
        for alias, ref in files.items():
            try:
                info = await self.store.get_info(ref.object)
            except NotFoundError:
                raise InvalidRequest(
                    f"files[{alias!r}]: no object {ref.object!r} in {self.bucket} "
                    "(never put, deleted, or expired)"
                ) from None
            except NatsError as exc:
                raise Overloaded(f"the file store cannot be reached ({exc!r})") from None
            if info.options is not None and info.options.link is not None:
                raise InvalidRequest(f"files[{alias!r}]: object {ref.object!r} is a link")
            if info.deleted:
                raise InvalidRequest(f"files[{alias!r}]: object {ref.object!r} was deleted")
            if not await written_for(self.js, self.bucket, info):
                raise InvalidRequest(
                    f"files[{alias!r}]: object {ref.object!r} names data that was not "
                    "written for it"
                )
            if hex_digest(info.digest) != ref.sha256.lower():
                raise InvalidRequest(
                    f"files[{alias!r}]: object {ref.object!r} does not have the SHA-256 given"
                )
            if (info.size or 0) < 0:
                raise InvalidRequest(
                    f"files[{alias!r}]: object {ref.object!r} claims a size below 0"
                )
            total += info.size or 0
            if total > self.max_bytes:
                raise InvalidRequest(
                    f"files[{alias!r}]: the request's files are over the limit of "
                    f"{self.max_bytes // _MB} MB in all"
                )
            infos[alias] = info
        return infos

    async def _download(self, alias: str, ref: FileRef, info: ObjectInfo, handle: IO[bytes]) -> int:
        """Copy one object's chunks into ``handle``; its size. Refused if it holds more than
        its info says or does not hash to the digest in the request."""
        try:
            return await read_object(self.js, self.bucket, info, handle, ref.sha256)
        except ObjectMismatch as exc:
            raise InvalidRequest(f"files[{alias!r}]: object {ref.object!r}: {exc}") from None
        except (NatsError, TimeoutError) as exc:
            raise Overloaded(
                f"files[{alias!r}]: reading the object stalled ({exc!r}); retry"
            ) from None

    async def put_outputs(
        self, key_id: str, run_id: str, outputs: tuple[OutputFile, ...]
    ) -> list[OutFile]:
        """Store a run's ``out/`` files; closes their descriptors."""
        stored: list[OutFile] = []
        prefix = out_prefix(key_id, run_id)
        try:
            for item in outputs:
                name = prefix + item.name
                with os.fdopen(os.dup(item.fd), "rb") as reader:
                    size, sha256 = await write_object(self.js, self.bucket, name, reader)
                stored.append(OutFile(name=item.name, object=name, bytes=size, sha256=sha256))
        finally:
            for item in outputs:
                with contextlib.suppress(OSError):
                    os.close(item.fd)
        self.metrics.files.labels(direction="out").inc(len(stored))
        self.metrics.file_bytes.labels(direction="out").inc(sum(f.bytes for f in stored))
        return stored
