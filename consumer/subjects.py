"""Where a replica may publish an answer: never into a stream, an API or its own subjects.

A reply goes to the subject the request named, which must be an inbox: its first token must start
with one of ``EXECUTOR_REPLY_PREFIXES`` (``_INBOX`` by default, so ``_INBOX.…`` and
``_INBOX_billing.…`` pass). Besides, the executor refuses reply subjects under its own
prefix, under its own inbox prefix (``EXECUTOR_INBOX_PREFIX``: an answer there would pose as a
server response to the replica), and under the server's API prefixes (``$JS.``, ``$KV.``,
``$O.``, ``$SRV.``, ``$SYS.``),
and also any subject a JetStream stream of the account captures: another fleet's results stream
under another prefix, or any stream of the platform, would otherwise store the answer as if it
were a message of its own (a forged completion). The streams' subjects are read from the server
at start and every ``REFRESH_SECONDS``; a stream created since the last read is caught at the
next one.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.js import JetStreamContext

log = structlog.get_logger("pyexec.service")

SYSTEM_PREFIXES = ("$JS.", "$KV.", "$O.", "$SRV.", "$SYS.")
REFRESH_SECONDS = 10.0
# Pages of the stream list read at most (256 streams a page).
MAX_PAGES = 100


def matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject ``pattern`` (with ``*`` and ``>`` wildcards) matches ``subject``."""
    wanted, given = pattern.split("."), subject.split(".")
    for index, part in enumerate(wanted):
        if part == ">":
            return len(given) > index
        if index >= len(given) or part not in ("*", given[index]):
            return False
    return len(wanted) == len(given)


class ReplySubjects:
    """Decides whether a reply subject is refused; keeps the account's stream subjects fresh."""

    def __init__(self, prefix: str, inbox_prefix: str, allowed: tuple[str, ...]) -> None:
        self.prefix = prefix
        self.inbox_prefix = inbox_prefix
        self.allowed = allowed
        self._captured: tuple[str, ...] = ()
        self._task: asyncio.Task[None] | None = None

    def refused(self, subject: str) -> bool:
        first = subject.split(".", 1)[0]
        return (
            # Only inboxes: the first token must start with one of EXECUTOR_REPLY_PREFIXES.
            not first.startswith(self.allowed)
            or subject == self.prefix
            or subject.startswith(self.prefix + ".")
            or subject.startswith(SYSTEM_PREFIXES)
            # The replica's own inboxes: an "answer" there would pose as a server response.
            or subject.startswith(self.inbox_prefix + ".")
            or any(matches(pattern, subject) for pattern in self._captured)
        )

    async def start(self, js: JetStreamContext) -> None:
        await self._refresh(js)
        self._task = asyncio.create_task(self._keep_fresh(js))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _keep_fresh(self, js: JetStreamContext) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            await self._refresh(js)

    async def _refresh(self, js: JetStreamContext) -> None:
        """Read every stream's subjects, page by page; keep the last list if a read fails."""
        captured: list[str] = []
        offset = 0
        try:
            for _ in range(MAX_PAGES):
                page = await js.streams_info(offset=offset)
                if not page:
                    break
                offset += len(page)
                captured.extend(s for info in page for s in (info.config.subjects or ()))
        except Exception as exc:  # noqa: BLE001 - keep the last list: try again later
            log.warning("reading the account's streams failed", error=repr(exc))
            return
        self._captured = tuple(captured)
