"""The pool: warm parents (one per tier), their waiting children, and one run per child with a
deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from sandbox import protocol
from sandbox.api import ErrorCode, ErrorInfo, Job, Outcome, OutputFile
from sandbox.broker import Broker, RunNetwork
from sandbox.capacity import Capacity, Slot
from sandbox.compiler import CodeCache, compile_to_marshal
from sandbox.config import PoolConfig
from sandbox.errors import PoolClosed, PoolError, ProtocolError
from sandbox.files import OutputRefused, close_all, open_outputs, place_inputs
from sandbox.isolation import LayerStatus, network_rules
from sandbox.parent import CHILD_WAIT_FLOOR, Child, OnParentExit, Parent, ParentExit
from sandbox.quota import Limits, ScratchQuota, Usage
from sandbox.tiers import Router, Tier, tiers_of

EXIT_STATUS_WAIT = 2.0
LEARNING_AT_ONCE = 4
# Progress frames a run may send: the builtin sends at most 5 a second (and one at the end).
REPORTS_PER_SECOND = 10.0
REPORTS_BURST = 20
# Receives a job's progress reports: (fraction 0..1 or None, message).
OnProgress = Callable[[float | None, str], None]


@dataclass(frozen=True)
class TierState:
    """What one tier's warm parent looks like now (for doctor, metrics and logs)."""

    tier: Tier
    pid: int | None
    preloaded: int
    warm: int
    runs: int
    starts: int
    live: bool
    halted: str | None
    huge_pages_mb: float
    timings: dict[str, float]


class Pool:
    """Runs jobs in fresh child processes forked from warm parents, one per tier.

    ``async with Pool(config) as pool: outcome = await pool.run(job)``. At most
    ``capacity.workers`` jobs run at once (``config.workers`` unless a :class:`Capacity` is
    passed in and shared with the caller's admission); more wait their turn. Every job gets a
    process of its own, forked from the smallest warm parent whose preload covers the script's
    imports, that exits after the run.
    """

    def __init__(
        self,
        config: PoolConfig,
        *,
        capacity: Capacity | None = None,
        on_parent_exit: OnParentExit | None = None,
    ) -> None:
        self.config = config
        self.capacity = capacity if capacity is not None else Capacity(config.workers)
        self._on_parent_exit = on_parent_exit
        self.tiers = tiers_of(config)
        self._parents = {tier: Parent(tier, config, self._parent_exited) for tier in self.tiers}
        self._router = Router(config, self.tiers)
        self._runs = dict.fromkeys(self.tiers, 0)
        self._closed = False
        self._running: set[Child] = set()
        self.failed_imports: list[str] = []
        self.layers: list[LayerStatus] = []
        self.timings: dict[str, float] = {}
        self._code = CodeCache()
        self._learning: dict[str, asyncio.Task[None]] = {}
        self._broker = Broker(network_rules(config))
        self._quota: ScratchQuota | None = None
        self._limits = Limits(
            max_bytes=config.scratch_limit_mb * 1024 * 1024, max_files=config.scratch_files
        )

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # -- state the caller may read ------------------------------------------------------------

    @property
    def busy(self) -> int:
        """Jobs running now."""
        return len(self._running)

    @property
    def warm(self) -> int:
        """Children forked and waiting for a job, of every tier."""
        return sum(parent.warm for parent in self._parents.values())

    @property
    def parent_starts(self) -> int:
        """Warm parents started, of every tier (restarts included)."""
        return sum(parent.starts for parent in self._parents.values())

    @property
    def parent_restarts(self) -> int:
        return sum(max(parent.starts - 1, 0) for parent in self._parents.values())

    @property
    def halted(self) -> str | None:
        """Why the pool stopped restarting a warm parent (a crash loop), else None."""
        return next((p.halted for p in self._parents.values() if p.halted), None)

    @property
    def live(self) -> bool:
        """Whether a run started now would get a process: open, no tier halted, and (warm mode)
        the largest tier's warm parent running rather than being restarted (it covers every
        script; a smaller tier that is down sends its runs there)."""
        if self._closed or self.halted:
            return False
        return self.config.mode == "fresh" or self._parents[self.tiers[-1]].live

    def parent_pid(self, tier: Tier | None = None) -> int | None:
        """The pid of a tier's warm parent now (by default of the smallest tier: where scripts
        that import no library run)."""
        return self._parents[tier or self.tiers[0]].pid

    def scratch_root(self, tier: Tier | None = None) -> str:
        """The folder a tier's runs get their scratch folders in (the smallest by default)."""
        return self._parents[tier or self.tiers[0]].scratch_root

    def tier_for(self, source: str) -> Tier:
        """The tier a run of ``source`` goes to now."""
        live = frozenset(tier for tier, parent in self._parents.items() if parent.live)
        return self._router.tier_for(source, live=live)

    def states(self) -> list[TierState]:
        return [
            TierState(
                tier=tier,
                pid=parent.pid,
                preloaded=len(parent.preload),
                warm=parent.warm,
                runs=self._runs[tier],
                starts=parent.starts,
                live=parent.live,
                halted=parent.halted,
                huge_pages_mb=parent.huge_pages_mb,
                timings=parent.timings,
            )
            for tier, parent in self._parents.items()
        ]

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> Pool:
        """Start the warm parents and wait until they have imported their modules."""
        if self.config.mode == "fresh":
            # Each run starts its own; one is started here only to learn the layers.
            probe_config = msgspec.structs.replace(self.config, mode="warm", tiers=("full",))
            async with Pool(probe_config) as probe:
                self.failed_imports, self.layers = probe.failed_imports, probe.layers
                self.timings = probe.timings
            return self
        try:
            for parent in self._parents.values():
                await parent.start()
        except BaseException:
            for parent in self._parents.values():
                await parent.close()
            raise
        self._learn_layers()
        if any(layer.name == "limits" and layer.active for layer in self.layers):
            self._quota = ScratchQuota()
            asyncio.get_running_loop().add_reader(self._quota.fd, self._read_quota)
        return self

    def _learn_layers(self) -> None:
        """The layers every tier applies (a layer counts as active only if it is in all), the
        imports that failed anywhere, and the largest tier's timings."""
        parents = list(self._parents.values())
        largest = parents[-1]
        inactive = {
            layer.name: layer for parent in parents for layer in parent.layers if not layer.active
        }
        self.layers = [inactive.get(layer.name, layer) for layer in largest.layers]
        self.failed_imports = sorted({name for p in parents for name in p.failed_imports})
        self.timings = dict(largest.timings)
        for parent in parents[:-1]:
            self.timings.update({f"{parent.tier}: {k}": v for k, v in parent.timings.items()})

    async def close(self) -> None:
        """Stop the warm parents and every waiting child. Running jobs are killed."""
        self._closed = True
        for task in self._learning.values():
            task.cancel()
        for child in self._running:
            child.signal(signal.SIGKILL)
        await asyncio.gather(*(parent.close() for parent in self._parents.values()))
        if self._quota is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._quota.fd)
            self._quota.close()
            self._quota = None

    def _parent_exited(self, exit_: ParentExit) -> None:
        if self._on_parent_exit is not None:
            self._on_parent_exit(exit_)

    def _read_quota(self) -> None:
        """The scratch quota's events; if they cannot be taken in, no run goes on unwatched."""
        quota = self._quota
        if quota is None:
            return
        try:
            quota.read()
        except Exception:  # noqa: BLE001 - fail closed, whatever went wrong
            quota.fail("the run's scratch folder could not be accounted for")

    # -- running --------------------------------------------------------------------------------

    async def run(
        self, job: Job, on_progress: OnProgress | None = None, *, slot: Slot | None = None
    ) -> Outcome:
        """Run one job in a fresh child and return how it ended. ``on_progress`` (given for an
        async job) receives each ``progress()`` report the script makes, checked. ``slot`` is
        a slot of this pool's capacity the caller already holds; without one the run waits
        for a slot of its own."""
        if self._closed:
            raise PoolClosed("the pool is closed")
        if slot is None:
            async with self.capacity.slot() as held:
                return await self._run_held(job, on_progress, held.waited)
        if slot.capacity is not self.capacity or not slot.held or slot.in_use:
            raise PoolError("the run's slot is not one of this pool's, no longer held, or in use")
        slot.in_use = True
        try:
            return await self._run_held(job, on_progress, 0.0)
        finally:
            slot.in_use = False

    async def _run_held(self, job: Job, on_progress: OnProgress | None, waited: float) -> Outcome:
        """The run, in a slot held; ``waited`` is the seconds this pool waited for it."""
        if self.config.mode == "fresh":
            return await self._run_fresh(job, on_progress)
        queued = time.perf_counter()
        outputs: list[OutputFile] = []
        tier = self.tier_for(job.source)
        parent = self._parents[tier]
        try:
            child = await parent.take_child(job.timeout)
            wait_ms = (time.perf_counter() - queued + waited) * 1000
            self._running.add(child)
            self._runs[tier] += 1
            started = time.perf_counter()
            code = self._code.get(job.source) if parent.code_matches else None
            try:
                outcome, outputs = await self._run_in(child, job, code, on_progress)
                if outcome.compiled and code is None:
                    self._learn(job.source, parent.code_matches)
            finally:
                self._running.discard(child)
                child.release()
                if not outputs:
                    child.forget()
            if outputs:
                try:
                    outcome, outputs = await self._settled_outputs(child, outcome, outputs)
                finally:
                    child.forget()
            duration_ms = (time.perf_counter() - started) * 1000
            return Outcome(
                status=outcome.status,
                result=outcome.result,
                error=outcome.error,
                stdout=outcome.stdout,
                duration_ms=duration_ms,
                wait_ms=wait_ms,
                files=tuple(outputs),
                tier=tier,
            )
        except BaseException:
            close_all(outputs)
            raise

    async def _settled_outputs(
        self, child: Child, outcome: protocol.RunResult, outputs: list[OutputFile]
    ) -> tuple[protocol.RunResult, list[OutputFile]]:
        """The output files once the run's process is gone (so they no longer change), with
        their final sizes; a run that grew them past the limit meanwhile ends output_limit."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_STATUS_WAIT):
                await asyncio.shield(child.exited)
        settled = [
            msgspec.structs.replace(item, size=os.fstat(item.fd).st_size) for item in outputs
        ]
        if sum(item.size for item in settled) <= self.config.out_files_mb * 1024 * 1024:
            return outcome, settled
        close_all(settled)
        refused = OutputRefused(f"the files in out/ hold more than {self.config.out_files_mb} MB")
        return _output_limit(outcome, refused), []

    async def _run_fresh(self, job: Job, on_progress: OnProgress | None) -> Outcome:
        """The naive way, for comparison: a new interpreter for this run, which imports what
        the script imports."""
        single = msgspec.structs.replace(
            self.config, mode="warm", workers=1, warm_children=1, preload=False
        )
        async with Pool(single) as pool:
            return await pool.run(job, on_progress)

    def _watch_scratch(self, child: Child) -> Usage | None:
        """Account for the child's scratch folder; past a limit the child is killed."""
        if self._quota is None:
            return None
        folder = os.path.join(child.parent.scratch_root, child.folder)
        return self._quota.watch(
            folder, child.pid, self._limits, lambda _reason: child.signal(signal.SIGKILL)
        )

    def _learn(self, source: str, code_matches: bool) -> None:
        """Compile a script that ran, here, off the request's path: later runs of the same
        source get their own copy of the code instead of compiling it again."""
        if not code_matches or not self._code.wants(source) or self._closed:
            return
        if source in self._learning or len(self._learning) >= LEARNING_AT_ONCE:
            return

        async def learn() -> None:
            try:
                code = await asyncio.to_thread(compile_to_marshal, source)
                if code is not None:
                    self._code.put(source, code)
            finally:
                self._learning.pop(source, None)

        self._learning[source] = asyncio.get_running_loop().create_task(learn())

    async def _run_in(
        self, child: Child, job: Job, code: bytes | None, on_progress: OnProgress | None
    ) -> tuple[protocol.RunResult, list[OutputFile]]:
        """Place the job's input files, hand the job to the child and answer its broker
        requests until it answers; open what it left in ``out/`` if it ended ``ok``. A run
        past its scratch quota ends ``disk_limit`` whatever it answered."""
        child.sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=child.sock)
        usage: Usage | None = None
        try:
            try:
                # The child says it is isolated and its scratch folder exists; only then can
                # the folder be watched (it was sent while the child waited, so it is there).
                async with asyncio.timeout(CHILD_WAIT_FLOOR):
                    ready = await _read_message(reader, protocol.CONTROL_PACKET_MAX)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ProtocolError):
                return await self._lost(child), []
            if not isinstance(ready, protocol.ChildReady):
                return await self._lost(child), []
            usage = self._watch_scratch(child)
            folder = os.path.join(child.parent.scratch_root, child.folder)
            try:
                if job.inputs:
                    await asyncio.to_thread(place_inputs, folder, job.inputs)
            except (OSError, ValueError) as exc:
                result = _not_placed(exc)
            else:
                result = await self._exchange(
                    child, reader, writer, job, code, on_progress=on_progress
                )
            if usage is not None and self._quota is not None:
                # The child is still there, its files open, until its socket is closed.
                self._quota.settle(usage)
                if usage.exceeded is not None:
                    result = _disk_limit(usage, result)
            if result.status != "ok":
                return result, []
            try:
                return result, open_outputs(
                    folder,
                    max_files=self.config.out_files,
                    max_bytes=self.config.out_files_mb * 1024 * 1024,
                )
            except OutputRefused as exc:
                return _output_limit(result, exc), []
        finally:
            if usage is not None and self._quota is not None:
                self._quota.release(usage)
            writer.transport.abort()

    async def _exchange(
        self,
        child: Child,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        job: Job,
        code: bytes | None,
        *,
        on_progress: OnProgress | None,
    ) -> protocol.RunResult:
        limit = self.config.result_limit + 4 * self.config.stdout_limit + 65536
        request = protocol.RunRequest(
            source=job.source,
            ctx=job.ctx,
            timeout=job.timeout,
            code=code,
            progress=on_progress is not None,
        )
        deadline = time.monotonic() + job.timeout
        network = RunNetwork()
        reports = _Budget(per_second=REPORTS_PER_SECOND, burst=REPORTS_BURST)
        try:
            writer.write(protocol.frame(request))
            async with asyncio.timeout(job.timeout):
                await writer.drain()
                while True:
                    message = await _read_message(reader, limit)
                    if isinstance(message, protocol.RunResult):
                        return message
                    if isinstance(message, protocol.ChildReady):
                        raise ProtocolError("the child said it was ready twice")
                    if isinstance(message, protocol.Progress):
                        if not reports.take():
                            # Faster than the builtin ever sends: written to the socket by a
                            # script below the policy. Its run ends here.
                            child.signal(signal.SIGKILL)
                            return _progress_flood()
                        if on_progress is not None:
                            on_progress(message.fraction, message.message)
                        continue
                    answer, connected = await self._broker.answer(network, message, deadline)
                    await _send_answer(child.sock, writer, answer, connected)
        except TimeoutError:
            return await self._stop_late(child, reader, limit, job.timeout)
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError):
            return await self._lost(child)

    async def _stop_late(
        self, child: Child, reader: asyncio.StreamReader, limit: int, timeout: float
    ) -> protocol.RunResult:
        """The deadline passed: ask the child to stop, then kill it after a grace period."""
        child.signal(signal.SIGTERM)
        stdout = ""
        traceback = None
        with contextlib.suppress(
            TimeoutError, asyncio.IncompleteReadError, ConnectionError, ProtocolError
        ):
            async with asyncio.timeout(self.config.kill_grace):
                late = await _read_result(reader, limit)
                stdout = late.stdout
                traceback = late.error.traceback if late.error is not None else None
        child.signal(signal.SIGKILL)
        return protocol.RunResult(
            status="timeout",
            error=ErrorInfo(
                code="timeout",
                type="Timeout",
                message=f"the script did not finish within its timeout of {timeout:g} s",
                traceback=traceback,
            ),
            stdout=stdout,
        )

    async def _lost(self, child: Child) -> protocol.RunResult:
        """The child closed its socket without an answer: say why, from its exit status."""
        returncode: int | None = None
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(EXIT_STATUS_WAIT):
                returncode = await asyncio.shield(child.exited)
        code, message = _explain_exit(returncode, self.config.memory_mb)
        return protocol.RunResult(
            status="error", error=ErrorInfo(code=code, type="WorkerLost", message=message)
        )


async def _read_message(reader: asyncio.StreamReader, limit: int) -> protocol.FromChild:
    header = await reader.readexactly(protocol.HEADER_SIZE)
    length = protocol.frame_length(header, limit)
    return protocol.decode_from_child(await reader.readexactly(length))


async def _read_result(reader: asyncio.StreamReader, limit: int) -> protocol.RunResult:
    """The run's result, passing over broker requests (a stopping run gets no answers)."""
    while True:
        message = await _read_message(reader, limit)
        if isinstance(message, protocol.RunResult):
            return message


async def _send_answer(
    sock: socket.socket,
    writer: asyncio.StreamWriter,
    answer: protocol.BrokerAnswer,
    connected: socket.socket | None,
) -> None:
    """Send the broker's answer; a connected socket goes with it (SCM_RIGHTS) and is closed."""
    data = protocol.frame(answer)
    if connected is None:
        writer.write(data)
        await writer.drain()
        return
    try:
        await writer.drain()  # nothing of ours may be queued ahead of the descriptor
        loop = asyncio.get_running_loop()
        while True:
            try:
                sent = socket.send_fds(sock, [data], [connected.fileno()])
                break
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(sock.fileno(), ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_writer(sock.fileno())
        if sent < len(data):
            writer.write(data[sent:])
            await writer.drain()
    finally:
        connected.close()


def _disk_limit(usage: Usage, ended: protocol.RunResult) -> protocol.RunResult:
    """The run went past its scratch quota: that is how it ended, whatever it answered."""
    return protocol.RunResult(
        status="error",
        error=ErrorInfo(code="disk_limit", type="DiskLimit", message=usage.exceeded or ""),
        stdout=ended.stdout,
    )


class _Budget:
    """A token bucket: ``burst`` at once, refilled at ``per_second``."""

    def __init__(self, *, per_second: float, burst: int) -> None:
        self.per_second = per_second
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _progress_flood() -> protocol.RunResult:
    return protocol.RunResult(
        status="error",
        error=ErrorInfo(
            code="policy_violation",
            type="PolicyViolation",
            message="refused by the sandbox policy: the run sent progress reports faster "
            "than progress() sends them (written to its socket directly)",
        ),
    )


def _output_limit(ended: protocol.RunResult, refused: OutputRefused) -> protocol.RunResult:
    return protocol.RunResult(
        status="error",
        error=ErrorInfo(code="output_limit", type="OutputLimit", message=str(refused)),
        stdout=ended.stdout,
    )


def _not_placed(exc: Exception) -> protocol.RunResult:
    return protocol.RunResult(
        status="error",
        error=ErrorInfo(
            code="worker_lost",
            type="WorkerLost",
            message=f"the request's files could not be placed in the run's folder: {exc}",
        ),
    )


def _explain_exit(returncode: int | None, memory_mb: int) -> tuple[ErrorCode, str]:
    if returncode is None:
        return "worker_lost", "the worker process ended without an answer"
    if returncode == -signal.SIGKILL:
        return (
            "memory_limit",
            "the worker process was killed by SIGKILL, most likely for using too much memory "
            f"(limit {memory_mb} MB)",
        )
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return "worker_lost", f"the worker process died of {name}"
    return "worker_lost", f"the worker process exited with code {returncode} before answering"
