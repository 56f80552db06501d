"""Where the command-line tools (``pyexec call``, ``job`` and ``bench --url``) send, and with
which key: from the environment, completed from the embedded server's ``dev.env``."""

from __future__ import annotations

import dataclasses
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
    caller = config.load_caller()
    if caller.nats_urls is None:
        caller = config.load_caller(fallback=dev_environment(caller.data_dir))
    urls = [u.strip() for u in url.split(",") if u.strip()] or list(caller.nats_urls or ())
    if not urls:
        raise ConfigError("NATS_URL is not set and no embedded server's dev.env was found")
    if not caller.keys:
        raise ConfigError("no key to sign with: set EXECUTOR_API_KEYS or EXECUTOR_API_KEY")
    key_id = key_id or caller.keys.ids[0]
    secret = caller.keys.secret(key_id)
    if secret is None:
        raise ConfigError(f"--key-id '{key_id}' is not in EXECUTOR_API_KEYS")
    return Target(urls=urls, key_id=key_id, secret=secret, prefix=caller.prefix)


def dev_environment(data_dir: Path) -> dict[str, str]:
    """The settings the embedded server wrote to ``data_dir/dev.env`` (none if it is missing)."""
    env_file = data_dir / DEV_ENV_FILE
    if not env_file.is_file():
        return {}
    found: dict[str, str] = {}
    for line in env_file.read_text().splitlines():
        name, _, value = line.partition("=")
        if name:
            found[name] = value
    return found
