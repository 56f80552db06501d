"""The configuration table: what docs/configuration.md promises is what the code applies."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from consumer import config
from consumer.errors import ConfigError
from consumer.readers import Variable, Whole, pool_bounds
from consumer.variables import VARIABLES, documented_table
from sandbox import PoolConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
KEY = "app:" + "s" * 32
BASE = {"EXECUTOR_API_KEYS": KEY}
NAME = re.compile(r"`(EXECUTOR_[A-Z0-9_]+|NATS_URL)`")


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def test_the_documented_summary_table_is_the_codes_table() -> None:
    """docs/configuration.md's summary table is exactly the one made from VARIABLES (defaults,
    bounds and all); on a difference, paste ``documented_table()`` into the docs."""
    expected = documented_table()
    assert expected in doc_text(), "docs/configuration.md's table differs; it should be:\n" + (
        expected
    )


def test_every_documented_variable_is_in_the_code_and_has_a_section() -> None:
    """No variable named in the docs is missing from the code's table, and each variable of
    the table has a section of its own (a heading that names it)."""
    names = {variable.name for variable in VARIABLES}
    assert sorted(set(NAME.findall(doc_text())) - names) == []
    headings = "\n".join(line for line in doc_text().splitlines() if line.startswith("#"))
    assert sorted(name for name in names if f"`{name}`" not in headings) == []


@pytest.mark.parametrize(
    "variable",
    [v for v in VARIABLES if v.pool_field is not None and isinstance(v.parse, Whole)],
    ids=lambda v: v.name,
)
def test_pool_bounds_are_the_pools_own(variable: Variable) -> None:
    """A whole-number pool variable takes exactly PoolConfig's bounds: each end reaches the pool,
    one past either end is refused with a message naming the variable and the bounds."""
    assert variable.pool_field is not None
    low, high = pool_bounds(variable.pool_field)
    env = {**BASE, "EXECUTOR_WORKERS": "4"}
    for edge in (low, high):
        pool = config.load({**env, variable.name: str(edge)}).pool
        assert getattr(pool, variable.pool_field) == edge
    for outside in (low - 1, high + 1):
        with pytest.raises(ConfigError) as refused:
            config.load({**env, variable.name: str(outside)})
        assert str(refused.value) == (
            f"{variable.name} must be between {low} and {high}, not {outside}"
        )


def test_unset_pool_variables_take_the_pools_defaults() -> None:
    """With only the required settings, the pool config equals PoolConfig's own defaults but
    for what depends on the host (workers) or on other variables (warm children)."""
    pool = config.load({**BASE, "EXECUTOR_WORKERS": "2"}).pool
    assert pool == PoolConfig(workers=2, warm_children=2)


def test_the_pool_config_survives_the_pipe_to_the_warm_parent() -> None:
    """A pool config built from the environment at its bounds passes PoolConfig's own checks
    (the ones it is decoded with on the other side of the pipe)."""
    pool = config.load({**BASE, "EXECUTOR_MEMORY_MB": "1048576", "EXECUTOR_STDOUT_LIMIT": "0"}).pool
    assert msgspec.json.decode(msgspec.json.encode(pool), type=PoolConfig) == pool


def test_metrics_listen_on_loopback_unless_nats_url_or_the_operator_says() -> None:
    """The metrics address defaults to 127.0.0.1 for the embedded server, 0.0.0.0 with
    NATS_URL, and an address set explicitly wins either way."""
    url = {"NATS_URL": "nats://127.0.0.1:4222"}
    assert config.load(BASE).metrics_host == "127.0.0.1"
    assert config.load({**BASE, **url}).metrics_host == "0.0.0.0"  # noqa: S104 - the expected value
    explicit = {"EXECUTOR_METRICS_HOST": "0.0.0.0"}  # noqa: S104 - an operator's choice
    assert config.load({**BASE, **explicit}).metrics_host == "0.0.0.0"  # noqa: S104
    loopback = {"EXECUTOR_METRICS_HOST": "127.0.0.1"}
    assert config.load({**BASE, **url, **loopback}).metrics_host == "127.0.0.1"


# The messages docs/configuration.md quotes, and the settings that produce them.
MESSAGES = [
    ({"EXECUTOR_WORKERS": "four"}, "EXECUTOR_WORKERS must be a whole number, not 'four'"),
    ({"EXECUTOR_WORKERS": "0"}, "EXECUTOR_WORKERS must be between 1 and 1024, not 0"),
    ({"EXECUTOR_MAX_TIMEOUT": "1m"}, "EXECUTOR_MAX_TIMEOUT must be a number of seconds, not '1m'"),
    (
        {"EXECUTOR_MAX_TIMEOUT": "0"},
        "EXECUTOR_MAX_TIMEOUT must be a positive number of seconds, not '0'",
    ),
    (
        {"EXECUTOR_DEFAULT_TIMEOUT": "90"},
        "EXECUTOR_DEFAULT_TIMEOUT (90) is over EXECUTOR_MAX_TIMEOUT (60)",
    ),
    ({"EXECUTOR_API_KEY": "s" * 32}, "set EXECUTOR_API_KEYS or EXECUTOR_API_KEY, not both"),
    (
        {"EXECUTOR_API_KEYS": f"{KEY},nocolon"},
        "EXECUTOR_API_KEYS: entry 2 must be 'id:secret' with an id of letters, digits, '.', "
        "'_' or '-'",
    ),
    ({"EXECUTOR_API_KEYS": f"{KEY},{KEY}"}, "EXECUTOR_API_KEYS: key id 'app' appears twice"),
    (
        {"EXECUTOR_API_KEYS": "app:short"},
        "EXECUTOR_API_KEYS: the secret of key 'app' is shorter than 16 characters (use "
        "'pyexec keygen')",
    ),
    (
        {"EXECUTOR_SUBJECT_PREFIX": "a..b"},
        "EXECUTOR_SUBJECT_PREFIX must be subject tokens such as 'pyexec'",
    ),
    ({"EXECUTOR_QUEUE_GROUP": "a b"}, "EXECUTOR_QUEUE_GROUP must be a name such as 'pyexec'"),
    (
        {"EXECUTOR_ALLOWED_MODULES": "math,my-lib"},
        "EXECUTOR_ALLOWED_MODULES: 'my-lib' is not a module name",
    ),
    (
        {"EXECUTOR_SCRIPTS_DIR": "/srv/scripts"},
        "EXECUTOR_SCRIPTS_DIR: '/srv/scripts' is not a directory",
    ),
    (
        {"EXECUTOR_METRICS_HOST": "localhost"},
        "EXECUTOR_METRICS_HOST must be an IP address such as 0.0.0.0 or 127.0.0.1",
    ),
    ({"EXECUTOR_LOG_FORMAT": "xml"}, "EXECUTOR_LOG_FORMAT must be 'json' or 'console'"),
    ({"EXECUTOR_NETWORK": "maybe"}, "EXECUTOR_NETWORK must be 'on' or 'off'"),
    ({"EXECUTOR_NET_PORTS": "443,http"}, "EXECUTOR_NET_PORTS: 'http' is not a TCP port"),
    (
        {"EXECUTOR_NET_ALLOW": "10.0.0.0/33"},
        "EXECUTOR_NET_ALLOW: '10.0.0.0/33' is neither a network nor a host name",
    ),
    ({"EXECUTOR_POOL_MODE": "cold"}, "EXECUTOR_POOL_MODE must be 'warm' or 'fresh'"),
    (
        {"EXECUTOR_TIERS": "small"},
        "EXECUTOR_TIERS must list 'stdlib', 'full' or both, each once, not 'small'",
    ),
    ({"EXECUTOR_HUGE_PAGES": "maybe"}, "EXECUTOR_HUGE_PAGES must be 1 or 0"),
    (
        {"EXECUTOR_JOB_SHARE": "half"},
        "EXECUTOR_JOB_SHARE must be a number above 0 and at most 1, not 'half'",
    ),
    ({"EXECUTOR_JOB_SHARE": "1.5"}, "EXECUTOR_JOB_SHARE must be above 0 and at most 1, not 1.5"),
    # A deployment's template with a missing value must not fall back to the embedded server.
    (
        {"NATS_URL": ","},
        "NATS_URL is set but names no server (','); unset it to start the embedded server",
    ),
    # Durations JetStream keeps: below a second every job would be redelivered at once.
    (
        {"EXECUTOR_JOB_ACK_WAIT": "1e-9"},
        "EXECUTOR_JOB_ACK_WAIT must be at least 1 seconds, not 1e-9",
    ),
]


@pytest.mark.parametrize(("settings", "message"), MESSAGES, ids=lambda v: str(v)[:40])
def test_malformed_values_give_the_documented_message(
    settings: dict[str, str], message: str
) -> None:
    """Each message the docs quote is the one the code gives for such a value."""
    with pytest.raises(ConfigError) as refused:
        config.load({**BASE, **settings})
    assert str(refused.value) == message
    quoted = " ".join(doc_text().split())  # the docs wrap long messages over lines
    assert message in quoted


def test_values_are_read_as_the_docs_say() -> None:
    """Spaces around a value are ignored, an empty value or a list of separators only is the
    default, switches take true/yes too, and lists are cleaned of empty entries."""
    settings = config.load(
        {
            **BASE,
            "EXECUTOR_WORKERS": " 3 ",
            "EXECUTOR_MEMORY_MB": "",
            "EXECUTOR_NET_PORTS": ",",
            "EXECUTOR_HUGE_PAGES": "No",
            "EXECUTOR_METRICS_KEY_IDS": "TRUE",
            "EXECUTOR_TIERS": " full , ",
            "EXECUTOR_LOG_FORMAT": "Console",
        }
    )
    assert settings.pool.workers == 3
    assert settings.pool.warm_children == 3
    assert settings.queue_limit == 64 * 3
    assert settings.pool.memory_mb == 512
    assert settings.pool.net_ports == (80, 443)
    assert settings.pool.huge_pages is False
    assert settings.metrics_key_ids is True
    assert settings.pool.tiers == ("full",)
    assert settings.log_format == "console"


@pytest.mark.parametrize("value", ["", "  ", ",", " , ,"])
def test_a_set_but_empty_nats_url_is_refused(value: str) -> None:
    """NATS_URL present but naming no server is refused, not read as unset (which would start
    the embedded server); unset, it still means the embedded server."""
    with pytest.raises(ConfigError, match="NATS_URL is set but names no server"):
        config.load({**BASE, "NATS_URL": value})
    unset = {k: v for k, v in BASE.items() if k != "NATS_URL"}
    assert config.load(unset).embedded


@pytest.mark.parametrize(
    "name",
    [
        "EXECUTOR_JOB_ACK_WAIT",
        "EXECUTOR_RESULTS_MAX_AGE",
        "EXECUTOR_FILES_MAX_AGE",
        "EXECUTOR_JOBS_DUPLICATE_WINDOW",
    ],
)
def test_jetstream_durations_are_at_least_a_second(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be at least 1 seconds"):
        config.load({**BASE, name: "0.5"})
    assert config.load({**BASE, name: "1"}) is not None


def test_the_callers_settings_come_from_the_same_table(tmp_path: Path) -> None:
    """`pyexec call` reads the prefix, keys and data folder by the replica's rules: the
    environment first, the embedded server's dev.env where it is silent, and the same errors."""
    fallback = {"NATS_URL": "nats://127.0.0.1:4999", "EXECUTOR_API_KEYS": "dev:" + "d" * 64}
    caller = config.load_caller({"EXECUTOR_SUBJECT_PREFIX": "staging"}, fallback=fallback)
    assert caller.nats_urls == ("nats://127.0.0.1:4999",)
    assert caller.keys.ids == ("dev",)
    assert caller.prefix == "staging"
    assert caller.data_dir == Path(".pyexec")
    mine = config.load_caller({**BASE, "NATS_URL": " "}, fallback=fallback)
    assert mine.keys.ids == ("app",)
    assert mine.nats_urls == ("nats://127.0.0.1:4999",)
    with pytest.raises(ConfigError, match="EXECUTOR_SUBJECT_PREFIX must be subject tokens"):
        config.load_caller({"EXECUTOR_SUBJECT_PREFIX": "a b"})
    assert config.load_caller({"EXECUTOR_DATA_DIR": str(tmp_path)}).data_dir == tmp_path


def test_only_the_configuration_reads_the_environment() -> None:
    """No module of the service but consumer/config.py reads os.environ or getenv (the named
    scripts run in the sandbox, which clears the environment, and are not counted)."""
    readers = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "consumer").rglob("*.py")
        if "scripts" not in path.parts
        and re.search(r"os\.environ|getenv", path.read_text(encoding="utf-8"))
    )
    assert readers == ["consumer/config.py"]
