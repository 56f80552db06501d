"""A replica's settings, built from the table of variables (``consumer.variables``) in one
place and checked at start-up; and what the tools that call a fleet read."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from consumer.errors import ConfigError
from consumer.protocol import stream_name
from consumer.variables import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_SCRIPTS_DIR,
    HEADER_ROOM,
    KEY_ID,
    VARIABLE,
    VARIABLES,
)
from sandbox import PoolConfig

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_SCRIPTS_DIR",
    "HEADER_ROOM",
    "KEY_ID",
    "Caller",
    "Keyring",
    "Settings",
    "environment_with",
    "load",
    "load_caller",
]


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


# -- the settings ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Settings:
    """A replica's settings. Built by :func:`load` from :data:`VARIABLES`; see
    docs/configuration.md. ``pool`` is what the worker pool runs with (its ``result_limit`` is
    set by the replica once it knows the server's max payload)."""

    nats_urls: tuple[str, ...] | None
    keys: Keyring
    prefix: str
    queue_group: str
    inbox_prefix: str
    reply_prefixes: tuple[str, ...]
    jobs_max_msgs: int
    default_timeout: float
    max_timeout: float
    max_job_timeout: float
    max_request_bytes: int
    max_ctx_depth: int
    scripts_dir: Path
    queue_limit: int
    queue_wait: float
    metrics_port: int
    metrics_host: str
    metrics_key_ids: bool
    log_format: Literal["json", "console"]
    shutdown_grace: float
    data_dir: Path
    nonce_cache_size: int
    require_isolation: bool
    job_max_deliver: int
    job_ack_wait: float
    job_share: float
    results_max_age: float
    files_max_age: float
    jobs_duplicate_window: float
    stream_replicas: int
    pool: PoolConfig

    @property
    def embedded(self) -> bool:
        """True when no NATS_URL is set and ``pyexec serve`` starts its own server."""
        return self.nats_urls is None

    def subject(self, kind: str) -> str:
        return f"{self.prefix}.{kind}"

    def stream(self, base: str) -> str:
        """The name of a stream or bucket for this prefix (``protocol.stream_name``)."""
        return stream_name(base, self.prefix)


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment, naming the variable in every error."""
    env = os.environ if environ is None else environ
    read: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    pool: dict[str, Any] = {}
    for variable in VARIABLES:
        value = read[variable.name] = variable.read(env, read)
        if variable.pool_field is not None:
            pool[variable.pool_field] = value
        elif variable.field is not None:
            fields[variable.field] = value
    if env.get("NATS_URL") is not None and read["NATS_URL"] is None:
        # Set but empty (a template whose value was missing): not the embedded server.
        raise ConfigError(
            f"NATS_URL is set but names no server ('{env['NATS_URL']}'); "
            "unset it to start the embedded server"
        )
    if read["EXECUTOR_DEFAULT_TIMEOUT"] > read["EXECUTOR_MAX_TIMEOUT"]:
        raise ConfigError(
            f"EXECUTOR_DEFAULT_TIMEOUT ({read['EXECUTOR_DEFAULT_TIMEOUT']:g}) is over "
            f"EXECUTOR_MAX_TIMEOUT ({read['EXECUTOR_MAX_TIMEOUT']:g})"
        )
    for prefix in read["EXECUTOR_REPLY_PREFIXES"]:
        inbox_prefix = read["EXECUTOR_INBOX_PREFIX"]
        if not re.fullmatch(r"_?[A-Za-z0-9_-]+", prefix) or inbox_prefix.startswith(prefix):
            raise ConfigError(
                f"EXECUTOR_REPLY_PREFIXES: '{prefix}' is not a subject token's start, or it "
                f"covers the replicas' own EXECUTOR_INBOX_PREFIX '{inbox_prefix}'"
            )
    if read["EXECUTOR_REQUIRE_ISOLATION"] and read["EXECUTOR_UNSAFE_DISABLE_LAYERS"]:
        raise ConfigError(
            "EXECUTOR_UNSAFE_DISABLE_LAYERS cannot be used with EXECUTOR_REQUIRE_ISOLATION=1"
        )
    return Settings(keys=_keyring(read), pool=PoolConfig(**pool), **fields)


def _keyring(read: Mapping[str, Any]) -> Keyring:
    if read["EXECUTOR_API_KEYS"] and read["EXECUTOR_API_KEY"]:
        raise ConfigError("set EXECUTOR_API_KEYS or EXECUTOR_API_KEY, not both")
    return Keyring(read["EXECUTOR_API_KEY"] or read["EXECUTOR_API_KEYS"] or {})


@dataclass(frozen=True)
class Caller:
    """What the tools that call a fleet (``pyexec call``, ``job``, ``bench --url``) read."""

    nats_urls: tuple[str, ...] | None
    keys: Keyring
    prefix: str
    data_dir: Path


def load_caller(
    environ: Mapping[str, str] | None = None, *, fallback: Mapping[str, str] | None = None
) -> Caller:
    """The caller's settings from the environment, with ``fallback`` (the embedded server's
    dev.env) taken where the environment is silent."""
    env = dict(fallback or {})
    env.update((k, v) for k, v in (os.environ if environ is None else environ).items() if v.strip())
    names = ("NATS_URL", "EXECUTOR_API_KEYS", "EXECUTOR_API_KEY", "EXECUTOR_SUBJECT_PREFIX",
             "EXECUTOR_DATA_DIR")  # fmt: skip
    read = {name: VARIABLE[name].read(env, {}) for name in names}
    return Caller(
        nats_urls=read["NATS_URL"],
        keys=_keyring(read),
        prefix=read["EXECUTOR_SUBJECT_PREFIX"],
        data_dir=read["EXECUTOR_DATA_DIR"],
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
