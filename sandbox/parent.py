"""The pool's side of one warm parent: start it, take its waiting children, restart it.

A warm parent (``sandbox.zygote``) is started as a process of its own with a control socket.
It reports each child it forks (with the child's socket and a pidfd) and each child's exit.
When it dies its waiting children are dropped and a new one is started after a backoff; each
exit is reported with its cause. A parent that keeps dying soon after it starts is a crash
loop: after ``CRASH_LOOP_LIMIT`` such exits in a row the restarts stop and the parent stays
halted (the replica's readiness says why), as a supervisor should rather than spin.
Every wait for a process is asynchronous: its pidfd turns readable when it exits.
"""

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

from sandbox import protocol
from sandbox.cleanup import remove_tree
from sandbox.compiler import code_format
from sandbox.config import PoolConfig
from sandbox.errors import ProtocolError, WarmParentFailed
from sandbox.isolation import LayerStatus
from sandbox.tiers import Tier, preload_for

START_TIMEOUT = 120.0
PARENT_EXIT_WAIT = 1.0
KILLED_EXIT_WAIT = 5.0
RESTART_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)
# A warm parent that dies sooner than this after starting counts as part of a crash loop: the
# next restart waits the next, longer step of the backoff instead of starting over.
STABLE_SECONDS = 30.0
# Quick exits (or failed starts) in a row after which the restarts stop.
CRASH_LOOP_LIMIT = 6
CHILD_WAIT_FLOOR = 2.0


@dataclass(frozen=True)
class ParentExit:
    """A warm parent's exit, as reported to the pool's owner."""

    tier: str
    pid: int | None
    returncode: int | None
    cause: str
    uptime_s: float
    expected: bool
    """The pool stopped it (closing, or after a failed start)."""
    restarting: bool
    halted: str | None
    """Set when this exit ended the restarts: why."""


OnParentExit = Callable[[ParentExit], None]


@dataclass(eq=False)
class Child:
    """A forked child waiting for its one run."""

    pid: int
    folder: str
    sock: socket.socket
    pidfd: int
    exited: asyncio.Future[int] = field(repr=False)
    parent: Parent = field(repr=False)

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

    def forget(self) -> None:
        """Stop waiting for the child's exit status."""
        self.parent.exits.pop(self.pid, None)


class Parent:
    """One warm parent of a tier, restarted when it dies (until it crash-loops)."""

    def __init__(self, tier: Tier, config: PoolConfig, on_exit: OnParentExit) -> None:
        self.tier = tier
        self.config = config
        self.on_exit = on_exit
        self.preload = preload_for(tier, config)
        self.ready: asyncio.Queue[Child] = asyncio.Queue()
        self.exits: dict[int, asyncio.Future[int]] = {}
        self.starts = 0
        self.halted: str | None = None
        self.failed_imports: list[str] = []
        self.layers: list[LayerStatus] = []
        self.scratch_root = ""
        self.code_matches = False
        self.timings: dict[str, float] = {}
        self.huge_pages_mb = 0.0
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._restarting: asyncio.Task[None] | None = None
        self._losing: asyncio.Task[None] | None = None
        self._closed = False
        self._accepted: frozenset[str] | None = None  # the layers of the first start
        self._serving = False  # started, and its control socket open
        self._started_at = 0.0
        self._quick_losses = 0

    @property
    def live(self) -> bool:
        """Running and taking spawn orders (not being restarted, not halted)."""
        return not self._closed and self._serving

    @property
    def warm(self) -> int:
        return self.ready.qsize()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the warm parent and wait until it has imported its modules."""
        loop = asyncio.get_running_loop()
        ours = self._launch()
        ours.setblocking(False)
        self._control = ours
        self.starts += 1
        self._started_at = time.monotonic()
        try:
            start = protocol.Start(config=self.config, tier=self.tier)
            await loop.sock_sendall(ours, protocol.encode_control(start))
            async with asyncio.timeout(START_TIMEOUT):
                data = await loop.sock_recv(ours, protocol.CONTROL_PACKET_MAX)
            started = protocol.decode_from_parent(data) if data else None
        except (OSError, TimeoutError, ProtocolError) as exc:
            await self._stop(f"did not start: {exc!r}", failed=True)
            raise WarmParentFailed(f"the {self.tier} warm parent did not start: {exc!r}") from exc
        except asyncio.CancelledError:
            await self._stop("start cancelled")
            raise
        if not isinstance(started, protocol.Started):
            await self._stop("exited while starting", failed=True)
            raise WarmParentFailed(f"the {self.tier} warm parent exited while starting")
        await self._check_layers(started.layers)
        self.failed_imports = started.failed_imports
        self.layers = started.layers
        self.scratch_root = started.scratch_root
        self.code_matches = started.code_format == code_format()
        self.timings = started.timings
        self.huge_pages_mb = started.huge_pages_mb
        loop.add_reader(ours.fileno(), self._on_control)
        self._serving = True
        self.spawn(self.config.warm_children)

    def _launch(self) -> socket.socket:
        """Start the warm parent's process; return the pool's end of its control socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {key: os.environ[key] for key in self.config.passthrough_env if key in os.environ}
        env.setdefault("PATH", os.defpath)
        # Numeric libraries must not start thread pools in a process that forks.
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        python = self.config.python or sys.executable
        try:
            # S603: our own interpreter and module (fork and exec return at once).
            self._process = subprocess.Popen(  # noqa: S603
                # The tier is in the command line for ps and tests; the parent reads it from
                # the start message.
                [python, "-m", "sandbox.zygote", str(theirs.fileno()), self.tier],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._pidfd = os.pidfd_open(self._process.pid)
        except OSError as exc:
            ours.close()
            if self._process is not None:
                # Never told to start: it dies at once (reaped by subprocess's own clean-up
                # if not by the poll here; no blocking wait on the event loop).
                self._process.kill()
                self._process.poll()
            self._process = None
            raise WarmParentFailed(f"the {self.tier} warm parent did not start: {exc!r}") from exc
        finally:
            theirs.close()
        return ours

    async def _check_layers(self, layers: list[LayerStatus]) -> None:
        """A restarted parent must isolate its children as the first one did: a layer that
        stopped working on the host meanwhile (a user removed, say) fails the start."""
        active = frozenset(layer.name for layer in layers if layer.active)
        if self._accepted is None:
            self._accepted = active
            return
        if self._accepted <= active:
            return
        missing = ", ".join(sorted(self._accepted - active))
        await self._stop(f"started without isolation layers it had: {missing}", failed=True)
        raise WarmParentFailed(
            f"the {self.tier} warm parent started without the isolation layers it had before: "
            f"{missing}"
        )

    async def close(self) -> None:
        """Stop the warm parent and every waiting child; wait for the parent to exit."""
        self._closed = True
        for task in (self._restarting, self._losing):
            if task is not None:
                task.cancel()
        await self._stop("stopped by the pool")
        for waiter in self.exits.values():
            if not waiter.done():
                waiter.cancel()

    async def _stop(self, why: str, *, failed: bool = False) -> None:
        """Close the control socket (the parent then kills its children, removes their folders
        and exits), wait for the exit, SIGKILL if it takes over a second; report it (``failed``:
        as a crash, the parent could not be started)."""
        self._unwire()
        reaped = await self._reap()
        if reaped is None:
            return
        pid, returncode = reaped
        cause = f"{why} ({_cause(returncode)})"
        restarting = failed and self._restarting is not None and not self._closed
        self._report(pid, returncode, cause, expected=not failed, restarting=restarting)

    async def _reap(self) -> tuple[int, int | None] | None:
        """Take the parent's process (None if there is none), wait without blocking for it to
        exit (SIGKILL after a second), close its pidfd and remove its scratch root: its pid and
        exit code (None if it outlived even the kill)."""
        process, pidfd = self._process, self._pidfd
        if process is None:
            return None
        self._process, self._pidfd = None, -1
        try:
            returncode = await _exited(process, pidfd, PARENT_EXIT_WAIT)
            if returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                returncode = await _exited(process, pidfd, KILLED_EXIT_WAIT)
        finally:
            with contextlib.suppress(OSError):
                os.close(pidfd)
        if self.scratch_root:
            remove_tree(self.scratch_root)
            self.scratch_root = ""
        return process.pid, returncode

    def _unwire(self) -> None:
        """Stop listening to the parent and drop its waiting children."""
        self._serving = False
        if self._control is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._control.fileno())
            self._control.close()
            self._control = None
        while not self.ready.empty():
            self.drop(self.ready.get_nowait())

    def drop(self, child: Child) -> None:
        """Kill a child that will not run and forget its exit status."""
        child.release()
        child.forget()

    def spawn(self, count: int) -> None:
        """Order ``count`` more waiting children."""
        if self._control is None or count <= 0:
            return
        try:
            self._control.send(protocol.encode_control(protocol.Spawn(count=count)))
        except OSError:
            self._lost()

    async def take_child(self, timeout: float) -> Child:
        """A live waiting child (one that died while waiting is dropped), and order another."""
        # The wait for a child is not part of the script's time, so a tiny timeout does not
        # make it shorter than a fork takes.
        if self.halted:
            raise WarmParentFailed(f"no worker process can start: {self.halted}")
        wait = max(timeout, CHILD_WAIT_FLOOR)
        try:
            async with asyncio.timeout(wait):
                while True:
                    child = await self.ready.get()
                    self.spawn(1)
                    if child.alive():
                        return child
                    self.drop(child)
        except TimeoutError:
            why = f"; the {self.tier} warm parent is restarting" if not self.live else ""
            if self.halted:
                why = f"; {self.halted}"
            raise WarmParentFailed(
                f"no worker process became ready within {wait:g} s{why}"
            ) from None

    # -- the parent's reports -------------------------------------------------------------------

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
                self._lost()
                return
            try:
                message = protocol.decode_from_parent(data)
            except ProtocolError:
                for fd in fds:
                    os.close(fd)
                continue
            if isinstance(message, protocol.Ready) and len(fds) == 2:
                exited: asyncio.Future[int] = loop.create_future()
                self.exits[message.pid] = exited
                child = Child(
                    message.pid,
                    message.folder,
                    socket.socket(fileno=fds[0]),
                    fds[1],
                    exited,
                    self,
                )
                if self._closed:
                    child.release()
                else:
                    self.ready.put_nowait(child)
            elif isinstance(message, protocol.Exited):
                waiter = self.exits.pop(message.pid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message.returncode)
            else:
                for fd in fds:
                    os.close(fd)

    def _lost(self) -> None:
        """The warm parent's control socket closed: it died. Reap it and restart it."""
        if self._losing is not None or self._process is None:
            return
        self._unwire()
        self._losing = asyncio.get_running_loop().create_task(self._after_loss())

    async def _after_loss(self) -> None:
        uptime = time.monotonic() - self._started_at
        try:
            reaped = await self._reap()
        finally:
            self._losing = None
        if reaped is None:
            return
        pid, returncode = reaped
        self._quick_losses = self._quick_losses + 1 if uptime < STABLE_SECONDS else 0
        cause = _cause(returncode)
        if self._closed:
            self._report(pid, returncode, cause, expected=False, restarting=False)
            return
        if self._quick_losses >= CRASH_LOOP_LIMIT:
            self._halt(pid, returncode, cause, uptime)
            return
        self._report(pid, returncode, cause, expected=False, restarting=True, up=uptime)
        if self._restarting is None:
            self._restarting = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        try:
            # Losses in quick succession start further along the backoff: a crash loop slows
            # down to one attempt every few seconds, and stops after CRASH_LOOP_LIMIT.
            while not self._closed:
                attempt = max(self._quick_losses - 1, 0)
                await asyncio.sleep(RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)])
                try:
                    await self.start()
                except WarmParentFailed as exc:
                    self._quick_losses += 1
                    if self._quick_losses >= CRASH_LOOP_LIMIT:
                        self._halt(None, None, str(exc), 0.0)
                        return
                    continue
                return
        finally:
            self._restarting = None

    def _halt(self, pid: int | None, returncode: int | None, cause: str, uptime: float) -> None:
        self.halted = (
            f"the {self.tier} warm parent exited {self._quick_losses} times in a row within "
            f"{STABLE_SECONDS:g} s of starting (last: {cause}); restarts stopped"
        )
        self._report(pid, returncode, cause, expected=False, restarting=False, up=uptime)

    def _report(
        self,
        pid: int | None,
        returncode: int | None,
        cause: str,
        *,
        expected: bool,
        restarting: bool,
        up: float | None = None,
    ) -> None:
        uptime = time.monotonic() - self._started_at if up is None else up
        exit_ = ParentExit(
            tier=self.tier,
            pid=pid,
            returncode=returncode,
            cause=cause,
            uptime_s=round(uptime, 3),
            expected=expected,
            restarting=restarting,
            halted=self.halted,
        )
        with contextlib.suppress(Exception):  # a reporting defect must not stop the restarts
            self.on_exit(exit_)


async def _exited(process: subprocess.Popen[bytes], pidfd: int, timeout: float) -> int | None:
    """Wait up to ``timeout`` seconds, without blocking the loop, for ``process`` to exit;
    reap it and return its exit code (None if it still runs)."""
    if process.poll() is not None:
        return process.returncode
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(pidfd, on_readable)
    try:
        async with asyncio.timeout(timeout):
            await gone
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(pidfd)
    return process.poll()


def _cause(returncode: int | None) -> str:
    if returncode is None:
        return "did not exit when told to and was killed"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"
