"""Reading one object of a JetStream object store: its chunks, counted and hashed as they come.

nats-py's ``ObjectStore.get`` hands every chunk to a thread to write and checks the digest only
at the end; this reads the chunks from an ordered consumer, writes them as they arrive, stops at
the size the object's info gives (a chunk past it is a mismatch, so a lying info cannot fill a
disk) and compares the SHA-256 with the one expected. Used by the replicas for a request's files
and by the client's ``get_file``.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import IO

from nats.js import JetStreamContext
from nats.js.api import ObjectInfo

# Seconds to wait for the next chunk of an object before giving up.
CHUNK_TIMEOUT = 10.0


class ObjectMismatch(Exception):
    """The object's chunks are not what its info and the expected digest say."""


async def read_object(
    js: JetStreamContext, bucket: str, info: ObjectInfo, handle: IO[bytes], sha256: str
) -> int:
    """Write the object's bytes into ``handle``; their count. Raises :class:`ObjectMismatch`,
    or the NATS error of a stalled read."""
    expected = int(info.size or 0)
    digest = hashlib.sha256()
    written = 0
    if expected:
        sub = await js.subscribe(f"$O.{bucket}.C.{info.nuid}", ordered_consumer=True)
        try:
            while written < expected:
                msg = await sub.next_msg(timeout=CHUNK_TIMEOUT)
                written += len(msg.data)
                if written > expected:
                    break
                digest.update(msg.data)
                handle.write(msg.data)
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    if written != expected or digest.hexdigest() != sha256.lower():
        raise ObjectMismatch(f"{info.name}: its bytes do not match its size and digest")
    handle.flush()
    return written
