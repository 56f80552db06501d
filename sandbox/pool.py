"""The pool: a warm parent process, its waiting children, and one run per child with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from sandbox import protocol
from sandbox.api import ErrorCode, ErrorInfo, Job, Outcome, OutputFile
from sandbox.broker import Broker, RunNetwork
from sandbox.cleanup import remove_tree
from sandbox.compiler import CodeCache, code_format, compile_to_marshal
from sandbox.config import PoolConfig
from sandbox.errors import PoolClosed, ProtocolError, WarmParentFailed
from sandbox.files import OutputRefused, close_all, open_outputs, place_inputs
from sandbox.isolation import LayerStatus, network_rules
from sandbox.quota import Limits, ScratchQuota, Usage

START_TIMEOUT = 120.0
EXIT_STATUS_WAIT = 2.0
PARENT_EXIT_WAIT = 1.0
RESTART_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)
# A warm parent that dies sooner than this after starting counts as part of a crash loop: the
# next restart waits the next, longer step of the backoff instead of starting over.
STABLE_SECONDS = 30.0
CHILD_WAIT_FLOOR = 2.0
LEARNING_AT_ONCE = 4
# Progress frames a run may send: the builtin sends at most 5 a second (and one at the end).
REPORTS_PER_SECOND = 10.0
REPORTS_BURST = 20
# Receives a job's progress reports: (fraction 0..1 or None, message).
OnProgress = Callable[[float | None, str], None]


@dataclass(eq=False)
class _Child:
    """A forked child waiting for its one run."""

    pid: int
    folder: str
    sock: socket.socket
    pidfd: int
    exited: asyncio.Future[int] = field(repr=False)

    def signal(self, signum: int) -> None:
        """Signal the child (and its process group) unless it is gone already."""
        if self.exited.done():
            return
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, signum)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def alive(self) -> bool:
        """True unless the child has exited (its pidfd turns readable when it does)."""
        if self.exited.done():
            return False
        try:
            readable, _, _ = select.select([self.pidfd], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def release(self) -> None:
        """Kill the child if it still runs and close what this side holds of it."""
        self.signal(signal.SIGKILL)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


class Pool:
    """Runs jobs in fresh child processes forked from one warm parent.

    ``async with Pool(config) as pool: outcome = await pool.run(job)``. At most
    ``config.workers`` jobs run at once; more wait their turn. Every job gets a process of
    its own that exits after the run.
    """

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self._slots = asyncio.Semaphore(config.workers)
        self._ready: asyncio.Queue[_Child] = asyncio.Queue()
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._control: socket.socket | None = None
        self._parent: subprocess.Popen[bytes] | None = None
        self._restarting: asyncio.Task[None] | None = None
        self._closed = False
        self._running: set[_Child] = set()
        self.failed_imports: list[str] = []
        self.layers: list[LayerStatus] = []
        self._scratch_root = ""
        self.timings: dict[str, float] = {}
        self._code = CodeCache()
        self._code_matches = False
        self._learning: dict[str, asyncio.Task[None]] = {}
        self._broker = Broker(network_rules(config))
        self._quota: ScratchQuota | None = None
        self._limits = Limits(
            max_bytes=config.scratch_limit_mb * 1024 * 1024, max_files=config.scratch_files
        )
        self.parent_starts = 0
        self._started_at = 0.0
        self._quick_losses = 0

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
        """Children forked and waiting for a job."""
        return self._ready.qsize()

    @property
    def live(self) -> bool:
        """Whether a run started now would get a process: open, and (warm mode) with its warm
        parent running rather than being restarted."""
        if self._closed:
            return False
        return self.config.mode == "fresh" or self._control is not None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> Pool:
        """Start the warm parent and wait until it has imported the libraries."""
        if self.config.mode == "fresh":
            # Each run starts its own; one is started here only to learn the layers.
            async with Pool(msgspec.structs.replace(self.config, mode="warm")) as probe:
                self.failed_imports, self.layers = probe.failed_imports, probe.layers
                self.timings = probe.timings
            return self
        await self._start_parent()
        if any(layer.name == "limits" and layer.active for layer in self.layers):
            self._quota = ScratchQuota()
            asyncio.get_running_loop().add_reader(self._quota.fd, self._read_quota)
        return self

    async def close(self) -> None:
        """Stop the warm parent and every waiting child. Running jobs are killed."""
        self._closed = True
        if self._restarting is not None:
            self._restarting.cancel()
        for task in self._learning.values():
            task.cancel()
        self._stop_parent()
        while not self._ready.empty():
            self._drop(self._ready.get_nowait())
        for child in self._running:
            child.signal(signal.SIGKILL)
        for waiter in self._exits.values():
            if not waiter.done():
                waiter.cancel()
        if self._quota is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._quota.fd)
            self._quota.close()
            self._quota = None

    async def _start_parent(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {key: os.environ[key] for key in self.config.passthrough_env if key in os.environ}
        env.setdefault("PATH", os.defpath)
        # Numeric libraries must not start thread pools in a process that forks.
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        python = self.config.python or sys.executable
        try:
            # S603: our own interpreter and module. ASYNC220: fork+exec returns at once.
            self._parent = subprocess.Popen(  # noqa: S603, ASYNC220
                [python, "-m", "sandbox.zygote", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        self.parent_starts += 1
        try:
            await loop.sock_sendall(
                ours, protocol.encode_control(protocol.Start(config=self.config))
            )
            async with asyncio.timeout(START_TIMEOUT):
                data = await loop.sock_recv(ours, protocol.CONTROL_PACKET_MAX)
            started = protocol.decode_from_parent(data) if data else None
        except (OSError, TimeoutError, ProtocolError) as exc:
            self._stop_parent()
            raise WarmParentFailed(f"the warm parent did not start: {exc!r}") from exc
        except asyncio.CancelledError:
            self._stop_parent()
            raise
        if not isinstance(started, protocol.Started):
            self._stop_parent()
            raise WarmParentFailed("the warm parent exited while starting")
        self.failed_imports = started.failed_imports
        self.layers = started.layers
        self._scratch_root = started.scratch_root
        self._code_matches = started.code_format == code_format()
        self.timings = started.timings
        self._started_at = time.monotonic()
        loop.add_reader(ours.fileno(), self._on_control)
        self._spawn(self.config.warm_children)

    def _read_quota(self) -> None:
        """The scratch quota's events; if they cannot be taken in, no run goes on unwatched."""
        quota = self._quota
        if quota is None:
            return
        try:
            quota.read()
        except Exception:  # noqa: BLE001 - fail closed, whatever went wrong
            quota.fail("the run's scratch folder could not be accounted for")

    def _stop_parent(self) -> None:
        if self._control is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._control.fileno())
            self._control.close()
            self._control = None
        if self._parent is not None:
            # With its control socket closed the warm parent kills its children, removes
            # their scratch folders and exits; SIGKILL only if it does not within a second.
            try:
                self._parent.wait(timeout=PARENT_EXIT_WAIT)
            except subprocess.TimeoutExpired:
                self._parent.kill()
                self._parent.wait()
            self._parent = None
        if self._scratch_root:
            remove_tree(self._scratch_root)
            self._scratch_root = ""

    def _drop(self, child: _Child) -> None:
        """Kill a child that will not run and forget its exit status."""
        child.release()
        self._exits.pop(child.pid, None)

    def _spawn(self, count: int) -> None:
        if self._control is None or count <= 0:
            return
        try:
            self._control.send(protocol.encode_control(protocol.Spawn(count=count)))
        except OSError:
            self._parent_lost()

    def _on_control(self) -> None:
        """Read every pending control packet from the warm parent."""
        loop = asyncio.get_running_loop()
        while self._control is not None:
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    self._control, protocol.CONTROL_PACKET_MAX, 2
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._parent_lost()
                return
            try:
                message = protocol.decode_from_parent(data)
            except ProtocolError:
                for fd in fds:
                    os.close(fd)
                continue
            if isinstance(message, protocol.Ready) and len(fds) == 2:
                exited: asyncio.Future[int] = loop.create_future()
                self._exits[message.pid] = exited
                child = _Child(
                    message.pid, message.folder, socket.socket(fileno=fds[0]), fds[1], exited
                )
                if self._closed:
                    child.release()
                else:
                    self._ready.put_nowait(child)
            elif isinstance(message, protocol.Exited):
                waiter = self._exits.pop(message.pid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message.returncode)
            else:
                for fd in fds:
                    os.close(fd)

    def _parent_lost(self) -> None:
        """The warm parent died: drop its waiting children and start a new one."""
        if time.monotonic() - self._started_at < STABLE_SECONDS:
            self._quick_losses += 1
        else:
            self._quick_losses = 0
        # The restart is scheduled first: nothing in the clean-up may keep the pool without one.
        if not self._closed and self._restarting is None:
            self._restarting = asyncio.get_running_loop().create_task(self._restart())
        self._stop_parent()
        while not self._ready.empty():
            self._drop(self._ready.get_nowait())

    async def _restart(self) -> None:
        try:
            # Losses in quick succession start further along the backoff: a crash loop slows
            # down to one attempt every few seconds instead of spinning.
            first = max(self._quick_losses - 1, 0)
            for attempt in range(first, sys.maxsize):
                delay = RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)]
                await asyncio.sleep(delay)
                try:
                    await self._start_parent()
                except WarmParentFailed:
                    continue
                return
        finally:
            self._restarting = None

    # -- running --------------------------------------------------------------------------------

    async def run(self, job: Job, on_progress: OnProgress | None = None) -> Outcome:
        """Run one job in a fresh child and return how it ended. ``on_progress`` (given for an
        async job) receives each ``progress()`` report the script makes, checked."""
        if self._closed:
            raise PoolClosed("the pool is closed")
        if self.config.mode == "fresh":
            return await self._run_fresh(job, on_progress)
        queued = time.perf_counter()
        outputs: list[OutputFile] = []
        try:
            async with self._slots:
                child = await self._take_child(job.timeout)
                wait_ms = (time.perf_counter() - queued) * 1000
                self._running.add(child)
                started = time.perf_counter()
                code = self._code.get(job.source) if self._code_matches else None
                try:
                    outcome, outputs = await self._run_in(child, job, code, on_progress)
                    if outcome.compiled and code is None:
                        self._learn(job.source)
                finally:
                    self._running.discard(child)
                    child.release()
                    if not outputs:
                        self._exits.pop(child.pid, None)
                if outputs:
                    try:
                        outcome, outputs = await self._settled_outputs(child, outcome, outputs)
                    finally:
                        self._exits.pop(child.pid, None)
            duration_ms = (time.perf_counter() - started) * 1000
            return Outcome(
                status=outcome.status,
                result=outcome.result,
                error=outcome.error,
                stdout=outcome.stdout,
                duration_ms=duration_ms,
                wait_ms=wait_ms,
                files=tuple(outputs),
            )
        except BaseException:
            close_all(outputs)
            raise

    async def _settled_outputs(
        self, child: _Child, outcome: protocol.RunResult, outputs: list[OutputFile]
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
        async with self._slots:
            single = msgspec.structs.replace(
                self.config, mode="warm", workers=1, warm_children=1, preload=False
            )
            async with Pool(single) as pool:
                return await pool.run(job, on_progress)

    def _watch_scratch(self, child: _Child) -> Usage | None:
        """Account for the child's scratch folder; past a limit the child is killed."""
        if self._quota is None:
            return None
        folder = os.path.join(self._scratch_root, child.folder)
        return self._quota.watch(
            folder, child.pid, self._limits, lambda _reason: child.signal(signal.SIGKILL)
        )

    def _learn(self, source: str) -> None:
        """Compile a script that ran, here, off the request's path: later runs of the same
        source get their own copy of the code instead of compiling it again."""
        if not self._code_matches or not self._code.wants(source) or self._closed:
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

    async def _take_child(self, timeout: float) -> _Child:
        """A live waiting child (one that died while waiting is dropped), and order another."""
        # The wait for a child is not part of the script's time, so a tiny timeout does not
        # make it shorter than a fork takes.
        wait = max(timeout, CHILD_WAIT_FLOOR)
        try:
            async with asyncio.timeout(wait):
                while True:
                    child = await self._ready.get()
                    self._spawn(1)
                    if child.alive():
                        return child
                    self._drop(child)
        except TimeoutError:
            why = "" if self.live else "; the warm parent is restarting"
            raise WarmParentFailed(
                f"no worker process became ready within {wait:g} s{why}"
            ) from None

    async def _run_in(
        self, child: _Child, job: Job, code: bytes | None, on_progress: OnProgress | None
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
            folder = os.path.join(self._scratch_root, child.folder)
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
        child: _Child,
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
        self, child: _Child, reader: asyncio.StreamReader, limit: int, timeout: float
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

    async def _lost(self, child: _Child) -> protocol.RunResult:
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
