"""Objects of a JetStream object store: reading one (its chunks counted and hashed as they
come), telling whether its chunks are its own, and writing one without trusting what was there.

nats-py's ``ObjectStore.get`` hands every chunk to a thread to write and checks the digest only
at the end; this reads the chunks from an ordered consumer, writes them as they arrive, stops at
the size the object's info gives (a chunk past it is a mismatch, so a lying info cannot fill a
disk) and compares the SHA-256 with the one expected. Used by the replicas for a request's files
and by the client's ``get_file``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import json
import re
import secrets
from typing import IO

from nats.js import JetStreamContext
from nats.js.api import ObjectInfo

# Seconds to wait for the next chunk of an object before giving up.
CHUNK_TIMEOUT = 10.0
# Chunks are at least this large on average (clients write 128 KiB): an object of many tiny
# chunks would take a reader one message per byte.
MIN_CHUNK = 4096
# A whole read may take this long, plus a second per MB.
READ_TIME = 30.0
_NUID = re.compile(r"[A-Za-z0-9]{1,64}")


class ObjectMismatch(Exception):
    """The object's chunks are not what its info and the expected digest say."""


async def read_object(
    js: JetStreamContext, bucket: str, info: ObjectInfo, handle: IO[bytes], sha256: str
) -> int:
    """Write the object's bytes into ``handle``; their count. Raises :class:`ObjectMismatch`,
    or the NATS error (or TimeoutError) of a stalled or too slow read."""
    expected = int(info.size or 0)
    nuid = info.nuid or ""
    if not _NUID.fullmatch(nuid):
        # A wildcard or a dot would read other objects' chunks.
        raise ObjectMismatch(f"its chunk id {nuid[:80]!r} is not a plain token")
    if expected < 0:
        raise ObjectMismatch(f"it claims a size of {expected} bytes")
    most = min(expected // MIN_CHUNK + 2, max(int(info.chunks or 0), 1))
    if int(info.chunks or 0) > expected // MIN_CHUNK + 2:
        raise ObjectMismatch(f"it claims {info.chunks} chunks for {expected} bytes")
    digest = hashlib.sha256()
    written = 0
    chunks = 0
    if expected:
        sub = await js.subscribe(f"$O.{bucket}.C.{nuid}", ordered_consumer=True)
        try:
            async with asyncio.timeout(READ_TIME + expected / 1_000_000):
                while written < expected:
                    msg = await sub.next_msg(timeout=CHUNK_TIMEOUT)
                    written += len(msg.data)
                    chunks += 1
                    if written > expected or chunks > most:
                        break
                    digest.update(msg.data)
                    handle.write(msg.data)
                    if msg.metadata.num_pending == 0:
                        break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    if written != expected or chunks > most or digest.hexdigest() != sha256.lower():
        raise ObjectMismatch("its bytes do not match its size and SHA-256")
    handle.flush()
    return written


# How many metadata messages after an object's chunks are looked at for the one naming them.
OWNER_SCAN = 256
CHUNK_SIZE = 128 * 1024


def _stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


async def written_for(js: JetStreamContext, bucket: str, info: ObjectInfo) -> bool:
    """Whether the object's chunks were written for this name, not borrowed from another
    object by metadata that names their chunk id: the first metadata message stored after the
    chunks that names their id must be this name's (clients store the chunks, then the
    metadata). Chunk ids are not tied to names by the store itself, and anyone who may write
    metadata could otherwise point a name of their own at anyone's data."""
    nuid = info.nuid or ""
    if not _NUID.fullmatch(nuid):
        return False  # a wildcard or a dot names other objects' chunks
    if not info.size:
        return True  # no chunks to borrow
    try:
        last = await js.get_msg(_stream(bucket), subject=f"$O.{bucket}.C.{nuid}")
        seq = (last.seq or 0) + 1
        for _ in range(OWNER_SCAN):
            meta = await js.get_msg(_stream(bucket), seq=seq, subject=f"$O.{bucket}.M.>", next=True)
            try:
                named = json.loads(meta.data or b"{}")
            except ValueError:
                named = {}
            if isinstance(named, dict) and named.get("nuid") == nuid:
                return bool(named.get("name") == info.name)
            seq = (meta.seq or seq) + 1
    except Exception:  # noqa: BLE001 - chunks gone, or no metadata after them
        return False
    return False


async def write_object(
    js: JetStreamContext, bucket: str, name: str, reader: IO[bytes]
) -> tuple[int, str]:
    """Store ``reader``'s bytes as the object ``name`` under a fresh chunk id; (size, SHA-256
    hex). Unlike nats-py's put, metadata found under the name before is replaced without
    purging the chunks it names: metadata anyone could have planted there must not make the
    writer purge other objects' chunks (an id of '>' names them all). Chunks of a version
    replaced this way age out with the bucket's maximum age."""
    nuid = secrets.token_hex(11)
    digest = hashlib.sha256()
    size = chunks = 0
    while True:
        chunk = reader.read(CHUNK_SIZE)
        if not chunk:
            break
        await js.publish(f"$O.{bucket}.C.{nuid}", chunk)
        digest.update(chunk)
        size += len(chunk)
        chunks += 1
    meta = {
        "name": name,
        "bucket": bucket,
        "nuid": nuid,
        "size": size,
        "mtime": dt.datetime.now(dt.UTC).isoformat(),
        "chunks": chunks,
        "digest": "SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode(),
        "deleted": False,
        "options": {"max_chunk_size": CHUNK_SIZE},
    }
    subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
    await js.publish(subject, json.dumps(meta).encode(), headers={"Nats-Rollup": "sub"})
    return size, digest.hexdigest()
