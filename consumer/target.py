"""Where the command-line tools (``pyexec call``, ``job`` and ``bench --url``) send, and with
which key: from the environment, completed from the embedded server's ``dev.env``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from pyexec_client.client import Client

from consumer import config
from consumer.errors import ConfigError

DEV_ENV_FILE = "dev.env"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a tool sends, and with which key."""

    urls: list[str]
    key_id: str
    secret: bytes = dataclasses.field(repr=False)
    prefix: str

    async def connect(self, encoding: str = "json") -> Client:
        return await Client.connect(
            self.urls, self.key_id, self.secret, encoding=encoding, prefix=self.prefix
        )


def find_target(key_id: str | None, url: str = "") -> Target:
    """The servers (``url`` if given, else ``NATS_URL``), key and prefix to use."""
    env = call_environment(os.environ)
    urls = url.strip() or env.get("NATS_URL", "").strip()
    if not urls:
        raise ConfigError("NATS_URL is not set and no embedded server's dev.env was found")
    keyring = config.parse_keys(env)
    if not keyring:
        raise ConfigError("no key to sign with: set EXECUTOR_API_KEYS or EXECUTOR_API_KEY")
    key_id = key_id or keyring.ids[0]
    secret = keyring.secret(key_id)
    if secret is None:
        raise ConfigError(f"--key-id '{key_id}' is not in EXECUTOR_API_KEYS")
    prefix = env.get("EXECUTOR_SUBJECT_PREFIX", "").strip() or "pyexec"
    return Target(urls=urls.split(","), key_id=key_id, secret=secret, prefix=prefix)


def call_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment, completed from the embedded server's dev.env where it is silent."""
    merged = dict(environ)
    data_dir = Path(environ.get("EXECUTOR_DATA_DIR", "") or ".pyexec")
    env_file = data_dir / DEV_ENV_FILE
    if not environ.get("NATS_URL") and env_file.is_file():
        for line in env_file.read_text().splitlines():
            name, _, value = line.partition("=")
            if name and not merged.get(name):
                merged[name] = value
    return merged
