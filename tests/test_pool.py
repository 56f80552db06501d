"""The sandbox pool used directly, without NATS: real warm parent, real forked children.

White-box where it has to be: the warm parent's pid is read from ``pool.parent_pid()`` so that its
children can be found in /proc and killed from outside.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from textwrap import dedent

import pytest

from sandbox.api import Job, Outcome
from sandbox.config import PoolConfig
from sandbox.errors import PoolClosed
from sandbox.pool import Pool

SETTLE = 20.0  # seconds to wait for the pool to reach a state (not a measured bound)

ENDLESS = "def execute(ctx):\n    while True:\n        pass\n"
SLEEPER = "import time\ndef execute(ctx):\n    time.sleep(ctx['seconds'])\n    return 'woke'\n"


def job(source: str, timeout: float = 10.0, **ctx: object) -> Job:
    return Job(source=dedent(source), ctx=dict(ctx), timeout=timeout)


def parent_pid(pool: Pool) -> int:
    pid = pool.parent_pid()
    assert pid is not None
    return pid


def children_of(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (every thread's list), empty if it is gone."""
    found: set[int] = set()
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.update(int(word) for word in listing.read_text().split())
        except FileNotFoundError:
            continue
    return found


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_for(condition: Callable[[], bool], timeout: float = SETTLE) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def waiting_child(pool: Pool) -> int:
    """With one warm child configured: wait for it and return its pid."""
    parent = parent_pid(pool)
    assert await wait_for(lambda: pool.warm == 1 and len(children_of(parent)) == 1)
    (pid,) = children_of(parent)
    return pid


def with_pool(config: PoolConfig, body: Callable[[Pool], Awaitable[None]]) -> None:
    async def main() -> None:
        async with Pool(config) as pool:
            await body(pool)

    asyncio.run(main())


def one_slot() -> PoolConfig:
    return PoolConfig(tiers=("stdlib",), workers=1, warm_children=1)


def assert_ok(outcome: Outcome) -> None:
    assert outcome.status == "ok", outcome.error
    assert outcome.error is None


def test_a_job_runs_and_returns_its_result() -> None:
    """pool.run runs execute(ctx) in a child and returns its converted result and output."""

    async def body(pool: Pool) -> None:
        source = """
            import decimal
            def execute(ctx):
                print("working")
                return {"double": ctx["n"] * 2, "price": decimal.Decimal("1.50")}
            """
        outcome = await pool.run(job(source, n=21))
        assert_ok(outcome)
        assert outcome.result == {"double": 42, "price": "1.50"}
        assert outcome.stdout == "working\n"

    with_pool(PoolConfig(tiers=("stdlib",), workers=2, warm_children=2), body)


def test_concurrency_never_exceeds_workers() -> None:
    """Six sleeping jobs on two workers run at most two at a time, and do run two at a time."""
    source = """
        import time
        def execute(ctx):
            started = time.time()
            time.sleep(0.5)
            return [started, time.time()]
        """

    async def body(pool: Pool) -> None:
        outcomes = await asyncio.gather(*(pool.run(job(source)) for _ in range(6)))
        for outcome in outcomes:
            assert_ok(outcome)
        # Sweep the intervals; at equal times an end is counted before a start.
        events = sorted(
            [(start, 1) for start, _ in (o.result for o in outcomes)]
            + [(end, -1) for _, end in (o.result for o in outcomes)],
            key=lambda event: (event[0], event[1]),
        )
        running = most = 0
        for _, change in events:
            running += change
            most = max(most, running)
        assert most == 2
        assert pool.busy == 0

    with_pool(PoolConfig(tiers=("stdlib",), workers=2, warm_children=2), body)


def test_each_run_gets_a_fresh_process() -> None:
    """State one run leaves in library modules is absent in every later run."""
    mutate = """
        import csv
        import json
        def execute(ctx):
            csv.register_dialect("leaked", delimiter=";")
            json.decoder.BACKSLASH["leaked"] = "x"
            return ["leaked" in csv.list_dialects(), "leaked" in json.decoder.BACKSLASH]
        """
    look = """
        import csv
        import json
        def execute(ctx):
            return ["leaked" in csv.list_dialects(), "leaked" in json.decoder.BACKSLASH]
        """

    async def body(pool: Pool) -> None:
        first = await pool.run(job(mutate))
        assert_ok(first)
        assert first.result == [True, True]
        for _ in range(3):
            later = await pool.run(job(look))
            assert_ok(later)
            assert later.result == [False, False]

    with_pool(one_slot(), body)


def test_child_killed_mid_run_is_reported_and_the_pool_keeps_working() -> None:
    """A child SIGKILLed from outside mid-run ends worker_lost/memory_limit; the next job runs."""

    async def body(pool: Pool) -> None:
        victim = await waiting_child(pool)
        running = asyncio.create_task(pool.run(job(SLEEPER, timeout=60, seconds=30)))
        assert await wait_for(lambda: pool.busy == 1)
        await asyncio.sleep(0.5)  # let the script start sleeping
        os.kill(victim, signal.SIGKILL)
        outcome = await asyncio.wait_for(running, SETTLE)
        assert outcome.status == "error"
        assert outcome.error is not None
        assert outcome.error.code in {"worker_lost", "memory_limit"}
        after = await pool.run(job("def execute(ctx):\n    return 'still here'\n"))
        assert_ok(after)
        assert after.result == "still here"

    with_pool(one_slot(), body)


def test_dead_waiting_child_is_not_handed_a_job() -> None:
    """A job is not failed because a waiting child died before it was picked."""

    async def body(pool: Pool) -> None:
        idle = await waiting_child(pool)
        os.kill(idle, signal.SIGKILL)
        assert await wait_for(lambda: not alive(idle))
        outcome = await pool.run(job("def execute(ctx):\n    return 1\n"))
        assert_ok(outcome)

    with_pool(one_slot(), body)


def test_warm_parent_killed_is_replaced() -> None:
    """After the warm parent is SIGKILLed a new one starts and later jobs still run."""

    async def body(pool: Pool) -> None:
        old = parent_pid(pool)
        assert await wait_for(lambda: pool.warm == 2)
        old_children = children_of(old)
        assert len(old_children) == 2
        os.kill(old, signal.SIGKILL)
        assert await wait_for(lambda: pool.parent_starts == 2 and pool.parent_pid() is not None)
        assert parent_pid(pool) != old
        for n in range(3):
            outcome = await pool.run(job("def execute(ctx):\n    return ctx['n']\n", n=n))
            assert_ok(outcome)
            assert outcome.result == n
        assert not alive(old)
        assert await wait_for(lambda: not any(alive(pid) for pid in old_children))

    with_pool(PoolConfig(tiers=("stdlib",), workers=2, warm_children=2), body)


def live_children_of(pid: int) -> set[int]:
    """The children of ``pid`` that are not zombies (a child that just ran may be one until
    the warm parent reaps it)."""
    return {child for child in children_of(pid) if alive(child)}


def test_close_leaves_no_process_behind() -> None:
    """After close() neither the warm parent nor any of its children is alive.

    Regression: under load the child that had just run was still a zombie when the processes
    were counted (``assert 5 == 4``); the count now waits for the steady state.
    """

    async def main() -> None:
        pool = Pool(PoolConfig(tiers=("stdlib",), workers=2, warm_children=3))
        await pool.start()
        try:
            assert_ok(await pool.run(job("def execute(ctx):\n    return 1\n")))
            parent = parent_pid(pool)
            assert await wait_for(lambda: pool.warm == 3 and len(live_children_of(parent)) == 3)
            processes = {parent, *children_of(parent)}
        finally:
            await pool.close()
        assert await wait_for(lambda: not any(alive(pid) for pid in processes))

    asyncio.run(main())


def test_close_kills_a_running_job() -> None:
    """close() kills the child of a job that is still running, every time."""

    async def attempt() -> tuple[bool, Outcome]:
        pool = Pool(one_slot())
        await pool.start()
        runner = await waiting_child(pool)
        running = asyncio.create_task(pool.run(job(SLEEPER, timeout=30, seconds=3)))
        assert await wait_for(lambda: pool.busy == 1)
        await asyncio.sleep(0.3)  # let the script start sleeping
        await pool.close()
        killed = await wait_for(lambda: not alive(runner), timeout=2.0)
        return killed, await asyncio.wait_for(running, SETTLE)

    # Repeated because the behaviour is a race that sometimes goes the right way.
    for _ in range(10):
        killed, outcome = asyncio.run(attempt())
        assert killed
        assert outcome.status != "ok"


@pytest.mark.parametrize(
    "source",
    [
        ENDLESS,
        dedent(
            """
            def execute(ctx):
                while True:
                    try:
                        while True:
                            pass
                    except BaseException:
                        pass
            """
        ),
    ],
    ids=["loop", "loop-catching-the-stop"],
)
def test_timeout_kills_the_child(source: str) -> None:
    """A run past its timeout ends timeout/timeout and its process is gone afterwards."""

    async def body(pool: Pool) -> None:
        runner = await waiting_child(pool)
        started = time.monotonic()
        outcome = await pool.run(job(source, timeout=1))
        elapsed = time.monotonic() - started
        assert outcome.status == "timeout"
        assert outcome.error is not None
        assert outcome.error.code == "timeout"
        assert elapsed < 1 + 1
        assert await wait_for(lambda: not alive(runner))
        assert_ok(await pool.run(job("def execute(ctx):\n    return 1\n")))

    with_pool(one_slot(), body)


def test_caught_policy_violation_is_reported() -> None:
    """A script that catches its refusal and returns still ends policy_violation."""
    source = """
        def execute(ctx):
            try:
                import os
            except Exception:
                return "escaped"
            return "imported"
        """

    async def body(pool: Pool) -> None:
        outcome = await pool.run(job(source))
        assert outcome.status == "error"
        assert outcome.error is not None
        assert outcome.error.code == "policy_violation"
        assert "'os'" in outcome.error.message
        assert outcome.result is None

    with_pool(one_slot(), body)


def test_run_after_close_raises_pool_closed() -> None:
    """pool.run after close() raises PoolClosed instead of running anything."""

    async def main() -> None:
        pool = Pool(one_slot())
        await pool.start()
        await pool.close()
        with pytest.raises(PoolClosed):
            await pool.run(job("def execute(ctx):\n    return 1\n"))

    asyncio.run(main())


def test_fresh_mode_imports_libraries_inside_the_isolated_run() -> None:
    """The fresh-interpreter baseline imports pandas inside an isolated run and works.

    Regression: the child-wide pickle hooks replaced ``pickle._Unpickler`` with a function,
    and pandas, subclassing it while being imported there, failed with AttributeError.
    """
    source = (
        "import pandas as pd\n"
        "def execute(ctx):\n"
        "    return pd.DataFrame({'a': [1, 2]}).groupby('a').size().tolist()\n"
    )

    async def scenario() -> Outcome:
        async with Pool(PoolConfig(workers=1, warm_children=1, mode="fresh")) as pool:
            return await pool.run(Job(source=source, ctx={}, timeout=30))

    outcome = asyncio.run(scenario())
    assert outcome.status == "ok", outcome.error
    assert outcome.result == [1, 1]
