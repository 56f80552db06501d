"""The table of every environment variable a replica reads: each one's default, bounds and
error, stated once (docs/configuration.md's summary table is made from it)."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

from consumer.errors import ConfigError
from consumer.readers import (
    SUBJECT_TOKEN,
    Address,
    Choice,
    Custom,
    Derived,
    Directory,
    Flag,
    Items,
    Seconds,
    Share,
    Text,
    Variable,
    Whole,
    summary_table,
)
from sandbox import LAYERS, parse_allow

DEFAULT_SCRIPTS_DIR = Path(__file__).parent / "scripts"
KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MIN_SECRET_LENGTH = 16
# Room a request's headers take in a message (signature, trace context, content type, message
# id): NATS counts headers toward max_payload, so the default body limit leaves this much of the
# default server's 1 MiB for them.
HEADER_ROOM = 8 * 1024
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024 - HEADER_ROOM
TIERS = ("stdlib", "full")


# -- the rules of single variables -------------------------------------------------------------


def _keys(name: str, text: str) -> dict[str, str]:
    """``id:secret,...``"""
    secrets: dict[str, str] = {}
    for position, entry in enumerate(filter(None, (e.strip() for e in text.split(","))), 1):
        key_id, colon, secret = entry.partition(":")
        if not colon or not KEY_ID.fullmatch(key_id):
            raise ConfigError(
                f"{name}: entry {position} must be 'id:secret' with an id of "
                "letters, digits, '.', '_' or '-'"
            )
        if key_id in secrets:
            raise ConfigError(f"{name}: key id '{key_id}' appears twice")
        _check_secret(name, key_id, secret)
        secrets[key_id] = secret
    return secrets


def _key(name: str, text: str) -> dict[str, str]:
    """One secret, with the key id ``default``."""
    _check_secret(name, "default", text)
    return {"default": text}


def _check_secret(variable: str, key_id: str, secret: str) -> None:
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{variable}: the secret of key '{key_id}' is shorter than {MIN_SECRET_LENGTH} "
            "characters (use 'pyexec keygen')"
        )


def _module(name: str, module: str) -> str:
    if not SUBJECT_TOKEN.fullmatch(module) or "-" in module:
        raise ConfigError(f"{name}: '{module}' is not a module name")
    return module


def _port(name: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{name}: '{text}' is not a TCP port")
    return int(text)


def _destination(name: str, entry: str) -> str:
    try:
        parse_allow(entry)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return entry


def _layers(name: str, text: str) -> tuple[str, ...]:
    disabled = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = set(disabled) - set(LAYERS)
    if unknown:
        raise ConfigError(
            f"{name}: unknown layer(s) {', '.join(sorted(unknown))}; "
            f"the layers are {', '.join(LAYERS)}"
        )
    return disabled


def _tiers(name: str, text: str) -> tuple[str, ...]:
    tiers = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not tiers:
        return TIERS
    if any(tier not in TIERS for tier in tiers) or len(set(tiers)) != len(tiers):
        raise ConfigError(f"{name} must list 'stdlib', 'full' or both, each once, not '{text}'")
    return tuple(tier for tier in TIERS if tier in tiers)


def _inbox_prefix(text: str) -> bool:
    return bool(SUBJECT_TOKEN.fullmatch(text)) and text.split(".", maxsplit=1)[0] != "_INBOX"


def _is_token(text: str) -> bool:
    return bool(SUBJECT_TOKEN.fullmatch(text))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return max(1, cpus)
    if quota != "max" and int(period) > 0:
        cpus = min(cpus, math.ceil(int(quota) / int(period)))
    return max(1, cpus)


# -- the table ---------------------------------------------------------------------------------

# Every variable a replica reads, in the order of docs/configuration.md's summary table (which
# tests/test_config.py checks against it). A default that depends on another variable comes
# after that variable.
VARIABLES: tuple[Variable, ...] = (
    Variable(
        name="NATS_URL", origin="contract", field="nats_urls",
        parse=Items("comma-separated NATS URLs"),
        default_text="unset: `pyexec serve` starts an embedded NATS server",
    ),
    Variable(
        name="EXECUTOR_API_KEYS", origin="contract",
        parse=Custom("`id:secret,id:secret,...`", _keys), default_text="unset (see below)",
    ),
    Variable(
        name="EXECUTOR_API_KEY", origin="contract",
        parse=Custom("one secret, key id `default`", _key),
    ),
    Variable(
        name="EXECUTOR_WORKERS", origin="contract", field="pool.workers",
        parse=Whole.of_pool("workers"),
        default=Derived("CPUs available to the process", lambda _: available_cpus()),
    ),
    Variable(
        name="EXECUTOR_DEFAULT_TIMEOUT", origin="contract", field="default_timeout",
        parse=Seconds("seconds, at most `EXECUTOR_MAX_TIMEOUT`"), default=30.0,
    ),
    Variable(
        name="EXECUTOR_MAX_TIMEOUT", origin="contract", field="max_timeout",
        parse=Seconds(), default=60.0,
    ),
    Variable(
        name="EXECUTOR_MAX_JOB_TIMEOUT", origin="contract", field="max_job_timeout",
        parse=Seconds(), default=3600.0,
    ),
    Variable(
        name="EXECUTOR_MEMORY_MB", origin="contract", field="pool.memory_mb",
        parse=Whole.of_pool("memory_mb", "MB per run"),
    ),
    Variable(
        name="EXECUTOR_SCRIPTS_DIR", origin="contract", field="scripts_dir",
        parse=Directory("an existing directory", existing=True), default=DEFAULT_SCRIPTS_DIR,
        default_text="the scripts shipped in `consumer/scripts/`",
    ),
    Variable(
        name="EXECUTOR_METRICS_PORT", origin="contract", field="metrics_port",
        parse=Whole(0, 65535), default=9464, note="`0` turns the endpoints off",
    ),
    Variable(
        name="EXECUTOR_METRICS_HOST", origin="project", field="metrics_host",
        parse=Address(),
        default=Derived(
            "`0.0.0.0` with `NATS_URL`; `127.0.0.1` without it (the embedded server)",
            # All interfaces only where a cluster's scraper must reach it.
            lambda read: "127.0.0.1" if read["NATS_URL"] is None else "0.0.0.0",  # noqa: S104
        ),
    ),
    Variable(
        name="EXECUTOR_METRICS_KEY_IDS", origin="project", field="metrics_key_ids",
        parse=Flag(), default=False, note="`1` labels request counts with the key id",
    ),
    Variable(
        name="EXECUTOR_LOG_FORMAT", origin="contract", field="log_format",
        parse=Choice(("json", "console")),
        default=Derived(
            "`console` if stderr is a terminal, else `json`",
            lambda _: "console" if sys.stderr.isatty() else "json",
        ),
    ),
    Variable(
        name="EXECUTOR_SUBJECT_PREFIX", origin="project", field="prefix",
        parse=Text(
            "dot-separated tokens of `A-Z a-z 0-9 _ -`",
            _is_token,
            "must be subject tokens such as 'pyexec'",
        ),
        default="pyexec",
    ),
    Variable(
        name="EXECUTOR_QUEUE_GROUP", origin="project", field="queue_group",
        parse=Text("same grammar as the prefix", _is_token, "must be a name such as 'pyexec'"),
        default="pyexec",
    ),
    Variable(
        name="EXECUTOR_QUEUE_LIMIT", origin="project", field="queue_limit",
        parse=Whole(0, 1_000_000, "waiting requests"),
        default=Derived("64 times `EXECUTOR_WORKERS`", lambda read: 64 * read["EXECUTOR_WORKERS"]),
    ),
    Variable(
        name="EXECUTOR_QUEUE_WAIT", origin="project", field="queue_wait",
        parse=Seconds("seconds a request may wait for a worker"), default=3.0,
    ),
    Variable(
        name="EXECUTOR_WARM_CHILDREN", origin="project", field="pool.warm_children",
        parse=Whole.of_pool("warm_children"),
        default=Derived(
            "the value of `EXECUTOR_WORKERS`", lambda read: read["EXECUTOR_WORKERS"]
        ),
    ),
    Variable(
        name="EXECUTOR_STDOUT_LIMIT", origin="project", field="pool.stdout_limit",
        parse=Whole.of_pool("stdout_limit", "characters"),
    ),
    Variable(
        name="EXECUTOR_MAX_REQUEST_BYTES", origin="project", field="max_request_bytes",
        parse=Whole(1024, 64 * 1024 * 1024, "bytes"), default=DEFAULT_MAX_REQUEST_BYTES,
    ),
    Variable(
        name="EXECUTOR_MAX_CTX_DEPTH", origin="project", field="max_ctx_depth",
        parse=Whole(1, 1000, "levels"), default=32,
    ),
    Variable(
        name="EXECUTOR_ALLOWED_MODULES", origin="project", field="pool.allowed_modules",
        parse=Items("comma-separated module names", _module),
        default_text="the contract's list, plus `secrets` (below)",
    ),
    Variable(
        name="EXECUTOR_SHUTDOWN_GRACE", origin="project", field="shutdown_grace",
        parse=Seconds(), default=30.0,
    ),
    Variable(
        name="EXECUTOR_DATA_DIR", origin="project", field="data_dir",
        parse=Directory("a directory path"), default=Path(".pyexec"),
        default_text="`.pyexec` (relative to the working directory)",
    ),
    Variable(
        name="EXECUTOR_NONCE_CACHE_SIZE", origin="project", field="nonce_cache_size",
        parse=Whole(1000, 100_000_000, "nonces"), default=200_000,
    ),
    Variable(
        name="EXECUTOR_REQUIRE_ISOLATION", origin="project", field="require_isolation",
        parse=Flag(), default=False,
        note="`1` refuses to start unless every isolation layer is active",
    ),
    Variable(
        name="EXECUTOR_NETWORK", origin="project", field="pool.network",
        parse=Choice(("on", "off")),
    ),
    Variable(
        name="EXECUTOR_NET_PORTS", origin="project", field="pool.net_ports",
        parse=Items("comma-separated TCP ports", _port),
    ),
    Variable(
        name="EXECUTOR_NET_ALLOW", origin="project", field="pool.net_allow",
        parse=Items(
            "comma-separated CIDRs, addresses or host names, each with an optional `:port`",
            _destination,
        ),
    ),
    Variable(
        name="EXECUTOR_RUN_AS_USER", origin="project", field="pool.run_as_user",
        parse=Text("an existing user name"),
    ),
    Variable(
        name="EXECUTOR_SCRATCH_DIR", origin="project", field="pool.scratch_dir",
        parse=Text("a directory"), default_text="the system temporary folder",
    ),
    Variable(
        name="EXECUTOR_SCRATCH_MB", origin="project", field="pool.scratch_limit_mb",
        parse=Whole.of_pool("scratch_limit_mb", "MB a run's scratch folder may hold in all"),
    ),
    Variable(
        name="EXECUTOR_SCRATCH_FILES", origin="project", field="pool.scratch_files",
        parse=Whole.of_pool(
            "scratch_files", "files and folders in a run's scratch folder"
        ),
    ),
    Variable(
        name="EXECUTOR_READ_PATHS", origin="project", field="pool.read_paths",
        parse=Items("colon-separated paths runs may read", separator=":"),
    ),
    Variable(
        name="EXECUTOR_UNSAFE_DISABLE_LAYERS", origin="project", field="pool.disabled_layers",
        parse=Custom(
            "comma-separated layers to switch off, for tests and diagnosis only", _layers
        ),
    ),
    Variable(
        name="EXECUTOR_POOL_MODE", origin="project", field="pool.mode",
        parse=Choice(("warm", "fresh")),
        note="`fresh` is a new interpreter per run: the benchmark baseline",
    ),
    Variable(
        name="EXECUTOR_TIERS", origin="project", field="pool.tiers",
        parse=Custom(
            "the warm parents kept: `stdlib`, `full`, or both (comma-separated)", _tiers
        ),
    ),
    Variable(
        name="EXECUTOR_HUGE_PAGES", origin="project", field="pool.huge_pages",
        parse=Flag(), note="`0` keeps the warm parents' memory in 4 KiB pages",
    ),
    Variable(
        name="EXECUTOR_JOB_MAX_DELIVER", origin="project", field="job_max_deliver",
        parse=Whole(1, 100, "deliveries before a job completes as `worker_lost`"), default=3,
    ),
    Variable(
        name="EXECUTOR_JOB_ACK_WAIT", origin="project", field="job_ack_wait",
        parse=Seconds(
            "seconds a job may go without a progress ack before redelivery; at least 1", low=1.0
        ),
        default=30.0,
    ),
    Variable(
        name="EXECUTOR_JOB_SHARE", origin="project", field="job_share",
        parse=Share(), default=0.5,
        note="share of `EXECUTOR_WORKERS` that async jobs may use (at least one worker)",
    ),
    Variable(
        name="EXECUTOR_RESULTS_MAX_AGE", origin="project", field="results_max_age",
        parse=Seconds(
            "seconds completions (and the job records that make submissions idempotent) are "
            "kept; at least 1",
            low=1.0,
        ),
        default=86400.0,
    ),
    Variable(
        name="EXECUTOR_FILES_MAX_MB", origin="contract", field="pool.out_files_mb",
        parse=Whole.of_pool(
            "out_files_mb",
            "MB of files a request may bring (and a run may leave in `out/`) in all",
        ),
    ),
    Variable(
        name="EXECUTOR_FILES_MAX_AGE", origin="contract", field="files_max_age",
        parse=Seconds("seconds objects are kept in `PYEXEC_FILES`; at least 1", low=1.0),
        default=86400.0,
    ),
    Variable(
        name="EXECUTOR_JOBS_DUPLICATE_WINDOW", origin="project", field="jobs_duplicate_window",
        parse=Seconds(
            "seconds of the jobs stream's duplicate window, when the replica creates it; "
            "at least 1",
            low=1.0,
        ),
        default=120.0,
    ),
    Variable(
        name="EXECUTOR_JOBS_MAX_MSGS", origin="project", field="jobs_max_msgs",
        parse=Whole(100, 100_000_000, "jobs the jobs stream holds, when the replica creates it"),
        default=100_000,
    ),
    Variable(
        name="EXECUTOR_INBOX_PREFIX", origin="project", field="inbox_prefix",
        parse=Text(
            "subject prefix of the replica's own inboxes (its JetStream and key-value "
            "requests, job fetches); outside `_INBOX`",
            _inbox_prefix,
            "must be subject tokens (letters, digits, _ and -, joined by dots) outside "
            "_INBOX, not '{text}'",
        ),
        default="_PYEXEC_INBOX",
    ),
    Variable(
        name="EXECUTOR_REPLY_PREFIXES", origin="project", field="reply_prefixes",
        parse=Items(
            "comma-separated starts of the reply subjects answered; none may cover "
            "`EXECUTOR_INBOX_PREFIX`"
        ),
        default=("_INBOX",),
    ),
    Variable(
        name="EXECUTOR_STREAM_REPLICAS", origin="project", field="stream_replicas",
        parse=Whole(1, 5, "JetStream replicas of the two streams (clustered NATS)"), default=1,
    ),
)  # fmt: skip
VARIABLE = {variable.name: variable for variable in VARIABLES}


def documented_table() -> str:
    """The summary table docs/configuration.md shows, made from :data:`VARIABLES`."""
    return summary_table(VARIABLES)
