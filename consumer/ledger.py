"""The idempotency ledger: one record per job id, kept for as long as completions are.

A job id is per key (``consumer.jobs.job_id_for``), so a record belongs to one caller. It holds
the digest of the submitted body, the stream sequence of the job message that owns the job, and
its state (queued, running, done, cancelled). With it:

- a submission repeated with the same body is answered ``accepted`` and not stored again, at
  any time while the record lives (not only inside the stream's short duplicate window);
- the same key and request id with a different body is a :class:`Conflict`;
- a job message that is not the owner (a late duplicate published straight into the stream) is
  acknowledged without running;
- a cancelled job stays cancelled (the record is durable like the streams): a worker that
  receives it, after a restart or a redelivery, acknowledges it without running.

Records are written with compare-and-set on their revision, so two replicas never both take a
job. The bucket's TTL equals ``EXECUTOR_RESULTS_MAX_AGE`` and a record is written again when its
job completes, so it lives at least as long as the completion.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Literal

import msgspec
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from consumer.errors import Conflict, Overloaded, StoreUnavailable
from consumer.protocol import Progress
from consumer.streams import patiently

Claim = Literal["run", "duplicate", "done", "cancelled"]
State = Literal["queued", "running", "done", "cancelled"]
FINAL: frozenset[State] = frozenset({"done", "cancelled"})
ATTEMPTS = 5


class Record(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    digest: str
    seq: int = 0  # stream sequence of the job message that owns the job; 0 until known
    state: State = "queued"
    completion: int = 0  # stream sequence of its completion in the results stream, once final

    @property
    def tombstone(self) -> bool:
        """A cancel of an id no record had: no job known, only 'do not run it if it comes'."""
        return not self.digest and self.state == "cancelled"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Record)
_progress_encoder = msgspec.json.Encoder()
_progress_decoder = msgspec.json.Decoder(Progress)


def digest_of(kind: str, body: bytes) -> str:
    """What "the same submission" means: the same kind and byte-identical body."""
    return hashlib.sha256(kind.encode() + b"\n" + body).hexdigest()


class Ledger:
    """Job records in the ``PYEXEC_JOB_IDS`` bucket."""

    def __init__(self, bucket: KeyValue, *, timeout: float) -> None:
        self._bucket = bucket
        self._timeout = timeout  # for a whole operation
        self._step = timeout / 2  # for one read or write in it

    async def register(self, job_id: str, key_id: str, digest: str) -> tuple[Record | None, int]:
        """Record a new submission. Returns (None, its revision) when it is new, else the
        record of the same submission made before and its revision; raises :class:`Conflict`
        for a different body and :class:`Overloaded` when the ledger cannot be reached."""
        try:
            async with asyncio.timeout(self._timeout):
                for _ in range(ATTEMPTS):
                    revision = await self._create(job_id, Record(key_id=key_id, digest=digest))
                    if revision:
                        return None, revision
                    found = await self._read(job_id)
                    if found is None:
                        continue  # expired between the two calls: try creating again
                    record, revision = found
                    if record.tombstone:
                        # The key cancelled this id before any replica saw a job under it (one
                        # stored straight into the stream, perhaps this very submission): the
                        # job is stored, and completes 'cancelled' without running. Another
                        # key's tombstone is not this caller's to keep: it is replaced.
                        state: State = "cancelled" if record.key_id == key_id else "queued"
                        new = Record(key_id=key_id, digest=digest, state=state)
                        try:
                            revision = await self._update(job_id, new, revision)
                        except KeyWrongLastSequenceError:
                            continue
                        return None, revision
                    _same(record, key_id, digest)
                    return record, revision
        except (TimeoutError, NatsError) as exc:
            raise Overloaded(f"the job ledger cannot be reached ({exc!r}); retry shortly") from None
        raise Overloaded("the job ledger is changing too fast; retry shortly")

    async def owned_by(self, job_id: str, revision: int, seq: int) -> None:
        """Note which stream message owns the job, if the record is still at ``revision``
        (best effort: a worker claims the job anyway). The rest of the record is kept as it
        is (a job registered cancelled stays cancelled)."""
        try:
            async with asyncio.timeout(self._timeout):
                found = await self._read(job_id)
                if found is None or found[1] != revision:
                    return  # claimed, cancelled or gone meanwhile: the record is newer
                record = msgspec.structs.replace(found[0], seq=seq)
                await self._update(job_id, record, revision)
        except (TimeoutError, NatsError, KeyWrongLastSequenceError):
            return

    async def forget(self, job_id: str) -> None:
        """Drop the record of a submission that could not be stored."""
        try:
            async with asyncio.timeout(self._timeout):
                await patiently(lambda: self._bucket.delete(job_id), within=self._step)
        except (TimeoutError, NatsError):
            return

    async def claim(self, job_id: str, key_id: str, digest: str, seq: int) -> Claim:
        """Whether the job message at stream sequence ``seq`` is the one to run ("run"), a
        duplicate of a job owned by another message ("duplicate"), a job completed already
        ("done") or cancelled ("cancelled"). Raises :class:`Conflict`
        for a different body under the same job id, :class:`StoreUnavailable` if the ledger
        cannot be reached (the job is then handed back)."""
        try:
            async with asyncio.timeout(self._timeout):
                mine = Record(key_id=key_id, digest=digest, seq=seq, state="running")
                for _ in range(ATTEMPTS):
                    # Most jobs were registered by the replica that stored them: read first.
                    found = await self._read(job_id)
                    if found is None:
                        if await self._create(job_id, mine):
                            return "run"
                        continue  # created meanwhile by another replica: read it
                    record, revision = found
                    if record.tombstone and record.key_id == key_id:
                        # Cancelled by its key before any replica saw it (a job stored straight
                        # into the stream): it becomes a cancelled job of its own, never run.
                        cancelled = msgspec.structs.replace(mine, state="cancelled")
                        try:
                            await self._update(job_id, cancelled, revision)
                        except KeyWrongLastSequenceError:
                            continue
                        return "cancelled"
                    if record.tombstone:
                        record = Record(key_id=key_id, digest=digest)  # another key's: ignored
                    _same(record, key_id, digest)
                    if record.state in FINAL:  # never run again, whichever message
                        return "done" if record.state == "done" else "cancelled"
                    if record.seq not in (0, seq):
                        return "duplicate"
                    if record.seq == seq and record.state == "running":
                        return "run"  # delivered again to run it again
                    try:
                        await self._update(job_id, mine, revision)
                    except KeyWrongLastSequenceError:
                        continue  # another replica claimed it meanwhile: read again
                    return "run"
        except (TimeoutError, NatsError) as exc:
            raise StoreUnavailable(repr(exc)) from None
        raise StoreUnavailable("the record kept changing")

    async def settle(self, job_id: str, state: State, completion: int) -> None:
        """Write the job's final state and where its completion is stored (the stream
        sequence of the one that counts), which also restarts the record's time to live; best
        effort."""
        try:
            async with asyncio.timeout(self._timeout):
                found = await self._read(job_id)
                if found is not None:
                    final = msgspec.structs.replace(found[0], state=state, completion=completion)
                    data = _encoder.encode(final)
                    await patiently(lambda: self._bucket.put(job_id, data), within=self._step)
        except (TimeoutError, NatsError):
            return

    async def cancel(self, job_id: str, key_id: str) -> tuple[Record | None, bool]:
        """Mark the caller's job cancelled unless it is final already. Returns its record as
        it was (None: no job of this key) and whether this call cancelled it. Compare-and-set,
        so of a cancel and a worker's claim, or of two cancels, one wins and the other sees
        the winner's state. Raises :class:`Overloaded` when the ledger cannot be reached."""
        try:
            async with asyncio.timeout(self._timeout):
                for _ in range(ATTEMPTS):
                    found = await self._read(job_id)
                    if found is None:
                        # No record: no job, or one stored straight into the jobs stream that no
                        # replica has taken yet. A tombstone makes sure the latter never runs;
                        # the answer is 'unknown' all the same.
                        tombstone = Record(key_id=key_id, digest="", state="cancelled")
                        if await self._create(job_id, tombstone):
                            return None, False
                        continue
                    if found[0].key_id != key_id or found[0].tombstone:
                        return None, False
                    record, revision = found
                    if record.state in FINAL:
                        return record, False
                    cancelled = msgspec.structs.replace(record, state="cancelled")
                    try:
                        await self._update(job_id, cancelled, revision)
                    except KeyWrongLastSequenceError:
                        continue  # claimed or cancelled meanwhile: read again
                    return record, True
        except (TimeoutError, NatsError) as exc:
            raise Overloaded(f"the job ledger cannot be reached ({exc!r}); retry shortly") from None
        raise Overloaded("the job ledger is changing too fast; retry shortly")

    async def state_of(self, job_id: str) -> State | None:
        """The job's state now; None when it cannot be told (missing, unreachable)."""
        try:
            async with asyncio.timeout(self._timeout):
                found = await self._read(job_id)
        except (TimeoutError, NatsError):
            return None
        return None if found is None else found[0].state

    async def lookup(self, job_id: str, key_id: str) -> Record | None:
        """The record of ``job_id`` if it belongs to ``key_id``; None for another key's job,
        exactly as for one that never existed. Raises :class:`Overloaded` when the ledger
        cannot be reached."""
        try:
            async with asyncio.timeout(self._timeout):
                found = await self._read(job_id)
        except (TimeoutError, NatsError) as exc:
            raise Overloaded(f"the job ledger cannot be reached ({exc!r}); retry shortly") from None
        if found is None or found[0].key_id != key_id or found[0].tombstone:
            return None
        return found[0]

    async def set_progress(self, job_id: str, progress: Progress) -> None:
        """Keep ``progress`` as the job's last progress event (under ``<job_id>.progress``, not
        in the record, so it never races a claim or a cancel); best effort."""
        data = _progress_encoder.encode(progress)
        try:
            async with asyncio.timeout(self._timeout):
                await patiently(
                    lambda: self._bucket.put(f"{job_id}.progress", data), within=self._step
                )
        except (TimeoutError, NatsError):
            return

    async def progress(self, job_id: str) -> Progress | None:
        """The job's last progress event; None if it has none (or it cannot be read now)."""
        try:
            async with asyncio.timeout(self._timeout):
                entry = await patiently(
                    lambda: self._bucket.get(f"{job_id}.progress"), within=self._step
                )
            return _progress_decoder.decode(entry.value or b"")
        except (TimeoutError, NatsError, KeyNotFoundError, msgspec.DecodeError):
            return None

    async def _create(self, job_id: str, record: Record) -> int:
        """The new record's revision, or 0 if the key exists (perhaps written by a retry whose
        answer was lost: the caller reads it)."""
        data = _encoder.encode(record)
        try:
            return await patiently(lambda: self._bucket.create(job_id, data), within=self._step)
        except KeyWrongLastSequenceError:
            return 0

    async def _update(self, job_id: str, record: Record, revision: int) -> int:
        """Write ``record`` if the key is still at ``revision``; the new revision."""
        data = _encoder.encode(record)
        return await patiently(
            lambda: self._bucket.update(job_id, data, last=revision), within=self._step
        )

    async def _read(self, job_id: str) -> tuple[Record, int] | None:
        try:
            entry = await patiently(lambda: self._bucket.get(job_id), within=self._step)
        except KeyNotFoundError:
            return None
        try:
            record = _decoder.decode(entry.value or b"")
        except msgspec.DecodeError:
            # Not written by a replica: treat it as a record nothing can match.
            record = Record(key_id="", digest="")
        return record, entry.revision or 0


def _same(record: Record, key_id: str, digest: str) -> None:
    if record.key_id != key_id or record.digest != digest:
        raise Conflict(
            "this request_id was already submitted with a different body; "
            "use a new request_id for a different job"
        )
