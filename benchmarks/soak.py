"""Soak: a long mixed run against one replica, watching its memory, descriptors and processes.

Starts a nats-server (unless ``--nats-url`` is given) and one replica as a real process
(``python -m consumer serve``, 2 workers, JSON logs, metrics on a loopback port), then sends N
requests of every kind through ``pyexec_client.Client`` with bounded concurrency: ok scripts
(compute, unique sources, pandas, the named ``text.normalize`` and ``sql.transpile``,
MessagePack), script and syntax errors, policy violations, timeouts, memory limits, printed
output past the limit, results near and over the size limit, unauthorized and invalid bodies,
unknown scripts, async jobs, and bursts above the workers' capacity (``overloaded`` expected).

Every ``--sample-every`` requests (and after a warm-up, and at the end after an idle settle) it
lets the requests in flight finish, waits ``--settle`` seconds and reads from ``/proc``: the
replica's and the warm parent's RSS, their open descriptors, the replica's threads, its
descendant processes and zombies among them, and the run folders left in the scratch root. It
prints the samples, the requests by outcome, and a verdict per measure (flat when the growth
over the second half is within a tolerance). It is a benchmark: the verdicts are printed, the
exit code is 0 unless the harness itself broke.

Usage: ``python benchmarks/soak.py [--requests N] [--concurrency C] [--nats-url URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import contextvars
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyexec_client.client import Client
from pyexec_client.errors import ClientError
from pyexec_client.signing import SIGNATURE_HEADER, sign

from consumer import protocol
from consumer.config import environment_with
from consumer.embedded import EmbeddedNats, free_port

ROOT = Path(__file__).resolve().parent.parent
KEY_ID = "soak"
WORKERS = 2
QUEUE_LIMIT = 8  # small, so that the bursts overflow it
BURST = 32  # requests sent at once, once per block, on top of the steady callers

# -- the scripts ----------------------------------------------------------------------------------

COMPUTE = (
    "def execute(ctx):\n"
    "    total = 0\n"
    "    for i in range(ctx['n']):\n"
    "        total += i * i\n"
    "    print('summed', ctx['n'])\n"
    "    return {'total': total}\n"
)
PANDAS = (
    "import pandas as pd\n\n"
    "def execute(ctx):\n"
    "    df = pd.DataFrame(ctx['rows'])\n"
    "    out = df.groupby('region').agg(total=('amount', 'sum'), n=('amount', 'count'))\n"
    "    return out.reset_index()\n"
)
PANDAS_CTX = {
    "rows": [{"region": f"r{i % 5}", "amount": (i * 37) % 1000} for i in range(60)],
}
SCRIPT_ERROR = "def execute(ctx):\n    return 1 / 0\n"
SYNTAX_ERROR = "def execute(ctx)\n    return 1\n"
POLICY = "import os\n\ndef execute(ctx):\n    return os.getcwd()\n"
SPIN = "def execute(ctx):\n    while True:\n        pass\n"
MEMORY_HUGE = "def execute(ctx):\n    return len(bytearray(64 * 1024 ** 3))\n"
MEMORY_GROW = (
    "def execute(ctx):\n"
    "    chunks = []\n"
    "    while True:\n"
    "        chunks.append(b'x' * 10_000_000)\n"
)
STDOUT_CUT = (
    "def execute(ctx):\n"
    "    for i in range(20000):\n"
    "        print('line', i, 'of the output')\n"
    "    return 1\n"
)
STDOUT_FLOOD = (
    "def execute(ctx):\n    for i in range(40000):\n        print('y' * 40)\n    return 1\n"
)
RESULT_NEAR = "def execute(ctx):\n    return 'x' * 760_000\n"  # limit: 770,048 bytes encoded
RESULT_OVER = "def execute(ctx):\n    return 'x' * 800_000\n"
NOT_SERIALIZABLE = "def execute(ctx):\n    return object()\n"
NO_ENTRY = "def helper(ctx):\n    return 1\n"
BURST_WORK = (
    "import time\n\n"
    "def execute(ctx):\n"
    "    end = time.monotonic() + 0.05\n"
    "    while time.monotonic() < end:\n"
    "        pass\n"
    "    return 1\n"
)
# Full-width letters, an umlaut and runs of whitespace: NFKC and casefold change it.
NORMALIZE_CTX = {
    "text": "  \uff28\uff45\uff4c\uff4c\uff4f   W\u00f6rld\tof  pyexec ",
    "case": "casefold",
}
TRANSPILE_CTX = {
    "sql": "SELECT TOP 5 name, COUNT(*) AS n FROM orders GROUP BY name ORDER BY n DESC",
    "read": "tsql",
    "write": "postgres",
}

# -- the mix --------------------------------------------------------------------------------------


@dataclass
class Callers:
    """What a request kind may use: the JSON and MessagePack clients, and the subjects."""

    json: Client
    msgpack: Client
    prefix: str
    secret: bytes


# The kind being sent (set per request task), and the first error message seen per kind and
# outcome, so that an unexpected outcome is reported with what the replica said.
_kind: contextvars.ContextVar[str] = contextvars.ContextVar("kind", default="?")
EXAMPLES: dict[tuple[str, str], str] = {}


def _outcome(reply: protocol.Reply) -> str:
    if reply.error is None:
        return reply.status
    outcome = f"{reply.status}/{reply.error.code}"
    EXAMPLES.setdefault((_kind.get(), outcome), reply.error.message[:160])
    return outcome


Kind = Callable[[Callers, int], Awaitable[list[str]]]


async def k_compute(c: Callers, i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(COMPUTE, {"n": 200 + i % 100}, timeout=10))]


async def k_unique(c: Callers, i: int) -> list[str]:
    # A new source each time: fills the compiled-script cache (256 entries) and makes it evict.
    source = f"def execute(ctx):\n    return ctx['n'] + {i}\n"
    return [_outcome(await c.json.execute_code(source, {"n": 1}, timeout=10))]


async def k_pandas(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(PANDAS, PANDAS_CTX, timeout=10))]


async def k_normalize(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_named("text.normalize", NORMALIZE_CTX, timeout=10))]


async def k_transpile(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_named("sql.transpile", TRANSPILE_CTX, timeout=10))]


async def k_named_bad_ctx(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_named("sql.transpile", {"sql": 5}, timeout=10))]


async def k_msgpack(c: Callers, i: int) -> list[str]:
    return [_outcome(await c.msgpack.execute_code(COMPUTE, {"n": i % 50}, timeout=10))]


async def k_script_error(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(SCRIPT_ERROR, timeout=10))]


async def k_syntax_error(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(SYNTAX_ERROR, timeout=10))]


async def k_policy(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(POLICY, timeout=10))]


async def k_timeout(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(SPIN, timeout=0.2))]


async def k_memory_huge(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(MEMORY_HUGE, timeout=10))]


async def k_memory_grow(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(MEMORY_GROW, timeout=10))]


async def k_stdout_cut(c: Callers, _i: int) -> list[str]:
    reply = await c.json.execute_code(STDOUT_CUT, timeout=10)
    cut = reply.status != "ok" or reply.stdout.rstrip().endswith("characters]")
    return [_outcome(reply) + ("" if cut else " (not cut)")]


async def k_stdout_flood(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(STDOUT_FLOOD, timeout=10))]


async def k_result_near(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(RESULT_NEAR, timeout=10))]


async def k_result_over(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(RESULT_OVER, timeout=10))]


async def k_not_serializable(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(NOT_SERIALIZABLE, timeout=10))]


def _body(code: str = COMPUTE, **fields: Any) -> bytes:
    return json.dumps({"code": code, "ctx": {"n": 3}, "timeout": 10, **fields}).encode()


async def k_bad_signature(c: Callers, _i: int) -> list[str]:
    subject, body = f"{c.prefix}.code", _body()
    headers = sign(KEY_ID, b"not-the-secret-at-all-" + secrets.token_bytes(8), subject, body)
    return [_outcome(await c.json.send_raw(subject, body, headers=headers, timeout=10))]


async def k_unsigned(c: Callers, i: int) -> list[str]:
    subject, body = f"{c.prefix}.code", _body()
    variant = i % 3
    if variant == 0:
        headers: dict[str, str] = {}  # no signature at all
    elif variant == 1:
        headers = sign("nobody", c.secret, subject, body)  # a key id the replica does not know
    else:
        headers = sign(KEY_ID, c.secret, subject, body, timestamp=int(time.time()) - 600)
    return [_outcome(await c.json.send_raw(subject, body, headers=headers, timeout=10))]


async def k_replay(c: Callers, _i: int) -> list[str]:
    subject, body = f"{c.prefix}.code", _body()
    headers = sign(KEY_ID, c.secret, subject, body)
    first = await c.json.send_raw(subject, body, headers=dict(headers), timeout=10)
    second = await c.json.send_raw(subject, body, headers=dict(headers), timeout=10)
    return [_outcome(first), _outcome(second)]


async def k_tampered(c: Callers, _i: int) -> list[str]:
    subject, body = f"{c.prefix}.code", _body()
    headers = c.json.sign(subject, body)
    headers[SIGNATURE_HEADER] = headers[SIGNATURE_HEADER][::-1]
    return [_outcome(await c.json.send_raw(subject, body, headers=headers, timeout=10))]


INVALID_BODIES = [
    b"{not json",
    b"[1, 2, 3]",
    b"\xff\xfe\x00garbage",
    _body(bogus=1),
    _body(timeout=100_000),
    _body(code=NO_ENTRY),
    json.dumps({"code": 5}).encode(),
]


async def k_invalid(c: Callers, i: int) -> list[str]:
    body = INVALID_BODIES[i % len(INVALID_BODIES)]
    return [_outcome(await c.json.send_raw(f"{c.prefix}.code", body, timeout=10))]


async def k_unknown_script(c: Callers, i: int) -> list[str]:
    return [_outcome(await c.json.execute_named(f"no.such.script{i % 7}", timeout=10))]


async def k_job(c: Callers, i: int) -> list[str]:
    if i % 3 == 0:
        job_id = await c.json.submit_named("text.normalize", NORMALIZE_CTX, timeout=10)
    elif i % 3 == 1:
        job_id = await c.json.submit_code(SCRIPT_ERROR, timeout=10)
    else:
        job_id = await c.json.submit_code(COMPUTE, {"n": 10}, timeout=10)
    reply = await c.json.wait(job_id, timeout=60)
    return [f"job {_outcome(reply)}"]


async def k_job_via_request(c: Callers, i: int) -> list[str]:
    request = protocol.CodeRequest(code=COMPUTE, ctx={"n": i % 10}, timeout=10, mode="async")
    accepted = await c.json.send(f"{c.prefix}.code", request, timeout=10)
    if accepted.job_id is None:
        return [_outcome(accepted)]
    reply = await c.json.wait(accepted.job_id, timeout=60)
    return [_outcome(accepted), f"job {_outcome(reply)}"]


async def k_burst_one(c: Callers, _i: int) -> list[str]:
    return [_outcome(await c.json.execute_code(BURST_WORK, timeout=10))]


# name: (kind, weight in the steady mix, outcomes expected)
MIX: dict[str, tuple[Kind, float, set[str]]] = {
    "compute": (k_compute, 18, {"ok"}),
    "unique": (k_unique, 6, {"ok"}),
    "pandas": (k_pandas, 7, {"ok"}),
    "normalize": (k_normalize, 7, {"ok"}),
    "transpile": (k_transpile, 5, {"ok"}),
    # invalid_request where the script declares a typed Input, script_error where it checks.
    "named-bad-ctx": (k_named_bad_ctx, 1.5, {"rejected/invalid_request", "error/script_error"}),
    "msgpack": (k_msgpack, 3, {"ok"}),
    "script-error": (k_script_error, 6, {"error/script_error"}),
    "syntax-error": (k_syntax_error, 4, {"error/syntax_error"}),
    "policy": (k_policy, 4, {"error/policy_violation"}),
    "timeout": (k_timeout, 3, {"timeout/timeout"}),
    "memory-huge": (k_memory_huge, 2.5, {"error/memory_limit"}),
    "memory-grow": (k_memory_grow, 0.5, {"error/memory_limit"}),
    "stdout-cut": (k_stdout_cut, 3, {"ok"}),
    "stdout-flood": (k_stdout_flood, 1, {"error/output_limit"}),
    "result-near": (k_result_near, 2, {"ok"}),
    "result-over": (k_result_over, 1.5, {"error/output_limit"}),
    "not-serializable": (k_not_serializable, 1, {"error/result_not_serializable"}),
    "bad-signature": (k_bad_signature, 3, {"rejected/unauthorized"}),
    "unsigned": (k_unsigned, 2, {"rejected/unauthorized"}),
    "tampered": (k_tampered, 1, {"rejected/unauthorized"}),
    "replay": (k_replay, 1, {"ok", "rejected/unauthorized"}),
    "invalid-body": (k_invalid, 4, {"rejected/invalid_request"}),
    "unknown-script": (k_unknown_script, 3, {"rejected/unknown_script"}),
    "job": (k_job, 3, {"job ok", "job error/script_error"}),
    "job-via-request": (k_job_via_request, 1, {"accepted", "job ok"}),
}
# Any synchronous request may find the queue full while a burst is on.
UNDER_LOAD = {"rejected/overloaded"}
BURST_EXPECTED = {"ok", "rejected/overloaded"}


@dataclass
class Tally:
    """What came back, by kind and outcome, and how long each kind took."""

    by_kind: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    latency_ms: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    unexpected: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    requests: int = 0

    def add(self, kind: str, outcomes: list[str], expected: set[str], ms: float) -> None:
        self.latency_ms[kind].append(ms)
        for outcome in outcomes:
            self.requests += 1
            self.by_kind[kind][outcome] += 1
            if outcome not in expected and outcome not in UNDER_LOAD:
                self.unexpected[(kind, outcome)] += 1

    def outcomes(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for counts in self.by_kind.values():
            total.update(counts)
        return total


async def run_one(c: Callers, tally: Tally, kind: str, i: int, burst: bool = False) -> None:
    call, expected = (k_burst_one, BURST_EXPECTED) if burst else (MIX[kind][0], MIX[kind][2])
    _kind.set(kind)
    started = time.perf_counter()
    try:
        outcomes = await call(c, i)
    except ClientError as exc:  # no reply in time, or a job without completion
        outcomes = ["client error"]
        EXAMPLES.setdefault((kind, "client error"), str(exc)[:160])
    tally.add(kind, outcomes, expected, (time.perf_counter() - started) * 1000)


async def drive(
    c: Callers, tally: Tally, kinds: list[str], first: int, concurrency: int, *, burst: int
) -> None:
    """Send ``kinds`` with ``concurrency`` steady callers and a burst of ``burst`` half-way."""
    queue = collections.deque(enumerate(kinds, start=first))
    halfway = asyncio.Event()

    async def caller() -> None:
        while queue:
            i, kind = queue.popleft()
            if len(queue) <= len(kinds) // 2:
                halfway.set()
            await run_one(c, tally, kind, i)
        halfway.set()

    async def overload() -> None:
        # Half-way through the block, ``burst`` requests at once on top of the steady load.
        await halfway.wait()
        await asyncio.gather(*(run_one(c, tally, "burst", j, burst=True) for j in range(burst)))

    await asyncio.gather(overload(), *(caller() for _ in range(concurrency)))


# -- processes ------------------------------------------------------------------------------------


class Replica:
    """``python -m consumer serve`` as a process; stderr drained by a thread, lines counted."""

    def __init__(self, url: str, prefix: str, secret: str, scratch: Path) -> None:
        self.metrics_port = free_port()
        env = environment_with(
            NATS_URL=url,
            EXECUTOR_API_KEYS=f"{KEY_ID}:{secret}",
            EXECUTOR_SUBJECT_PREFIX=prefix,
            EXECUTOR_QUEUE_GROUP=prefix,
            EXECUTOR_LOG_FORMAT="json",
            EXECUTOR_METRICS_PORT=str(self.metrics_port),
            EXECUTOR_METRICS_HOST="127.0.0.1",
            EXECUTOR_WORKERS=str(WORKERS),
            EXECUTOR_QUEUE_LIMIT=str(QUEUE_LIMIT),
            EXECUTOR_SCRATCH_DIR=str(scratch),
            EXECUTOR_SHUTDOWN_GRACE="15",
        )
        self.ready = threading.Event()
        self.levels: collections.Counter[str] = collections.Counter()
        self.notable: collections.Counter[str] = collections.Counter()  # warning+ events
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumer", "serve"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.tail.append(line.rstrip())
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self.levels["(not json)"] += 1
                continue
            level = str(record.get("level", "?"))
            self.levels[level] += 1
            if level in ("warning", "error", "critical"):
                self.notable[f"{level}: {record.get('event')}"] += 1
            if record.get("event") == "replica ready":
                self.ready.set()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.tail)
                raise RuntimeError(f"the replica did not become ready:\n{tail}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.reader.join(timeout=5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code

    def metrics(self) -> dict[str, float]:
        """The replica's /metrics, as ``name{labels}`` to value (empty if unreachable)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        return values


# -- sampling -------------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def _kb(value: str) -> int:
    return int(value.split(maxsplit=1)[0]) if value else 0


def _heap_kb(pid: int) -> int:
    """Resident kB of the ``[heap]`` mapping: glibc malloc's main arena (brk), where objects
    over pymalloc's 512 bytes live; pymalloc's own arenas are anonymous mmaps."""
    try:
        with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as smaps:
            in_heap = False
            for line in smaps:
                if not line[0].isupper():  # a mapping's header line: address range first
                    in_heap = line.rstrip().endswith("[heap]")
                elif in_heap and line.startswith("Rss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _processes() -> dict[int, tuple[int, str, str]]:
    """Every process on the host: pid to (ppid, state, command line)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                rest = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        table[int(entry)] = (int(rest[1]), rest[0], command)
    return table


def descendants(root: int, table: dict[int, tuple[int, str, str]]) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _state, _command) in table.items():
        children[ppid].append(pid)
    found, pending = [], list(children[root])
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children[pid])
    return found


@dataclass
class Sample:
    label: str
    requests: int
    seconds: float
    rss_mb: float
    anon_mb: float
    heap_mb: float
    parent_pid: int
    parent_rss_mb: float
    parent_fds: int
    fds: int
    threads: int
    procs: int
    zombies: int
    scratch: int
    restarts: float


def sample(label: str, replica: Replica, scratch: Path, requests: int, t0: float) -> Sample:
    pid = replica.process.pid
    status = _status(pid)
    fds = _fds(pid)  # before the metrics scrape opens a connection of its own
    table = _processes()
    tree = descendants(pid, table)
    parents = [p for p in tree if table[p][0] == pid and "sandbox.zygote" in table[p][2]]
    parent = parents[0] if parents else 0
    parent_rss = parent_fds = 0
    if parent:
        with contextlib.suppress(OSError):
            parent_rss = _kb(_status(parent).get("VmRSS", ""))
            parent_fds = _fds(parent)
    runs = list(scratch.glob("pyexec-runs-*/*"))
    restarts = replica.metrics().get("pyexec_warm_parent_restarts_total", float("nan"))
    return Sample(
        label=label,
        requests=requests,
        seconds=round(time.perf_counter() - t0, 1),
        rss_mb=round(_kb(status.get("VmRSS", "")) / 1024, 1),
        anon_mb=round(_kb(status.get("RssAnon", "")) / 1024, 1),
        heap_mb=round(_heap_kb(pid) / 1024, 1),
        parent_pid=parent,
        parent_rss_mb=round(parent_rss / 1024, 1),
        parent_fds=parent_fds,
        fds=fds,
        threads=int(status.get("Threads", "0")),
        procs=len(tree),
        zombies=sum(1 for p in tree if table[p][1] == "Z"),
        scratch=len(runs),
        restarts=restarts,
    )


HEADER = (
    f"{'sample':8} {'requests':>8} {'s':>7} {'RSS MB':>7} {'anon MB':>7} {'heap MB':>7} "
    f"{'parent MB':>9} "
    f"{'fds':>4} {'p.fds':>5} {'thr':>4} {'procs':>5} {'zomb':>4} {'runs':>4} {'restarts':>8}"
)


def row(s: Sample) -> str:
    return (
        f"{s.label:8} {s.requests:8} {s.seconds:7.1f} {s.rss_mb:7.1f} {s.anon_mb:7.1f} "
        f"{s.heap_mb:7.1f} {s.parent_rss_mb:9.1f} {s.fds:4} {s.parent_fds:5} {s.threads:4} "
        f"{s.procs:5} {s.zombies:4} {s.scratch:4} {s.restarts:8.0f}"
    )


# -- the run --------------------------------------------------------------------------------------


def plan(count: int, rng: random.Random, exclude: frozenset[str] = frozenset()) -> list[str]:
    names = [name for name in MIX if name not in exclude]
    weights = [MIX[name][1] for name in names]
    return rng.choices(names, weights=weights, k=count)


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of value over requests, per 1,000 requests."""
    if len(points) < 2:
        return float("nan")
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return float("nan")
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / var


async def soak(args: argparse.Namespace, url: str, replica: Replica, secret: str) -> int:
    scratch: Path = args.scratch
    rng = random.Random(args.seed)  # noqa: S311 - a reproducible mix, not a secret
    samples: list[Sample] = []
    tally = Tally()
    nc_client = await Client.connect(url, KEY_ID, secret, prefix=args.prefix)
    try:
        msgpack = Client(nc_client.nc, KEY_ID, secret, prefix=args.prefix, encoding="msgpack")
        c = Callers(nc_client, msgpack, args.prefix, secret.encode())
        t0 = time.perf_counter()
        samples.append(sample("ready", replica, scratch, 0, t0))
        print(HEADER, flush=True)
        print(row(samples[-1]), flush=True)

        warm = Tally()
        kinds = plan(args.warmup, rng, args.exclude)
        await drive(c, warm, kinds, -args.warmup, args.concurrency, burst=args.burst)
        await asyncio.sleep(args.settle)
        samples.append(sample("start", replica, scratch, 0, t0))
        print(row(samples[-1]), flush=True)

        driving = 0.0
        done = 0
        while done < args.requests:
            block = min(args.sample_every, args.requests - done)
            started = time.perf_counter()
            kinds = plan(block, rng, args.exclude)
            await drive(c, tally, kinds, done, args.concurrency, burst=args.burst)
            driving += time.perf_counter() - started
            done += block
            if replica.process.poll() is not None:
                print("the replica exited during the run", file=sys.stderr)
                return 1
            await asyncio.sleep(args.settle)
            samples.append(sample("run", replica, scratch, tally.requests, t0))
            print(row(samples[-1]), flush=True)

        await asyncio.sleep(args.final_settle)
        samples.append(sample("end", replica, scratch, tally.requests, t0))
        print(row(samples[-1]), flush=True)
        metrics = replica.metrics()
    finally:
        await cleanup_streams(nc_client, args.prefix)
        await nc_client.close()
    report(
        args=args,
        samples=samples,
        tally=tally,
        warm=warm,
        driving=driving,
        metrics=metrics,
        replica=replica,
    )
    return 0


async def cleanup_streams(client: Client, prefix: str) -> None:
    """Delete the job and result streams the replica made for our prefix."""
    with contextlib.suppress(Exception):
        js = client.nc.jetstream()
        for info in await js.streams_info():
            subjects = info.config.subjects or []
            name = info.config.name
            if name and any(s.startswith(f"{prefix}.") for s in subjects):
                await js.delete_stream(name)


def report(
    *,
    args: argparse.Namespace,
    samples: list[Sample],
    tally: Tally,
    warm: Tally,
    driving: float,
    metrics: dict[str, float],
    replica: Replica,
) -> None:
    print()
    print("requests by kind (outcome: count), p50 / max ms per call:")
    for kind in [*MIX, "burst"]:
        counts = tally.by_kind.get(kind)
        if not counts:
            continue
        ordered = sorted(tally.latency_ms[kind])
        shown = ", ".join(f"{k}: {v}" for k, v in counts.most_common())
        print(
            f"  {kind:24} {sum(counts.values()):6}  {shown}  "
            f"[{ordered[len(ordered) // 2]:.0f} / {ordered[-1]:.0f} ms]"
        )
    print("requests by outcome:")
    for outcome, seen in tally.outcomes().most_common():
        print(f"  {outcome:32} {seen:6}")
    unexpected = sum(tally.unexpected.values()) + sum(warm.unexpected.values())
    print(f"unexpected outcomes: {unexpected}")
    for (kind, outcome), seen in (tally.unexpected + warm.unexpected).most_common():
        plain = outcome.removeprefix("job ").removesuffix(" (not cut)")
        print(f"  {kind}: {outcome} x{seen} {EXAMPLES.get((kind, plain), '')}")
    served = sum(v for k, v in metrics.items() if k.startswith("pyexec_requests_total{"))
    print(
        f"throughput: {tally.requests} requests in {driving:.1f} s of driving "
        f"= {tally.requests / driving:.1f} requests/s (concurrency {args.concurrency}, "
        f"bursts of {args.burst}, {WORKERS} workers, queue limit {QUEUE_LIMIT}); "
        f"warm-up {warm.requests}; the replica counted {served:.0f} requests and jobs"
    )
    print(f"replica log lines by level: {dict(replica.levels)}")
    if replica.notable:
        print(f"replica warnings and errors: {dict(replica.notable)}")

    start, end = samples[1], samples[-1]
    half = tally.requests / 2
    mid = [s for s in samples[1:] if s.requests <= half][-1]
    second = [s for s in samples[1:] if s.requests >= mid.requests]
    print()
    print(f"figures (start = after {warm.requests} warm-up requests; mid = {mid.requests}):")

    def mem(name: str, get: Callable[[Sample], float], tolerance: float) -> None:
        values = [get(s) for s in samples[1:]]
        growth = get(end) - get(mid)
        slope = slope_per_1000([(s.requests, get(s)) for s in second])
        verdict = "flat" if abs(growth) <= tolerance else "GROWING" if growth > 0 else "shrinking"
        print(
            f"  {name:22} start {get(start):7.1f}  mid {get(mid):7.1f}  end {get(end):7.1f}  "
            f"max {max(values):7.1f} MB; second half {growth:+.1f} MB "
            f"({slope:+.2f} MB per 1000 requests): {verdict} (tolerance {tolerance:g} MB)"
        )

    def count(name: str, get: Callable[[Sample], float], tolerance: int = 0) -> None:
        values = [get(s) for s in samples[1:]]
        growth = get(end) - get(start)
        verdict = "flat" if abs(growth) <= tolerance else "GROWING" if growth > 0 else "fewer"
        print(
            f"  {name:22} start {get(start):4.0f}  end {get(end):4.0f}  "
            f"min {min(values):4.0f}  max {max(values):4.0f}: {verdict}"
        )

    mem("replica RSS", lambda s: s.rss_mb, args.rss_tolerance)
    mem("replica RSS (anon)", lambda s: s.anon_mb, args.rss_tolerance)
    mem("replica [heap] (brk)", lambda s: s.heap_mb, args.rss_tolerance)
    mem("warm parent RSS", lambda s: s.parent_rss_mb, args.rss_tolerance)
    count("replica fds", lambda s: s.fds)
    count("warm parent fds", lambda s: s.parent_fds)
    count("replica threads", lambda s: s.threads)
    count("descendant processes", lambda s: s.procs)
    count("zombies", lambda s: s.zombies)
    count("run folders", lambda s: s.scratch)
    parents = sorted({s.parent_pid for s in samples})
    print(
        f"  warm parent pids seen: {parents}; "
        f"restarts (pyexec_warm_parent_restarts_total): {end.restarts:.0f}"
    )


def after_stop(replica: Replica, tree: list[int], scratch: Path, code: int) -> None:
    left = [pid for pid in tree if Path(f"/proc/{pid}").exists()]
    runs = list(scratch.glob("pyexec-runs-*"))
    print(
        f"after SIGTERM: replica exit code {code}; processes of its tree still alive: "
        f"{len(left)} {left[:10]}; run folders left: {len(runs)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6000, help="requests after warm-up")
    parser.add_argument("--concurrency", type=int, default=8, help="steady callers")
    parser.add_argument("--nats-url", default="", help="an existing NATS (default: start one)")
    parser.add_argument("--sample-every", type=int, default=500, help="requests per sample")
    parser.add_argument("--warmup", type=int, default=300, help="requests before the start")
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before a sample")
    parser.add_argument("--final-settle", type=float, default=5.0, help="idle seconds at the end")
    parser.add_argument("--rss-tolerance", type=float, default=4.0, help="MB over the 2nd half")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--exclude", default="", help="comma-separated kinds to leave out of the mix ('burst' too)"
    )
    args = parser.parse_args()
    args.exclude = frozenset(filter(None, (k.strip() for k in args.exclude.split(","))))
    unknown = args.exclude - {*MIX, "burst"}
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}; kinds: {', '.join(MIX)}")
    args.burst = 0 if "burst" in args.exclude else BURST
    args.prefix = f"soak{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="pyexec-soak-"))
    args.scratch = work / "scratch"
    args.scratch.mkdir()
    secret = secrets.token_hex(32)
    server: EmbeddedNats | None = None
    replica: Replica | None = None
    code = 1
    try:
        if args.nats_url:
            url = args.nats_url
        else:
            server = EmbeddedNats(work / "nats", port=0)
            server.start()
            url = server.url
        print(
            f"pyexec soak: {args.requests} requests, concurrency {args.concurrency}, "
            f"NATS {url}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
            flush=True,
        )
        replica = Replica(url, args.prefix, secret, args.scratch)
        replica.wait_ready()
        print(f"replica pid {replica.process.pid} ready", flush=True)
        code = asyncio.run(soak(args, url, replica, secret))
    finally:
        if replica is not None:
            tree = descendants(replica.process.pid, _processes())
            exit_code = replica.stop()
            time.sleep(0.5)
            after_stop(replica, tree, args.scratch, exit_code)
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
