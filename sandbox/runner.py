"""Running one script inside a child process: compile, execute, capture, convert, answer."""

from __future__ import annotations

import builtins
import os
import signal
import sys
import time
import traceback
from types import CodeType, FrameType, TracebackType
from typing import Any

import msgspec

from sandbox import audit, hooks, netstub
from sandbox.api import ErrorCode, ErrorInfo
from sandbox.compiler import (
    ENTRY_POINT,
    FILENAME,
    compile_script,
    compile_to_marshal,
    compile_unrestricted,
    load_code,
)
from sandbox.convert import to_json_value
from sandbox.errors import NotSerializable, OutputFlood, PolicyViolation
from sandbox.isolation import Plan, limit_cpu
from sandbox.policy import Policy
from sandbox.progress import Reporter
from sandbox.protocol import RunRequest, RunResult, frame
from sandbox.trust import trusted_code

_JSON = msgspec.json.Encoder()
_TRACEBACK: Any = BaseException.__dict__["__traceback__"]
_WARM_UP = """
def execute(ctx):
    total = 0
    for item in ctx["warm"]:
        if isinstance(item, int | float):
            total += item
    return {"total": total, "items": sorted(str(i) for i in ctx["warm"])}
"""


# Compiled in the warm parent, when this module is imported (before any hook).
_WARM_UP_CODE = compile_to_marshal(_WARM_UP) or b""


class ScriptTimeout(BaseException):
    """Raised into the script when the pool's soft stop (SIGTERM) arrives."""


class Capture:
    """Where a run's printed output goes, kept up to a limit and marked where it was cut.

    Output past the limit is dropped; a script that goes on printing
    ``FLOOD_FACTOR`` times the limit (at least 1 MiB) is stopped with ``output_limit``.
    """

    FLOOD_FACTOR = 16

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.flood_limit = max(limit * self.FLOOD_FACTOR, 1024 * 1024)
        self._parts: list[str] = []
        self._size = 0
        self._offered = 0
        self.cut = False
        self.flooded = False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._offered += len(text)
        if self._offered > self.flood_limit:
            self.flooded = True
            raise OutputFlood(f"the script printed more than {self.flood_limit} characters")
        room = self.limit - self._size
        if len(text) > room:
            self.cut = self.cut or bool(text)
            text = text[: max(room, 0)]
        self._parts.append(text)
        self._size += len(text)
        return len(text)

    def flush(self) -> None:
        """Nothing to flush: the text is kept in memory."""

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        text = "".join(self._parts)
        if self.cut:
            text += f"\n[stdout cut at {self.limit} characters]"
        return text


class _PrintCollector:
    """What RestrictedPython's ``_print_`` hook makes: ``print`` writing into the capture."""

    def __init__(self, capture: Capture, _getattr_: Any = None) -> None:
        self._capture = capture

    def __call__(self) -> str:
        # The ``printed`` name: everything printed so far in this run.
        return self._capture.getvalue()

    def _call_print(self, *objects: Any, **kwargs: Any) -> None:
        if kwargs.get("file") is None:
            kwargs["file"] = self._capture
        print(*objects, **kwargs)


class Run:
    """One script's run in this process. Only one ever happens per child."""

    def __init__(self, plan: Plan, scratch: str, channel: netstub.Channel | None = None) -> None:
        config = plan.config
        self.config = config
        self.policy_on = "policy" in plan.layers
        self.limits_on = "limits" in plan.layers
        self.progress = Reporter(channel)
        self.policy = Policy(config.allowed_modules, scratch, {"progress": self.progress})
        if "network" in plan.layers and channel is not None:
            netstub.install(channel, self.policy.refuse)
        fresh_randomness()
        ours = None
        if self.policy_on:
            ours = hooks.install(
                self.policy.refuse, self.policy.lend, self.policy.is_script_namespace
            )
            self.policy.refuse_builtins_as_they_are()  # the hooked compile, eval and exec
        self.capture = Capture(config.stdout_limit)
        self.timed_out = False
        self.in_script = False
        self.compiled = False
        self._warm_up()
        if ours is not None:
            audit.install(self.policy.refuse, ours)

    def _warm_up(self) -> None:
        """Walk the run's code path once before the script arrives.

        A forked child shares the warm parent's memory until it writes to it; the first
        namespace, exec and encode of a run touch (and so copy) many pages. Doing that here,
        while the child waits, keeps it off the request's path. The warm-up's code comes
        compiled, as most scripts' do (the pool's code cache): the compiler's own pages are
        copied only by a run that compiles.
        """
        if not self.policy_on:
            compiled = compile_unrestricted(_WARM_UP)
        elif _WARM_UP_CODE:
            compiled = load_code(_WARM_UP_CODE)
        else:
            return
        if compiled.code is None:
            return
        namespace = self.policy.namespace(lambda _getattr_=None: _PrintCollector(Capture(16)))
        exec(compiled.code, namespace)  # noqa: S102 - our own constant source
        value = namespace["execute"]({"warm": [1, 2.5, "x", None]})
        frame(RunResult(status="ok", result=msgspec.Raw(_JSON.encode(to_json_value(value)))))

    def on_sigterm(self, _signum: int, _frame: FrameType | None) -> None:
        """The pool's soft stop at the timeout: interrupt the script once."""
        self.timed_out = True
        if self.in_script:
            self.in_script = False
            raise ScriptTimeout

    def execute(self, request: RunRequest) -> RunResult:
        """Run the script and describe how it ended; never raises."""
        if self.limits_on:
            limit_cpu(request.timeout)
        started = time.perf_counter()
        self.progress.start(request.progress)
        try:
            result = self._execute(request)
        finally:
            self.progress.finish()
        run_ms = (time.perf_counter() - started) * 1000
        return RunResult(
            status=result.status,
            result=result.result,
            error=result.error,
            stdout=self.capture.getvalue(),
            run_ms=run_ms,
            compiled=self.compiled,
        )

    def _execute(self, request: RunRequest) -> RunResult:
        source = request.source
        if self.policy_on:
            compiled = load_code(request.code) if request.code else compile_script(source)
            self.compiled = compiled.code is not None and request.code is None
        else:
            compiled = compile_unrestricted(source)
        if compiled.code is None:
            return RunResult(status="error", error=compiled.error)

        namespace = (
            self.policy.namespace(lambda _getattr_=None: _PrintCollector(self.capture))
            if self.policy_on
            else {"__builtins__": builtins, "__name__": "script", "progress": self.progress}
        )
        # Library output (print, warnings) joins the script's own, never the service's log.
        streams = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self.capture
        try:
            value = self._call(compiled.code, namespace, request.ctx)
        except BaseException as exc:  # noqa: BLE001 - every way a script fails is reported
            return self._failure(exc, source)
        finally:
            sys.stdout, sys.stderr = streams

        if self.policy.violations:
            return self._policy_failure()
        if self.capture.flooded:
            return self._flood_failure()
        try:
            encoded = _JSON.encode(to_json_value(value))
        # TypeError/ValueError: a value of the script's own making that converts badly (a
        # subclass whose conversion methods fail); it must not take the worker down.
        except (NotSerializable, RecursionError, TypeError, ValueError) as exc:
            return RunResult(
                status="error",
                error=ErrorInfo(
                    code="result_not_serializable", type=type(exc).__name__, message=str(exc)
                ),
            )
        except MemoryError:
            encoded = b""
        if not encoded or len(encoded) > self.config.result_limit:
            size = f"{len(encoded)} bytes" if encoded else "too large to encode"
            return RunResult(
                status="error",
                error=ErrorInfo(
                    code="output_limit",
                    type="OutputLimit",
                    message=f"the result is {size}, over the limit of "
                    f"{self.config.result_limit} bytes; return less data, or write it to a "
                    "file in out/ (stored and listed in the reply's files)",
                ),
            )
        # Sent as it is: the result is encoded once, here.
        return RunResult(status="ok", result=msgspec.Raw(encoded))

    def _call(self, code: CodeType, namespace: dict[str, Any], ctx: dict[str, Any]) -> Any:
        self.in_script = True
        try:
            exec(code, namespace)  # noqa: S102 - the restricted, guarded script is the point
            entry = namespace.get(ENTRY_POINT)
            if not callable(entry):
                raise TypeError(f"'{ENTRY_POINT}' is not a function")
            return entry(ctx)
        finally:
            self.in_script = False

    def _failure(self, exc: BaseException, source: str) -> RunResult:
        if self.timed_out or isinstance(exc, ScriptTimeout):
            return RunResult(
                status="timeout",
                error=ErrorInfo(
                    code="timeout",
                    type="Timeout",
                    message="the script did not finish within its timeout",
                    traceback=_script_traceback(exc, source),
                ),
            )
        if self.policy.violations or isinstance(exc, PolicyViolation):
            return self._policy_failure(exc, source)
        if self.capture.flooded:
            return self._flood_failure()
        code: ErrorCode = "memory_limit" if isinstance(exc, MemoryError) else "script_error"
        message = str(exc)
        if code == "memory_limit":
            message = f"the script ran out of memory (limit {self.config.memory_mb} MB)"
        return RunResult(
            status="error",
            error=ErrorInfo(
                code=code,
                type=type(exc).__name__,
                message=message,
                traceback=_script_traceback(exc, source),
            ),
        )

    def _flood_failure(self) -> RunResult:
        return RunResult(
            status="error",
            error=ErrorInfo(
                code="output_limit",
                type="OutputLimit",
                message=f"the script printed more than {self.capture.flood_limit} characters "
                f"and was stopped (stdout keeps the first {self.capture.limit})",
            ),
        )

    def _policy_failure(self, exc: BaseException | None = None, source: str = "") -> RunResult:
        refused = self.policy.violations[0] if self.policy.violations else str(exc)
        return RunResult(
            status="error",
            error=ErrorInfo(
                code="policy_violation",
                type="PolicyViolation",
                message=f"refused by the sandbox policy: {refused}",
                traceback=_script_traceback(exc, source) if exc is not None else None,
            ),
        )


@trusted_code
def _script_traceback(exc: BaseException, source: str) -> str | None:
    """The traceback of ``exc`` cut down to the script's own frames.

    It may read frames (``tb_frame``), so it reads nothing through the exception's class: a
    script's exception could say anything was its traceback."""
    lines = source.splitlines()
    frames: list[str] = []
    tb: TracebackType | None = _TRACEBACK.__get__(exc)
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename == FILENAME:
            lineno = tb.tb_lineno
            frames.append(f'  File "{FILENAME}", line {lineno}, in {code.co_name}\n')
            if 0 < lineno <= len(lines) and lines[lineno - 1].strip():
                frames.append(f"    {lines[lineno - 1].strip()}\n")
        tb = tb.tb_next
    if not frames:
        return None
    return "Traceback (most recent call last):\n" + "".join(frames) + _exception_line(exc)


def _exception_line(exc: BaseException) -> str:
    """The traceback's last line; the sandbox's own exception types go by their bare name."""
    if type(exc).__module__.startswith("sandbox."):
        text = str(exc)
        return f"{type(exc).__name__}: {text}\n" if text else f"{type(exc).__name__}\n"
    return "".join(traceback.format_exception_only(type(exc), exc))


_MT_WORDS = 624  # the state of numpy's legacy generator, MT19937


def fresh_randomness() -> None:
    """Random generators start from new entropy in every child (``random`` reseeds itself after
    fork; numpy's legacy global state does not)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        # A whole new Mersenne Twister state from the kernel: what seed() does, without the
        # seeding algorithm's cost on every run.
        key = numpy.frombuffer(os.urandom(_MT_WORDS * 4), dtype=numpy.uint32)
        numpy.random.set_state(("MT19937", key, _MT_WORDS, 0, 0.0))


def install_soft_stop(run: Run) -> None:
    """Make SIGTERM interrupt the script, so a timed-out run can still report its output."""
    signal.signal(signal.SIGTERM, run.on_sigterm)
