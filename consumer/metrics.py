"""Prometheus metrics of one replica: every series the service exports, defined in one place.

Names follow the Prometheus conventions: one ``pyexec_`` prefix, base units (seconds, bytes),
``_total`` on counters. Labels take values from small fixed sets only (subject, status, error
code, auth failure reason); no script text, request id or nonce is ever a label. Key ids are a
label only when ``EXECUTOR_METRICS_KEY_IDS=1``, and then only ids the keyring knows.

Every labelled counter whose label values form a known, closed set is created at zero for each
of them when the registry is built, so that ``rate()`` sees a series' first event after a restart
and a fresh fleet shows 0 instead of "No data".
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from typing import get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from pyexec_client.messages import ERROR_CODES

from consumer.errors import AuthFailure
from consumer.usage import pss_bytes
from sandbox import TierState

# ``*_created`` series double the series count and no dashboard or alert reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds. The upper buckets reach past the largest timeout so that a timed-out run lands in
# a finite bucket and the percentiles stay meaningful.
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
# Bytes, twice as far apart each (256 B .. 64 MiB): with buckets 4x apart a percentile read off
# them could be off by a factor of two.
_SIZE_BUCKETS = tuple(float(256 * 2**i) for i in range(19))
UNKNOWN_KEY = "unknown"

# The closed sets of label values (the contract's codes, docs/protocol.md "Statuses"): each
# series exists at 0 from the start. (status, code) pairs a request or job can end in:
_RAN = (
    ("ok", ""),
    *(("timeout", code) for code in ERROR_CODES["timeout"]),
    *(("error", code) for code in ERROR_CODES["error"]),
)
_REFUSED = tuple(("rejected", code) for code in ERROR_CODES["rejected"])
# By the kind of subject (the part after the prefix).
OUTCOMES: dict[str, tuple[tuple[str, str], ...]] = {
    "code": (*_RAN, *_REFUSED, ("accepted", "")),
    "named": (*_RAN, *_REFUSED, ("accepted", "")),
    "jobs.code": (*_RAN, *_REFUSED, ("cancelled", "cancelled")),
    "jobs.named": (*_RAN, *_REFUSED, ("cancelled", "cancelled")),
    "job.status": (("ok", ""), *_REFUSED),
    "job.cancel": (("ok", ""), *_REFUSED),
}
JOB_STATUSES = ("ok", "error", "timeout", "rejected", "cancelled")
JOB_REFUSALS = (
    "unauthorized",
    "msg_id_mismatch",
    "no_request_id",
    "origin_subject",
    "not_async",
    "conflict",
    "duplicate",
    "subject",
    "not_jetstream",
)
PARENT_EXIT_CAUSES = ("stopped", "crashed", "halted")


class _ReadCounter(Collector):
    """A counter whose value some other object keeps; read when scraped."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.read: Callable[[], int] = lambda: 0

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self.name, self.documentation)


class _BusySeconds(Collector):
    """Seconds of run slots in use, summed over the slots: finished holds plus the time the
    slots held now have been held, read when scraped, so ``rate()`` of it is the average number
    of busy slots between two scrapes, however short the runs."""

    name = "pyexec_worker_busy_seconds"
    documentation = (
        "Seconds of worker slots in use, summed over the slots (the rate is the average number "
        "of busy workers)."
    )

    def __init__(self) -> None:
        self.read: Callable[[], float] = lambda: 0.0

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self.name, self.documentation)


class _TierCollector(Collector):
    """Each warm-parent tier's state, read from the pool when scraped."""

    def __init__(self) -> None:
        self.read: Callable[[], list[TierState]] = list

    def collect(self) -> Iterable[Metric]:
        states = self.read()
        runs = CounterMetricFamily(
            "pyexec_tier_runs", "Runs forked from each tier's warm parent.", labels=["tier"]
        )
        warm = GaugeMetricFamily(
            "pyexec_tier_warm_children",
            "Children of each tier's warm parent waiting for a run.",
            labels=["tier"],
        )
        up = GaugeMetricFamily(
            "pyexec_tier_up",
            "1 while the tier's warm parent runs; 0 while it restarts or after a crash loop.",
            labels=["tier"],
        )
        memory = GaugeMetricFamily(
            "pyexec_tier_parent_memory_bytes",
            "The tier's warm parent's memory: pss (its proportional share) and huge_pages "
            "(anonymous memory in huge pages, shared with every child).",
            labels=["tier", "kind"],
        )
        for state in states:
            runs.add_metric([state.tier], state.runs)
            warm.add_metric([state.tier], state.warm)
            up.add_metric([state.tier], 1.0 if state.live else 0.0)
            memory.add_metric([state.tier, "pss"], pss_bytes(state.pid))
            memory.add_metric([state.tier, "huge_pages"], state.huge_pages_mb * 1024 * 1024)
        yield from (runs, warm, up, memory)

    def describe(self) -> Iterable[Metric]:
        return []


def latency_buckets(longest: float) -> tuple[float, ...]:
    """The standard latency buckets, extended so that ``longest`` falls inside one."""
    buckets = list(_LATENCY_BUCKETS)
    while buckets[-1] <= longest:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


class Metrics:
    """Every metric of one replica, in a registry of its own."""

    def __init__(
        self,
        *,
        version: str,
        longest_timeout: float,
        key_ids: Iterable[str] | None = None,
        prefix: str = "pyexec",
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        buckets = latency_buckets(longest_timeout)
        # None: key ids are not a label. Otherwise the ids a label may take.
        self._key_ids = None if key_ids is None else frozenset(key_ids)
        request_labels = ["subject", "status", "code"]
        if self._key_ids is not None:
            request_labels.append("key_id")

        # process_* series (CPU, memory, open files, start time) of the replica process itself.
        ProcessCollector(registry=reg)
        Info("pyexec_build", "Version of the running executor.", registry=reg).info(
            {"version": version, "python_version": platform.python_version()}
        )
        self.requests = Counter(
            "pyexec_requests",
            "Requests and jobs answered, by subject, status and error code ('' when ok).",
            request_labels,
            registry=reg,
        )
        self.request_duration = Histogram(
            "pyexec_request_duration_seconds",
            "Time from a request's arrival to its reply (jobs: to their completion).",
            ["subject"],
            buckets=buckets,
            registry=reg,
        )
        self.execution_duration = Histogram(
            "pyexec_execution_duration_seconds",
            "Time a script ran in its child process, from hand-over to answer.",
            ["subject"],
            buckets=buckets,
            registry=reg,
        )
        self.queue_wait = Histogram(
            "pyexec_queue_wait_seconds",
            "Time a run waited for a free worker before it started.",
            ["subject"],
            buckets=buckets,
            registry=reg,
        )
        self.runs_in_flight = Gauge(
            "pyexec_runs_in_flight",
            "Runs handed to the worker pool and not yet finished (waiting or running).",
            registry=reg,
        )
        self.runs_waiting = Gauge(
            "pyexec_runs_waiting",
            "Synchronous requests waiting for a free worker (at most EXECUTOR_QUEUE_LIMIT).",
            registry=reg,
        )
        self.workers = Gauge(
            "pyexec_workers", "Worker slots by state (busy or idle).", ["state"], registry=reg
        )
        self._busy_seconds = _BusySeconds()
        reg.register(self._busy_seconds)
        self.warm_children = Gauge(
            "pyexec_warm_children",
            "Child processes forked from the warm parent and waiting for a run.",
            registry=reg,
        )
        self._restarts = _ReadCounter(
            "pyexec_warm_parent_restarts",
            "Times the warm parent process was lost and started again.",
        )
        reg.register(self._restarts)
        self._tiers = _TierCollector()
        reg.register(self._tiers)
        self.parent_exits = Counter(
            "pyexec_warm_parent_exits",
            "Warm-parent exits by tier and cause: stopped (by the pool), crashed (killed by a "
            "signal or a non-zero exit), halted (the exit that ended a crash loop's restarts).",
            ["tier", "cause"],
            registry=reg,
        )
        self.ready = Gauge(
            "pyexec_ready",
            "1 while the replica takes requests (connected and with a live worker pool).",
            registry=reg,
        )
        self.timeouts = Counter("pyexec_timeouts", "Runs stopped at their timeout.", registry=reg)
        self.policy_violations = Counter(
            "pyexec_policy_violations",
            "Scripts refused or stopped by the sandbox policy.",
            registry=reg,
        )
        self.memory_limit_kills = Counter(
            "pyexec_memory_limit_kills", "Runs killed at their memory limit.", registry=reg
        )
        self.auth_failures = Counter(
            "pyexec_auth_failures",
            "Requests refused as unauthorized, by reason.",
            ["reason"],
            registry=reg,
        )
        self.reply_size = Histogram(
            "pyexec_reply_size_bytes",
            "Size of the encoded reply or completion.",
            ["subject"],
            buckets=_SIZE_BUCKETS,
            registry=reg,
        )
        self.jobs_submitted = Counter(
            "pyexec_jobs_submitted",
            "Async requests (mode async) this replica accepted and stored in the jobs stream; "
            "jobs published straight to the stream are not among them (see pyexec_jobs_taken).",
            registry=reg,
        )
        self.jobs_taken = Counter(
            "pyexec_jobs_taken",
            "Jobs this replica took from the jobs stream to run, however they were stored (an "
            "async request to any replica, or published straight to the stream), first "
            "deliveries only.",
            registry=reg,
        )
        self.jobs_completed = Counter(
            "pyexec_jobs_completed",
            "Jobs whose completion this replica stored, by status.",
            ["status"],
            registry=reg,
        )
        self.jobs_cancelled = Counter(
            "pyexec_jobs_cancelled",
            "Jobs cancelled through this replica, by the state they were in (queued, running).",
            ["was"],
            registry=reg,
        )
        self.progress_events = Counter(
            "pyexec_progress_events",
            "Progress events of running jobs: published, or replaced by a newer one within the "
            "rate limit.",
            ["outcome"],
            registry=reg,
        )
        self.files = Counter(
            "pyexec_files",
            "Files moved between the object store and runs, by direction (in, out).",
            ["direction"],
            registry=reg,
        )
        self.file_bytes = Counter(
            "pyexec_file_bytes",
            "Bytes of files moved between the object store and runs, by direction (in, out).",
            ["direction"],
            registry=reg,
        )
        self.jobs_redelivered = Counter(
            "pyexec_jobs_redelivered",
            "Jobs this replica received again after another delivery was not acknowledged.",
            registry=reg,
        )
        self.jobs_lost = Counter(
            "pyexec_jobs_lost",
            "Jobs completed as worker_lost after too many deliveries.",
            registry=reg,
        )
        self.jobs_refused = Counter(
            "pyexec_jobs_refused",
            "Job messages acknowledged without running or answering: not signed, a message id "
            "that is not the job id, a conflicting or duplicate submission.",
            ["reason"],
            registry=reg,
        )
        self.refused_reply_subjects = Counter(
            "pyexec_refused_reply_subjects",
            "Requests dropped unanswered because their reply subject lies under the executor's "
            "prefix or a system prefix ($JS, $KV, $O, $SRV, $SYS).",
            registry=reg,
        )
        self.jobs_in_flight = Gauge(
            "pyexec_jobs_in_flight", "Jobs this replica is running now.", registry=reg
        )
        self.jobs_backlog = Gauge(
            "pyexec_jobs_backlog",
            "Jobs stored and not yet handed to any replica (the jobs consumer's pending count, "
            "stream-wide: every replica reports the same value).",
            registry=reg,
        )
        self.jobs_oldest_age = Gauge(
            "pyexec_jobs_oldest_age_seconds",
            "How long the oldest job not yet handed to any replica has waited since it was "
            "stored; 0 when there is none.",
            registry=reg,
        )
        self._register_nats(reg)
        self._initialise(prefix)

    def _register_nats(self, reg: CollectorRegistry) -> None:
        """The NATS connection's series."""
        self.nats_connected = Gauge(
            "pyexec_nats_connected", "1 while connected to a NATS server.", registry=reg
        )
        self.nats_disconnects = Counter(
            "pyexec_nats_disconnects", "Connections to NATS lost.", registry=reg
        )
        self.nats_reconnects = Counter(
            "pyexec_nats_reconnects", "Connections to NATS re-established.", registry=reg
        )
        self.nats_slow_consumers = Counter(
            "pyexec_nats_slow_consumer_events",
            "Messages dropped by the client because a subscription fell behind.",
            registry=reg,
        )
        self.nats_connect_failures = Counter(
            "pyexec_nats_connect_failures",
            "Attempts to connect or reconnect to a NATS server that failed (refused, timed out, "
            "rejected by the server).",
            registry=reg,
        )
        self.nats_errors = Counter(
            "pyexec_nats_errors",
            "Asynchronous errors the NATS client reported while connected (permission "
            "violations, protocol errors), slow consumers and failed connection attempts not "
            "included.",
            registry=reg,
        )

    def _initialise(self, prefix: str) -> None:
        """Create every series of a closed label set at 0."""
        key_ids = [None] if self._key_ids is None else sorted(self._key_ids)
        for kind, outcomes in OUTCOMES.items():
            for status, code in outcomes:
                for key_id in key_ids:
                    labels = {"subject": f"{prefix}.{kind}", "status": status, "code": code}
                    if key_id is not None:
                        labels["key_id"] = key_id
                    self.requests.labels(**labels)
        for reason in get_args(AuthFailure):
            self.auth_failures.labels(reason=reason)
        for status in JOB_STATUSES:
            self.jobs_completed.labels(status=status)
        for was in ("queued", "running"):
            self.jobs_cancelled.labels(was=was)
        for outcome in ("published", "replaced"):
            self.progress_events.labels(outcome=outcome)
        for direction in ("in", "out"):
            self.files.labels(direction=direction)
            self.file_bytes.labels(direction=direction)
        for reason in JOB_REFUSALS:
            self.jobs_refused.labels(reason=reason)

    def watch_pool(
        self,
        *,
        workers: int,
        busy: Callable[[], int],
        warm: Callable[[], int],
        restarts: Callable[[], int],
        tiers: Callable[[], list[TierState]] = list,
        busy_seconds: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """Read the pool's state at scrape time instead of keeping copies."""
        self._restarts.read = restarts
        self._tiers.read = tiers
        self._busy_seconds.read = busy_seconds
        for state in tiers():
            for cause in PARENT_EXIT_CAUSES:
                self.parent_exits.labels(tier=state.tier, cause=cause)
        self.workers.labels(state="busy").set_function(lambda: float(busy()))
        self.workers.labels(state="idle").set_function(lambda: float(max(workers - busy(), 0)))
        self.warm_children.set_function(lambda: float(warm()))

    def request(
        self,
        *,
        subject: str,
        status: str,
        code: str | None,
        key_id: str | None,
        seconds: float,
        reply_bytes: int,
    ) -> None:
        """Count one answered request or finished job."""
        labels = {"subject": subject, "status": status, "code": code or ""}
        if self._key_ids is not None:
            labels["key_id"] = key_id if key_id in self._key_ids else UNKNOWN_KEY
        self.requests.labels(**labels).inc()
        self.request_duration.labels(subject=subject).observe(seconds)
        self.reply_size.labels(subject=subject).observe(reply_bytes)
        if code == "timeout":
            self.timeouts.inc()
        elif code == "policy_violation":
            self.policy_violations.inc()
        elif code == "memory_limit":
            self.memory_limit_kills.inc()

    def run(self, *, subject: str, wait_seconds: float, run_seconds: float) -> None:
        """Record one run's time in the queue and in its child."""
        self.queue_wait.labels(subject=subject).observe(wait_seconds)
        self.execution_duration.labels(subject=subject).observe(run_seconds)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

    def names(self) -> set[str]:
        """Every series name this registry exports, whether or not it has samples yet."""
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",),
            "info": ("_info",),
        }
        return {
            family.name + suffix
            for family in self.registry.collect()
            for suffix in suffixes[family.type]
        }
