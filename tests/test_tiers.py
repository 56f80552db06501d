"""Warm-parent tiers, huge pages, the one capacity limiter and the warm parents' supervision.

Real warm parents and children throughout. Which tier ran a script is read from the outcome
(``Outcome.tier``); the warm parents' pids from ``Pool.parent_pid``, to kill them from outside.
"""

from __future__ import annotations

import ast
import asyncio
import os
import platform
import signal
import time
from pathlib import Path
from typing import NoReturn

import msgspec
import pytest

from consumer.config import load
from consumer.errors import ConfigError
from sandbox import Capacity, Job, Outcome, ParentExit, Pool, PoolConfig, PoolError
from sandbox.isolation import user_task_limit
from sandbox.parent import CRASH_LOOP_LIMIT
from sandbox.tiers import Router, imported_modules
from tests.test_pool import wait_for

TRIVIAL = "def execute(ctx):\n    return ctx.get('n', 1)\n"
STDLIB = "import json, math\n\ndef execute(ctx):\n    return json.dumps([math.floor(2.5)])\n"
PANDAS = (
    "import pandas as pd\n\n"
    "def execute(ctx):\n"
    "    return int(pd.DataFrame({'a': [1, 2, 3]})['a'].sum())\n"
)
LATE_IMPORT = (
    "def execute(ctx):\n"
    "    from rapidfuzz import fuzz\n"
    "    return round(fuzz.ratio('kitten', 'sitting'))\n"
)
SLEEPER = "import time\n\ndef execute(ctx):\n    time.sleep(ctx['s'])\n    return 'woke'\n"


def ok(outcome: Outcome) -> object:
    assert outcome.status == "ok", outcome.error
    return outcome.result


def job(source: str, timeout: float = 20.0, **ctx: object) -> Job:
    return Job(source=source, ctx=dict(ctx), timeout=timeout)


# -- routing -----------------------------------------------------------------------------------


def test_imports_are_read_from_every_import_statement() -> None:
    source = (
        "import json, os.path\nfrom collections import abc\n"
        "def execute(ctx):\n    import pandas.io.formats\n    from sqlglot import exp\n"
        "x = 1; import numpy as np\nimport a as b, c\nreimport = foo.import_thing\n"
    )
    found = imported_modules(source)
    assert found == {"json", "os", "collections", "pandas", "sqlglot", "numpy", "a", "c"}
    assert imported_modules("def execute(ctx:\n") == frozenset()


def test_routing_reads_the_text_and_never_parses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing runs on the service's event loop: parsing a 1 MB script there held the loop for
    seconds, so the imports are read by a scan of the text instead (``ast.parse`` is made to
    fail here to show it is not used)."""

    def no_parse(*_args: object, **_kwargs: object) -> NoReturn:
        raise AssertionError("the router parsed a script")

    monkeypatch.setattr(ast, "parse", no_parse)
    router = Router(PoolConfig(), ("stdlib", "full"))
    filler = "x = foo(1, 2) + bar[3]  # a comment\n" * 28000
    assert router.tier_for(filler + TRIVIAL) == "stdlib"
    assert router.tier_for("# pandas\n" + filler + TRIVIAL) == "stdlib"
    assert router.tier_for("import pandas\n" + filler + TRIVIAL) == "full"


def test_the_router_picks_the_smallest_tier_that_covers_the_imports() -> None:
    router = Router(PoolConfig(), ("stdlib", "full"))
    assert router.tier_for(TRIVIAL) == "stdlib"
    assert router.tier_for(STDLIB) == "stdlib"
    assert router.tier_for(PANDAS) == "full"
    assert router.tier_for(LATE_IMPORT) == "full"  # an import inside a function counts
    # Refused or unknown modules need no larger parent: the policy refuses them in any.
    assert router.tier_for("import subprocess\ndef execute(ctx):\n    return 1\n") == "stdlib"
    assert router.tier_for("def execute(ctx:\n") == "stdlib"  # a syntax error fails anywhere
    # A tier that is down sends its runs to a larger one; never to a smaller one.
    assert router.tier_for(TRIVIAL, live=frozenset({"full"})) == "full"
    assert router.tier_for(PANDAS, live=frozenset({"stdlib"})) == "full"


def test_each_run_goes_to_the_smallest_parent_that_has_its_imports() -> None:
    """Scripts that import only the standard library run in children of the small parent;
    scripts that import a library in children of the full one; both answer the same."""

    async def scenario() -> None:
        async with Pool(PoolConfig(workers=2, warm_children=1)) as pool:
            assert pool.tiers == ("stdlib", "full")
            trivial, stdlib, pandas, late = [
                await pool.run(job(source, n=5))
                for source in (TRIVIAL, STDLIB, PANDAS, LATE_IMPORT)
            ]
            assert (ok(trivial), trivial.tier) == (5, "stdlib")
            assert (ok(stdlib), stdlib.tier) == ("[2]", "stdlib")
            assert (ok(pandas), pandas.tier) == (6, "full")
            assert (ok(late), late.tier) == (62, "full")
            states = {state.tier: state for state in pool.states()}
            assert states["stdlib"].runs == 2
            assert states["full"].runs == 2
            assert states["stdlib"].preloaded < states["full"].preloaded
            assert states["stdlib"].pid != states["full"].pid

    asyncio.run(scenario())


def test_an_import_no_preload_covers_is_loaded_on_demand() -> None:
    """With the standard-library tier alone, a script importing pandas still runs: the child
    imports it after its isolation is in place."""

    async def scenario() -> None:
        async with Pool(PoolConfig(workers=1, warm_children=1, tiers=("stdlib",))) as pool:
            outcome = await pool.run(job(PANDAS, timeout=60))
            assert (ok(outcome), outcome.tier) == (6, "stdlib")
            assert [layer.name for layer in pool.layers if not layer.active] == []

    asyncio.run(scenario())


def test_a_run_of_a_tier_that_is_restarting_goes_to_the_full_parent() -> None:
    """While the small parent is restarting, its scripts run in the full one (which covers
    every import); they do not wait for the restart."""

    async def scenario() -> None:
        async with Pool(PoolConfig(workers=1, warm_children=1)) as pool:
            small = pool.parent_pid("stdlib")
            assert small is not None
            os.kill(small, signal.SIGKILL)
            assert await wait_for(lambda: pool.tier_for(TRIVIAL) == "full")
            outcome = await pool.run(job(TRIVIAL, n=3))
            assert (ok(outcome), outcome.tier) == (3, "full")

    asyncio.run(scenario())


# -- huge pages --------------------------------------------------------------------------------


def _collapse_supported() -> bool:
    try:
        enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    return "[never]" not in enabled and (major, minor) >= (6, 1)


@pytest.mark.skipif(not _collapse_supported(), reason="MADV_COLLAPSE needs Linux 6.1 and THP")
def test_the_full_parent_memory_is_in_huge_pages_unless_switched_off() -> None:
    async def huge(enabled: bool) -> float:
        config = PoolConfig(workers=1, warm_children=1, tiers=("full",), huge_pages=enabled)
        async with Pool(config) as pool:
            ok(await pool.run(job(PANDAS)))
            (state,) = pool.states()
            return state.huge_pages_mb

    assert asyncio.run(huge(True)) >= 16
    assert asyncio.run(huge(False)) == 0


# -- one limiter -------------------------------------------------------------------------------


def test_a_capacity_passed_in_limits_the_pool() -> None:
    """The pool runs in the capacity it is given, whatever its own config says: two runs of a
    pool configured for two workers but given a capacity of one follow each other."""

    async def scenario() -> None:
        capacity = Capacity(1)
        config = PoolConfig(workers=2, warm_children=2, tiers=("stdlib",))
        async with Pool(config, capacity=capacity) as pool:
            started = time.monotonic()
            first, second = await asyncio.gather(
                pool.run(job(SLEEPER, s=0.5)), pool.run(job(SLEEPER, s=0.5))
            )
            assert ok(first) == ok(second) == "woke"
            assert time.monotonic() - started >= 1.0
            assert second.wait_ms + first.wait_ms >= 400  # one waited for the other's slot
            # A run in a slot the caller holds does not take a second one.
            async with capacity.slot() as slot:
                assert capacity.busy == 1
                assert ok(await pool.run(job(TRIVIAL), slot=slot)) == 1
                # One run per slot: a second run in it while the first goes on is refused.
                first_run = asyncio.create_task(pool.run(job(SLEEPER, s=0.3), slot=slot))
                await asyncio.sleep(0.05)
                with pytest.raises(PoolError, match="in use"):
                    await pool.run(job(TRIVIAL), slot=slot)
                assert ok(await first_run) == "woke"
            with pytest.raises(PoolError, match="slot"):
                await pool.run(job(TRIVIAL), slot=slot)  # no longer held
            async with Capacity(1).slot() as foreign:
                with pytest.raises(PoolError, match="slot"):
                    await pool.run(job(TRIVIAL), slot=foreign)

    asyncio.run(scenario())


def test_a_bounded_wait_is_refused_when_the_queue_is_full_or_too_slow() -> None:
    async def scenario() -> None:
        capacity = Capacity(1, queue_limit=1, max_wait=0.2)
        async with capacity.slot():
            waiting = asyncio.create_task(_hold(capacity))
            await asyncio.sleep(0.05)
            assert capacity.waiting == 1
            with pytest.raises(PoolError, match="already waiting"):
                async with capacity.slot(bounded=True):
                    pass
            with pytest.raises(PoolError, match=r"within 0\.2 s"):
                await waiting
        # Jobs hold reservations apart from slots: at most job_slots at once.
        jobs = Capacity(4, job_share=0.5)
        held = [await jobs.reserve_job(), await jobs.reserve_job()]
        third = asyncio.create_task(jobs.reserve_job())
        await asyncio.sleep(0.05)
        assert not third.done()
        held[0].release()
        held[0].release()  # a second release changes nothing
        (await asyncio.wait_for(third, 1)).release()
        assert jobs.jobs_reserved == 1

    asyncio.run(scenario())


async def _hold(capacity: Capacity) -> None:
    async with capacity.slot(bounded=True):
        pass


# -- supervision -------------------------------------------------------------------------------


def test_every_warm_parent_exit_is_reported_with_its_cause() -> None:
    exits: list[ParentExit] = []

    async def scenario() -> None:
        config = PoolConfig(workers=1, warm_children=1, tiers=("stdlib",))
        async with Pool(config, on_parent_exit=exits.append) as pool:
            pid = pool.parent_pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert await wait_for(lambda: pool.parent_pid() not in (None, pid) and pool.live)
            assert ok(await pool.run(job(TRIVIAL))) == 1

    asyncio.run(scenario())
    killed, stopped = exits
    assert (killed.tier, killed.cause, killed.expected) == ("stdlib", "killed by SIGKILL", False)
    assert killed.restarting
    assert killed.returncode == -signal.SIGKILL
    assert stopped.expected
    assert stopped.cause == "stopped by the pool (exited with code 0)"


def test_a_crash_loop_halts_the_restarts_and_the_pool_says_why() -> None:
    """A warm parent that dies again and again right after it starts is not restarted for
    ever: after CRASH_LOOP_LIMIT quick exits the pool stops, reports it, and is not live."""
    exits: list[ParentExit] = []

    async def scenario() -> None:
        config = PoolConfig(workers=1, warm_children=1, tiers=("stdlib",))
        async with Pool(config, on_parent_exit=exits.append) as pool:
            for _ in range(CRASH_LOOP_LIMIT):
                # Killed once started (a child waiting), so that each exit is a crash.
                assert await wait_for(lambda: pool.warm > 0)
                pid = pool.parent_pid()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                assert await wait_for(lambda: pool.parent_pid() != pid)  # noqa: B023
            assert await wait_for(lambda: pool.halted is not None)
            assert pool.halted is not None
            assert "restarts stopped" in pool.halted
            assert "killed by SIGKILL" in pool.halted
            assert not pool.live
            await asyncio.sleep(0.5)
            assert pool.parent_pid() is None  # nothing restarts it
            with pytest.raises(PoolError, match="restarts stopped"):
                await pool.run(job(TRIVIAL, timeout=0.1))

    asyncio.run(scenario())
    crashes = [item for item in exits if not item.expected]
    assert len(crashes) == CRASH_LOOP_LIMIT
    assert all(item.cause == "killed by SIGKILL" for item in crashes)
    assert [item.halted is not None for item in crashes] == [False] * (CRASH_LOOP_LIMIT - 1) + [
        True
    ]


def test_stopping_a_stuck_warm_parent_does_not_block_the_event_loop() -> None:
    """A warm parent that does not exit when told to is killed after a second; meanwhile the
    event loop keeps running (the wait is on the parent's pidfd, not a blocking wait)."""

    async def scenario() -> tuple[float, int]:
        config = PoolConfig(workers=1, warm_children=1, tiers=("stdlib",))
        pool = Pool(config)
        await pool.start()
        pid = pool.parent_pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # it cannot see its control socket close
        longest = 0.0
        closing = asyncio.create_task(pool.close())
        last = time.monotonic()
        while not closing.done():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now
        await closing
        return longest, pid

    longest, pid = asyncio.run(scenario())
    assert longest < 0.5
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped


def test_a_restarted_parent_with_fewer_layers_than_before_never_serves() -> None:
    """A warm parent restarted after a layer stopped working on the host is refused: it is
    stopped, reported as a failed start, and never gets a run; the pool halts instead of
    running scripts less isolated than before. (The host losing a layer is stood in for by
    switching seccomp off in the config the parent is restarted with: removing the run user
    or the kernel feature from this shared machine is not an option.)"""
    exits: list[ParentExit] = []

    async def scenario() -> None:
        config = PoolConfig(workers=1, warm_children=1, tiers=("stdlib",))
        async with Pool(config, on_parent_exit=exits.append) as pool:
            ok(await pool.run(job(TRIVIAL)))
            parent = pool._parents["stdlib"]
            parent.config = msgspec.structs.replace(config, disabled_layers=("seccomp",))
            pid = pool.parent_pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert await wait_for(lambda: pool.halted is not None, timeout=60)
            assert pool.halted is not None
            assert "seccomp" in pool.halted
            (state,) = pool.states()
            assert state.runs == 1  # nothing ran after the kill
            with pytest.raises(PoolError):
                await pool.run(job(TRIVIAL, timeout=0.1))

    asyncio.run(scenario())
    refused = [item for item in exits if "started without isolation layers" in item.cause]
    assert refused
    assert all("seccomp" in item.cause and not item.expected for item in refused)


THREADS = """
import threading, time

def execute(ctx):
    threading.stack_size(65536)
    made = 0
    try:
        for _ in range(ctx["cap"]):
            threading.Thread(target=time.sleep, args=(10,), daemon=True).start()
            made += 1
    except RuntimeError:
        return ["refused", made]
    return ["all", made]
"""


def test_a_run_starting_threads_without_end_is_stopped_short_and_the_parents_survive() -> None:
    """Below the policy, a run that starts threads without end gets an error at the runs'
    task limit instead of using up the process table; both warm parents keep running and the
    next runs work."""

    async def scenario() -> None:
        # Memory enough for the threads' stacks: at the default EXECUTOR_MEMORY_MB the address
        # space ends first (about 680 threads of 64 KiB), and a thread that cannot start then
        # leaves Thread.start() waiting until the run's timeout.
        config = PoolConfig(workers=1, warm_children=1, disabled_layers=("policy",), memory_mb=2048)
        limit = user_task_limit(config)
        async with Pool(config) as pool:
            before = {tier: pool.parent_pid(tier) for tier in pool.tiers}
            outcome = await pool.run(job(THREADS, timeout=30, cap=limit + 500))
            kind, made = ok(outcome)  # type: ignore[misc]
            assert (kind, made < limit) == ("refused", True)
            for source in (TRIVIAL, PANDAS):
                assert ok(await pool.run(job(source, n=6))) == 6
            assert {tier: pool.parent_pid(tier) for tier in pool.tiers} == before

    asyncio.run(scenario())


# -- configuration -----------------------------------------------------------------------------


def test_tiers_and_huge_pages_are_configured_from_the_environment() -> None:
    base = {"EXECUTOR_API_KEYS": "k:" + "ab" * 32}
    default = load({**base}).pool
    assert (default.tiers, default.huge_pages) == (("stdlib", "full"), True)
    one = load({**base, "EXECUTOR_TIERS": "full", "EXECUTOR_HUGE_PAGES": "0"}).pool
    assert (one.tiers, one.huge_pages) == (("full",), False)
    assert load({**base, "EXECUTOR_TIERS": "full, stdlib"}).pool.tiers == ("stdlib", "full")
    for bad in ("small", "full,full", "none"):
        with pytest.raises(ConfigError, match="EXECUTOR_TIERS"):
            load({**base, "EXECUTOR_TIERS": bad})
    with pytest.raises(ConfigError, match="EXECUTOR_HUGE_PAGES"):
        load({**base, "EXECUTOR_HUGE_PAGES": "maybe"})
