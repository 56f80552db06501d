"""Limits still hold when a replica is busy: a mixed burst gets the right answer for each run."""

from __future__ import annotations

import asyncio

from pyexec_client.client import Client

from consumer.protocol import Reply
from tests.conftest import KEY_ID, SECRET, Caller

TRIVIAL = "def execute(ctx):\n    return ctx['i'] * 2\n"
ENDLESS = "def execute(ctx):\n    while True:\n        pass\n"
MEMORY = "def execute(ctx):\n    blob = bytearray(3000 * 1024 * 1024)\n    return len(blob)\n"
FLOOD = "def execute(ctx):\n    while True:\n        print('x' * 4096)\n"
HUGE = "def execute(ctx):\n    return 'y' * 5_000_000\n"
STATE = (
    "import json\n"
    "def execute(ctx):\n"
    "    seen = json.decoder.BACKSLASH.get('marker')\n"
    "    json.decoder.BACKSLASH['marker'] = ctx['i']\n"
    "    return seen\n"
)


async def burst(caller: Caller) -> list[tuple[str, Reply]]:
    jobs = [("ok", TRIVIAL, {"i": i}) for i in range(6)]
    jobs += [("timeout", ENDLESS, {}) for _ in range(2)]
    jobs += [("memory_limit", MEMORY, {}) for _ in range(2)]
    jobs += [("output_limit", FLOOD, {}) for _ in range(2)]
    jobs += [("output_limit", HUGE, {}) for _ in range(2)]
    jobs += [("state", STATE, {"i": i}) for i in range(4)]
    async with await Client.connect(caller.url, KEY_ID, SECRET, prefix=caller.prefix) as client:
        replies = await asyncio.gather(
            *(client.execute_code(source, ctx, timeout=2) for _, source, ctx in jobs)
        )
    return [(expected, reply) for (expected, _, _), reply in zip(jobs, replies, strict=True)]


def test_a_mixed_burst_gets_each_run_its_own_outcome(caller: Caller) -> None:
    """Twenty concurrent runs on two workers: every limit holds and no run sees another's state."""
    results = asyncio.run(burst(caller))
    for expected, reply in results:
        if expected == "ok":
            assert reply.status == "ok", reply
        elif expected == "state":
            assert reply.status == "ok", reply
            assert reply.result is None, "a run saw what an earlier run left in a library module"
        else:
            assert reply.error is not None, reply
            assert reply.error.code == expected, reply.error
    doubled = sorted(reply.result for expected, reply in results if expected == "ok")
    assert doubled == [0, 2, 4, 6, 8, 10]
    assert caller.code(TRIVIAL, {"i": 21}).result == 42
