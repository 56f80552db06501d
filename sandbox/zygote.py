"""The warm parent: imports the libraries once, then forks one waiting child per run.

Started by the pool as ``python -m sandbox.zygote FD`` where FD is its end of a
SOCK_SEQPACKET control socket. It never runs a script itself. Each child it forks waits on
its own socket for exactly one run request, runs it, answers, and exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import mimetypes
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import msgspec

from sandbox import hugepages, isolation, protocol, seccomp
from sandbox.cleanup import remove_tree
from sandbox.compiler import code_format
from sandbox.doors import door_table
from sandbox.errors import ProtocolError
from sandbox.isolation import LAYERS, LayerStatus, Plan
from sandbox.netstub import Channel
from sandbox.runner import Run, install_soft_stop
from sandbox.tiers import preload_for
from sandbox.warmup import warm_up

REQUEST_LIMIT = 64 * 1024 * 1024
SPAWN_RETRY = 0.2  # seconds before a fork the system refused is tried again


def preload(modules: tuple[str, ...]) -> list[str]:
    """Import every allowed module so children start warm; return those that failed."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing optional library must not stop the parent
            failed.append(name)
    return failed


def probe(plan: Plan, statuses: list[LayerStatus]) -> tuple[Plan, list[LayerStatus]]:
    """Apply the OS layers one more at a time in throwaway children; keep those that work."""
    accepted = {"policy"} & plan.layers
    by_name = {status.name: status for status in statuses}
    for layer in LAYERS:
        if layer == "policy" or layer not in plan.layers:
            continue
        trial = dataclasses.replace(plan, layers=frozenset(accepted | {layer}))
        error = _try_isolation(trial)
        if error is None:
            accepted.add(layer)
        else:
            by_name[layer] = LayerStatus(layer, False, f"failed on this host: {error}")
    narrowed = dataclasses.replace(plan, layers=frozenset(accepted))
    return narrowed, [by_name[name] for name in LAYERS if name in by_name]


def _in_throwaway_child(plan: Plan, work: Callable[[str], bytes]) -> bytes:
    """Run ``work`` in a forked child that is discarded afterwards; return what it answered."""
    folder = isolation.new_scratch_name()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        answer = b""
        with contextlib.suppress(BaseException):
            answer = work(folder)
        os.write(write, answer)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer_pipe:
        answer = answer_pipe.read()
    os.waitpid(pid, 0)
    remove_tree(isolation.scratch_path(plan, folder))
    return answer


def _time_child(plan: Plan) -> dict[str, float]:
    """What one child spends on each step before and during a trivial run."""

    def work(folder: str) -> bytes:
        timings: dict[str, float] = {}
        with contextlib.suppress(Exception):
            scratch = isolation.enter(plan, folder, timings)
            started = time.perf_counter()
            run = Run(plan, scratch)
            timings["prepare the run (policy, guards, warm path)"] = _ms(started)
            started = time.perf_counter()
            run.execute(protocol.RunRequest(source=_TRIVIAL, ctx={}, timeout=5))
            timings["a trivial run"] = _ms(started)
        return msgspec.json.encode(timings)

    try:
        return msgspec.json.decode(_in_throwaway_child(plan, work), type=dict[str, float])
    except msgspec.DecodeError:
        return {}


_TRIVIAL = "def execute(ctx):\n    return 1\n"


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _try_isolation(plan: Plan) -> str | None:
    """None if the plan's layers apply in a child, otherwise what failed."""

    def work(folder: str) -> bytes:
        try:
            isolation.enter(plan, folder)
        except Exception as exc:  # noqa: BLE001 - the probe reports whatever failed
            return repr(exc).encode()[:500]
        return b"ok"

    result = _in_throwaway_child(plan, work)
    return None if result == b"ok" else (result.decode(errors="replace") or "the probe died")


class WarmParent:
    """Forks children on request and reports them (and their exits) to the pool."""

    def __init__(self, control: socket.socket, plan: Plan) -> None:
        self.control = control
        self.plan = plan
        self.children: dict[int, str] = {}  # pid -> its scratch folder's name
        self.owed = 0  # children the pool ordered that are not forked yet
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)

    def serve(self) -> NoReturn:
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while True:
            # Children ordered but not forked yet (the system was out of processes or memory)
            # are tried again after a pause; the parent never dies of it.
            wait = SPAWN_RETRY if self.owed else None
            try:
                readable, _, _ = select.select(
                    [self.control.fileno(), self.wake_read], [], [], wait
                )
            except InterruptedError:
                continue
            if self.wake_read in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_read, 4096)
                self._reap()
            if self.control.fileno() in readable:
                self._on_control()
            self._spawn_owed()

    def _on_sigterm(self, _signum: int, _frame: object) -> None:
        self._shutdown()

    def _on_control(self) -> None:
        try:
            data = self.control.recv(protocol.CONTROL_PACKET_MAX)
        except OSError:
            data = b""
        if not data:
            self._shutdown()
        try:
            message = protocol.decode_to_parent(data)
        except ProtocolError:
            return  # Nothing the pool sends is worth dying for; ignore what cannot be read.
        if isinstance(message, protocol.Spawn):
            self.owed += max(message.count, 0)

    def _spawn_owed(self) -> None:
        while self.owed > 0:
            if not self._spawn():
                return  # Try again in SPAWN_RETRY seconds.
            self.owed -= 1

    def _spawn(self) -> bool:
        """Fork one waiting child and hand it to the pool; False if the system refused (no
        process or memory left: a run may have used them up), to be tried again."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            return False
        folder = isolation.new_scratch_name()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return False
        if pid == 0:
            ours.close()
            self._become_child(theirs, folder)
        theirs.close()
        self.children[pid] = folder
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            # Without a pidfd the pool cannot watch it: the child goes, and another is tried.
            os.kill(pid, signal.SIGKILL)
            ours.close()
            return False
        try:
            socket.send_fds(
                self.control,
                [protocol.encode_control(protocol.Ready(pid=pid, folder=folder))],
                [ours.fileno(), pidfd],
            )
        except OSError:
            self._shutdown()  # The pool is gone.
        finally:
            ours.close()
            os.close(pidfd)
        return True

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            folder = self.children.pop(pid, None)
            if folder is not None:
                remove_tree(isolation.scratch_path(self.plan, folder))
            message = protocol.Exited(pid=pid, returncode=os.waitstatus_to_exitcode(status))
            with contextlib.suppress(OSError):
                self.control.send(protocol.encode_control(message))

    def _shutdown(self) -> NoReturn:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        remove_tree(self.plan.scratch_root)
        os._exit(0)

    def _become_child(self, sock: socket.socket, folder: str) -> NoReturn:
        """In the forked child: shed the parent's state, then serve exactly one run."""
        code = 70
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            self.control.close()
            os.close(self.wake_read)
            os.close(self.wake_write)
            # Nothing of the siblings stays in this process (their folders' names).
            self.children.clear()
            os.setsid()
            # Whatever C code writes to the terminal is dropped; Python output is captured.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.close(devnull)
            try:
                scratch = isolation.enter(self.plan, folder)
            except Exception:  # noqa: BLE001 - never run a script less isolated than promised
                code = isolation.ISOLATION_FAILED_EXIT
            else:
                code = serve_one(sock, self.plan, scratch)
        finally:
            os._exit(code)


def serve_one(sock: socket.socket, plan: Plan, scratch: str) -> int:
    """Wait for one run request on ``sock``, run it, send the result; return an exit code."""
    run = Run(plan, scratch, Channel(sock))
    install_soft_stop(run)
    try:
        sock.sendall(protocol.frame(protocol.ChildReady()))
        request = protocol.recv_request(sock, REQUEST_LIMIT)
    except (ProtocolError, OSError):
        return 0  # The pool closed this waiting child; nothing to run.
    result = run.execute(request)
    try:
        sock.sendall(protocol.frame(result))
        # Stay, with every file still open, until the pool has counted the scratch folder and
        # closes the socket.
        sock.recv(1)
    except OSError:
        return 1
    return 0


def main(argv: list[str]) -> NoReturn:
    control = socket.socket(fileno=int(argv[1]))
    first = protocol.decode_to_parent(control.recv(protocol.CONTROL_PACKET_MAX))
    if not isinstance(first, protocol.Start):
        raise SystemExit("warm parent: expected a start message first")
    started = time.perf_counter()
    failed = preload(preload_for(first.tier, first.config))
    timings = {"import libraries": round((time.perf_counter() - started) * 1000, 1)}
    if first.config.preload and first.tier == "full":
        timings.update({f"warm up {name}": ms for name, ms in warm_up().items()})
    plan, statuses = isolation.plan(first.config)
    plan, statuses = probe(plan, statuses)
    # Work every run would repeat is done once here and shared with the children.
    isolation.clean_environment(first.config)
    # Libraries imported on demand in a child read the system's MIME table (openpyxl's save,
    # through mimetypes) where Landlock no longer lets them: read it here, once.
    mimetypes.init()
    door_table()
    if "seccomp" in plan.layers:
        seccomp.prepare()
    timings.update({f"child: {step}": ms for step, ms in _time_child(plan).items()})
    # Objects made so far are shared with every child; keep the collector off them.
    gc.collect()
    gc.freeze()
    huge_mb = 0.0
    if first.config.huge_pages:
        collapsing = time.perf_counter()
        huge_mb = hugepages.collapse()
        timings["huge pages"] = _ms(collapsing)
    ready = protocol.Started(
        pid=os.getpid(),
        preload_ms=(time.perf_counter() - started) * 1000,
        failed_imports=failed,
        layers=statuses,
        scratch_root=plan.scratch_root,
        code_format=code_format(),
        timings=timings,
        huge_pages_mb=huge_mb,
    )
    control.send(protocol.encode_control(ready))
    WarmParent(control, plan).serve()


if __name__ == "__main__":
    main(sys.argv)
