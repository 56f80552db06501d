"""Every setting of a replica, read from the environment in one place and checked at start-up."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from consumer.errors import ConfigError
from consumer.protocol import stream_name
from sandbox import DEFAULT_ALLOWED_MODULES, LAYERS, PoolConfig, parse_allow

DEFAULT_SCRIPTS_DIR = Path(__file__).parent / "scripts"
KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")
MIN_SECRET_LENGTH = 16
# Room a request's headers take in a message (signature, trace context, content type, message
# id): NATS counts headers toward max_payload, so the default body limit leaves this much of the
# default server's 1 MiB for them.
HEADER_ROOM = 8 * 1024
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024 - HEADER_ROOM


class Keyring:
    """Signing keys by id. Its repr names the ids only, never a secret."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self._secrets = {key_id: secret.encode() for key_id, secret in secrets.items()}

    def secret(self, key_id: str) -> bytes | None:
        return self._secrets.get(key_id)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._secrets)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def __repr__(self) -> str:
        return f"Keyring(ids={list(self._secrets)!r})"


def parse_keys(environ: Mapping[str, str]) -> Keyring:
    """Keys from ``EXECUTOR_API_KEYS`` (``id:secret,...``) or ``EXECUTOR_API_KEY``."""
    many = environ.get("EXECUTOR_API_KEYS", "").strip()
    single = environ.get("EXECUTOR_API_KEY", "").strip()
    if many and single:
        raise ConfigError("set EXECUTOR_API_KEYS or EXECUTOR_API_KEY, not both")
    if single:
        _check_secret("EXECUTOR_API_KEY", "default", single)
        return Keyring({"default": single})
    secrets: dict[str, str] = {}
    for position, entry in enumerate(filter(None, (e.strip() for e in many.split(","))), 1):
        key_id, colon, secret = entry.partition(":")
        if not colon or not KEY_ID.fullmatch(key_id):
            raise ConfigError(
                f"EXECUTOR_API_KEYS: entry {position} must be 'id:secret' with an id of "
                "letters, digits, '.', '_' or '-'"
            )
        if key_id in secrets:
            raise ConfigError(f"EXECUTOR_API_KEYS: key id '{key_id}' appears twice")
        _check_secret("EXECUTOR_API_KEYS", key_id, secret)
        secrets[key_id] = secret
    return Keyring(secrets)


def _check_secret(variable: str, key_id: str, secret: str) -> None:
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{variable}: the secret of key '{key_id}' is shorter than {MIN_SECRET_LENGTH} "
            "characters (use 'pyexec keygen')"
        )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """A replica's settings. Built by :func:`load`; see docs/configuration.md."""

    nats_urls: tuple[str, ...] | None
    keys: Keyring = field(repr=True)
    prefix: str = "pyexec"
    queue_group: str = "pyexec"
    inbox_prefix: str = "_PYEXEC_INBOX"
    reply_prefixes: tuple[str, ...] = ("_INBOX",)
    jobs_max_msgs: int = 100_000
    workers: int
    warm_children: int
    default_timeout: float = 30.0
    max_timeout: float = 60.0
    max_job_timeout: float = 3600.0
    memory_mb: int = 512
    stdout_limit: int = 65536
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_ctx_depth: int = 32
    scripts_dir: Path = DEFAULT_SCRIPTS_DIR
    queue_limit: int = 64
    queue_wait: float = 3.0
    metrics_port: int = 9464
    metrics_host: str = "0.0.0.0"  # noqa: S104 - the scrape port is meant to be reached
    metrics_key_ids: bool = False
    log_format: Literal["json", "console"] = "json"
    allowed_modules: tuple[str, ...] = DEFAULT_ALLOWED_MODULES
    shutdown_grace: float = 30.0
    data_dir: Path = Path(".pyexec")
    nonce_cache_size: int = 200_000
    require_isolation: bool = False
    disabled_layers: tuple[str, ...] = ()
    run_as_user: str = "nobody"
    scratch_dir: str = ""
    scratch_mb: int = 64
    scratch_files: int = 1000
    network: Literal["on", "off"] = "on"
    net_ports: tuple[int, ...] = (80, 443)
    net_allow: tuple[str, ...] = ()
    read_paths: tuple[str, ...] = ()
    pool_mode: Literal["warm", "fresh"] = "warm"
    tiers: tuple[Literal["stdlib", "full"], ...] = ("stdlib", "full")
    huge_pages: bool = True
    job_max_deliver: int = 3
    job_ack_wait: float = 30.0
    job_share: float = 0.5
    results_max_age: float = 86400.0
    files_max_mb: int = 256
    files_max_age: float = 86400.0
    jobs_duplicate_window: float = 120.0
    stream_replicas: int = 1

    @property
    def embedded(self) -> bool:
        """True when no NATS_URL is set and ``pyexec serve`` starts its own server."""
        return self.nats_urls is None

    def subject(self, kind: str) -> str:
        return f"{self.prefix}.{kind}"

    def stream(self, base: str) -> str:
        """The name of a stream or bucket for this prefix (``protocol.stream_name``)."""
        return stream_name(base, self.prefix)

    def pool_config(self, result_limit: int) -> PoolConfig:
        return PoolConfig(
            workers=self.workers,
            warm_children=self.warm_children,
            memory_mb=self.memory_mb,
            stdout_limit=self.stdout_limit,
            result_limit=result_limit,
            allowed_modules=self.allowed_modules,
            disabled_layers=self.disabled_layers,
            run_as_user=self.run_as_user,
            scratch_dir=self.scratch_dir,
            scratch_limit_mb=self.scratch_mb,
            scratch_files=self.scratch_files,
            out_files_mb=self.files_max_mb,
            network=self.network,
            net_ports=self.net_ports,
            net_allow=self.net_allow,
            read_paths=self.read_paths,
            mode=self.pool_mode,
            tiers=self.tiers,
            huge_pages=self.huge_pages,
        )


# Every setting of a replica is an environment variable with one of these prefixes.
SETTING_PREFIXES = ("EXECUTOR_", "NATS_")


def environment_with(**settings: str) -> dict[str, str]:
    """This process's environment with no pyexec setting in it but ``settings``: what a replica
    started as a child process (tests, benchmarks) should see, so that only the settings given
    apply."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    env.update(settings)
    return env


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment, naming the variable in every error."""
    env = os.environ if environ is None else environ
    urls_text = env.get("NATS_URL", "").strip()
    nats_urls = tuple(u.strip() for u in urls_text.split(",") if u.strip()) or None
    keys = parse_keys(env)
    cpus = available_cpus()
    workers = _int(env, "EXECUTOR_WORKERS", cpus, low=1, high=1024)
    default_timeout = _float(env, "EXECUTOR_DEFAULT_TIMEOUT", 30.0)
    max_timeout = _float(env, "EXECUTOR_MAX_TIMEOUT", 60.0)
    max_job_timeout = _float(env, "EXECUTOR_MAX_JOB_TIMEOUT", 3600.0)
    if default_timeout > max_timeout:
        raise ConfigError(
            f"EXECUTOR_DEFAULT_TIMEOUT ({default_timeout:g}) is over EXECUTOR_MAX_TIMEOUT "
            f"({max_timeout:g})"
        )
    prefix = env.get("EXECUTOR_SUBJECT_PREFIX", "pyexec").strip()
    if not SUBJECT_TOKEN.fullmatch(prefix):
        raise ConfigError("EXECUTOR_SUBJECT_PREFIX must be subject tokens such as 'pyexec'")
    inbox_prefix = env.get("EXECUTOR_INBOX_PREFIX", "").strip() or "_PYEXEC_INBOX"
    if not SUBJECT_TOKEN.fullmatch(inbox_prefix) or inbox_prefix.split(".")[0] == "_INBOX":
        raise ConfigError(
            "EXECUTOR_INBOX_PREFIX must be subject tokens (letters, digits, _ and -, joined by "
            f"dots) outside _INBOX, not '{inbox_prefix}'"
        )
    queue_group = env.get("EXECUTOR_QUEUE_GROUP", "pyexec").strip()
    if not SUBJECT_TOKEN.fullmatch(queue_group):
        raise ConfigError("EXECUTOR_QUEUE_GROUP must be a name such as 'pyexec'")
    scripts_dir = Path(env.get("EXECUTOR_SCRIPTS_DIR", "") or DEFAULT_SCRIPTS_DIR)
    if not scripts_dir.is_dir():
        raise ConfigError(f"EXECUTOR_SCRIPTS_DIR: '{scripts_dir}' is not a directory")
    log_format = env.get("EXECUTOR_LOG_FORMAT", "").strip().lower()
    if not log_format:
        log_format = "console" if sys.stderr.isatty() else "json"
    if log_format not in ("json", "console"):
        raise ConfigError("EXECUTOR_LOG_FORMAT must be 'json' or 'console'")
    allowed = env.get("EXECUTOR_ALLOWED_MODULES", "").strip()
    allowed_modules = (
        tuple(m.strip() for m in allowed.split(",") if m.strip())
        if allowed
        else DEFAULT_ALLOWED_MODULES
    )
    for module in allowed_modules:
        if not SUBJECT_TOKEN.fullmatch(module) or "-" in module:
            raise ConfigError(f"EXECUTOR_ALLOWED_MODULES: '{module}' is not a module name")
    return Settings(
        nats_urls=nats_urls,
        keys=keys,
        prefix=prefix,
        queue_group=queue_group,
        inbox_prefix=inbox_prefix,
        reply_prefixes=_reply_prefixes(env, inbox_prefix),
        jobs_max_msgs=_int(env, "EXECUTOR_JOBS_MAX_MSGS", 100_000, low=100, high=100_000_000),
        workers=workers,
        warm_children=_int(env, "EXECUTOR_WARM_CHILDREN", workers, low=1, high=1024),
        default_timeout=default_timeout,
        max_timeout=max_timeout,
        max_job_timeout=max_job_timeout,
        memory_mb=_int(env, "EXECUTOR_MEMORY_MB", 512, low=16, high=1024 * 1024),
        stdout_limit=_int(env, "EXECUTOR_STDOUT_LIMIT", 65536, low=0, high=64 * 1024 * 1024),
        max_request_bytes=_int(
            env,
            "EXECUTOR_MAX_REQUEST_BYTES",
            DEFAULT_MAX_REQUEST_BYTES,
            low=1024,
            high=64 * 1024 * 1024,
        ),
        max_ctx_depth=_int(env, "EXECUTOR_MAX_CTX_DEPTH", 32, low=1, high=1000),
        scripts_dir=scripts_dir,
        queue_limit=_int(env, "EXECUTOR_QUEUE_LIMIT", 64 * workers, low=0, high=1_000_000),
        queue_wait=_float(env, "EXECUTOR_QUEUE_WAIT", 3.0),
        metrics_port=_int(env, "EXECUTOR_METRICS_PORT", 9464, low=0, high=65535),
        metrics_host=_host(env, "EXECUTOR_METRICS_HOST", "0.0.0.0"),  # noqa: S104
        metrics_key_ids=_flag(env, "EXECUTOR_METRICS_KEY_IDS"),
        log_format="console" if log_format == "console" else "json",
        allowed_modules=allowed_modules,
        shutdown_grace=_float(env, "EXECUTOR_SHUTDOWN_GRACE", 30.0),
        data_dir=Path(env.get("EXECUTOR_DATA_DIR", "") or ".pyexec"),
        nonce_cache_size=_int(
            env, "EXECUTOR_NONCE_CACHE_SIZE", 200_000, low=1000, high=100_000_000
        ),
        job_max_deliver=_int(env, "EXECUTOR_JOB_MAX_DELIVER", 3, low=1, high=100),
        job_ack_wait=_float(env, "EXECUTOR_JOB_ACK_WAIT", 30.0),
        job_share=_share(env),
        results_max_age=_float(env, "EXECUTOR_RESULTS_MAX_AGE", 86400.0),
        files_max_mb=_int(env, "EXECUTOR_FILES_MAX_MB", 256, low=1, high=1024 * 1024),
        files_max_age=_float(env, "EXECUTOR_FILES_MAX_AGE", 86400.0),
        jobs_duplicate_window=_float(env, "EXECUTOR_JOBS_DUPLICATE_WINDOW", 120.0),
        stream_replicas=_int(env, "EXECUTOR_STREAM_REPLICAS", 1, low=1, high=5),
        **_isolation(env),
        **_warm_parents(env),
    )


def _reply_prefixes(env: Mapping[str, str], inbox_prefix: str) -> tuple[str, ...]:
    """What a reply subject's first token must start with: callers' inbox prefixes."""
    prefixes = tuple(_list(env, "EXECUTOR_REPLY_PREFIXES")) or ("_INBOX",)
    for prefix in prefixes:
        if not re.fullmatch(r"_?[A-Za-z0-9_-]+", prefix) or inbox_prefix.startswith(prefix):
            raise ConfigError(
                f"EXECUTOR_REPLY_PREFIXES: '{prefix}' is not a subject token's start, or it "
                f"covers the replicas' own EXECUTOR_INBOX_PREFIX '{inbox_prefix}'"
            )
    return prefixes


def _host(env: Mapping[str, str], name: str, default: str) -> str:
    text = env.get(name, "").strip() or default
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{name} must be an IP address such as 0.0.0.0 or 127.0.0.1") from None
    return text


def _share(env: Mapping[str, str]) -> float:
    share = _float(env, "EXECUTOR_JOB_SHARE", 0.5)
    if share > 1:
        raise ConfigError(f"EXECUTOR_JOB_SHARE must be at most 1, not {share:g}")
    return share


def _isolation(env: Mapping[str, str]) -> dict[str, Any]:
    """The isolation settings (see docs/security.md)."""
    require = _flag(env, "EXECUTOR_REQUIRE_ISOLATION")
    disabled = _list(env, "EXECUTOR_UNSAFE_DISABLE_LAYERS")
    unknown = set(disabled) - set(LAYERS)
    if unknown:
        raise ConfigError(
            f"EXECUTOR_UNSAFE_DISABLE_LAYERS: unknown layer(s) {', '.join(sorted(unknown))}; "
            f"the layers are {', '.join(LAYERS)}"
        )
    if require and disabled:
        raise ConfigError(
            "EXECUTOR_UNSAFE_DISABLE_LAYERS cannot be used with EXECUTOR_REQUIRE_ISOLATION=1"
        )
    network = env.get("EXECUTOR_NETWORK", "").strip().lower() or "on"
    if network not in ("on", "off"):
        raise ConfigError("EXECUTOR_NETWORK must be 'on' or 'off'")
    ports = []
    for text in _list(env, "EXECUTOR_NET_PORTS") or ["80", "443"]:
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ConfigError(f"EXECUTOR_NET_PORTS: '{text}' is not a TCP port")
        ports.append(int(text))
    allow = _list(env, "EXECUTOR_NET_ALLOW")
    for entry in allow:
        try:
            parse_allow(entry)
        except ValueError as exc:
            raise ConfigError(f"EXECUTOR_NET_ALLOW: {exc}") from None
    user = env.get("EXECUTOR_RUN_AS_USER", "").strip() or "nobody"
    mode = env.get("EXECUTOR_POOL_MODE", "").strip().lower() or "warm"
    if mode not in ("warm", "fresh"):
        raise ConfigError("EXECUTOR_POOL_MODE must be 'warm' or 'fresh'")
    return {
        "require_isolation": require,
        "disabled_layers": tuple(disabled),
        "run_as_user": user,
        "scratch_dir": env.get("EXECUTOR_SCRATCH_DIR", "").strip(),
        "scratch_mb": _int(env, "EXECUTOR_SCRATCH_MB", 64, low=1, high=1024 * 1024),
        "scratch_files": _int(env, "EXECUTOR_SCRATCH_FILES", 1000, low=1, high=1_000_000),
        "network": "off" if network == "off" else "on",
        "net_ports": tuple(ports),
        "net_allow": tuple(allow),
        "read_paths": tuple(_list(env, "EXECUTOR_READ_PATHS", separator=":")),
        "pool_mode": "fresh" if mode == "fresh" else "warm",
    }


TIERS = ("stdlib", "full")


def _warm_parents(env: Mapping[str, str]) -> dict[str, Any]:
    """Which warm parents a replica keeps, and whether their memory uses huge pages."""
    tiers = [tier.lower() for tier in _list(env, "EXECUTOR_TIERS")] or list(TIERS)
    unknown = [tier for tier in tiers if tier not in TIERS]
    if unknown or len(set(tiers)) != len(tiers):
        raise ConfigError(
            "EXECUTOR_TIERS must list 'stdlib', 'full' or both, each once, "
            f"not '{env.get('EXECUTOR_TIERS', '')}'"
        )
    huge = env.get("EXECUTOR_HUGE_PAGES", "").strip()
    return {
        "tiers": tuple(tier for tier in TIERS if tier in tiers),
        "huge_pages": True if not huge else _flag(env, "EXECUTOR_HUGE_PAGES"),
    }


def _list(env: Mapping[str, str], name: str, separator: str = ",") -> list[str]:
    return [part.strip() for part in env.get(name, "").split(separator) if part.strip()]


def _flag(env: Mapping[str, str], name: str) -> bool:
    text = env.get(name, "").strip().lower()
    if text in ("", "0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name} must be 1 or 0")


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


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not '{text}'") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not '{text}'") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name} must be a positive number of seconds, not '{text}'")
    return value
