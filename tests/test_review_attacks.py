"""Holes found by attacking the client package, the named scripts' blanking and the settings:
each test pins the behaviour that closes one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyexec_client.client import Client
from pyexec_client.errors import ConnectError

from consumer import config
from consumer.catalog import Catalog
from consumer.errors import ConfigError
from consumer.inputs import declare
from consumer.readers import MAX_SECONDS, Seconds
from consumer.variables import VARIABLES
from tests.conftest import (
    Caller,
    NatsServer,
    ReplicaProcess,
    free_port,
    once_routed,
    start_replica,
)

PASSWORD = "hunter2-pass/w@rd"  # noqa: S105 - made up; no error may show it

# -- the client's connection errors ------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        # nats-py takes a URL without a scheme; its credentials were shown as given.
        "alice:{password}@127.0.0.1:{port}",
        # A port that is no number: the credentials check raised ValueError, not ConnectError.
        "nats://alice:{password}@127.0.0.1:port",
        # An '@' or '/' in the password, as people write it.
        "nats://alice:{password}@127.0.0.1:{port}",
        "nats://{password}@127.0.0.1:{port}",
        "nats://127.0.0.1:{port},tls://alice:{password}@127.0.0.1:{port}",
    ],
)
def test_a_failed_connect_is_a_connect_error_without_the_urls_credentials(url: str) -> None:
    """Whatever form the server URL takes, a connection that cannot be made raises
    ConnectError, and neither its message nor its repr holds the URL's password or token."""
    servers = url.format(password=PASSWORD, port=free_port())

    async def go() -> BaseException:
        try:
            await Client.connect(servers, "k", "s" * 32)
        except BaseException as exc:  # noqa: BLE001 - the test looks at what was raised
            return exc
        raise AssertionError("connected to a port nothing listens on")

    exc = asyncio.run(go())
    assert isinstance(exc, ConnectError), repr(exc)
    for shown in (str(exc), repr(exc)):
        assert PASSWORD not in shown
        assert "hunter2" not in shown
    assert "127.0.0.1" in str(exc)


# -- the declaration and the Meta import blanked out of named scripts --------------------------

# Characters str.splitlines() ends a line at, that Python's tokenizer does not.
NOT_LINE_ENDS = ["\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]

MODULE = '''"""Doubles n.{odd} (the docstring holds an odd character)"""

from typing import Annotated, Any

from msgspec import Meta

NOTE = "kept{odd}"


class Input:
    n: Annotated[int, Meta(ge=1, le=100)]


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    if ctx["n"] == 13:
        raise ValueError("unlucky")
    return {{"doubled": ctx["n"] * 2, "note": NOTE}}
'''


@pytest.mark.parametrize("odd", NOT_LINE_ENDS, ids=[f"U+{ord(c):04X}" for c in NOT_LINE_ENDS])
def test_blanking_counts_lines_as_python_does(odd: str) -> None:
    """A form feed, a vertical tab or a Unicode line separator in a docstring or a string
    before the declaration does not shift what is blanked: the import and the class go, every
    other line stays where it was, as it was."""
    source = MODULE.format(odd=odd)
    declared = declare(source, "odd")
    assert declared.input_type is not None
    ran = declared.source.split("\n")
    written = source.split("\n")
    assert len(ran) == len(written)
    blanked = [number for number, line in enumerate(written) if ran[number] != line]
    meta_line = written.index("from msgspec import Meta")
    class_line = written.index("class Input:")
    assert blanked == [meta_line, class_line, class_line + 1]
    assert all(ran[number] == "" for number in blanked)
    compile(declared.source, "odd.py", "exec")


@pytest.mark.parametrize("ending", ["\r\n", "\r"])
def test_blanking_keeps_windows_and_old_mac_line_ends(ending: str) -> None:
    """A script saved with CRLF or CR line ends is blanked at the same lines as with LF."""
    source = MODULE.format(odd="").replace("\n", ending)
    declared = declare(source, "ends")
    assert declared.input_type is not None
    assert (
        declared.source.splitlines() == declare(MODULE.format(odd=""), "lf").source.split("\n")[:-1]
    )


def test_describe_shows_the_declaration_past_a_form_feed(tmp_path: Path) -> None:
    """`pyexec scripts` shows the class Input as written even after a form feed."""
    (tmp_path / "odd.py").write_text(MODULE.format(odd="\x0c"), encoding="utf-8")
    described = Catalog(tmp_path).describe("odd")
    assert "class Input:\n    n: Annotated[int, Meta(ge=1, le=100)]" in described


@pytest.fixture(scope="module")
def odd_replica(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReplicaProcess]:
    """A replica serving scripts with a form feed and a line separator in their docstrings."""
    root = tmp_path_factory.mktemp("odd_scripts")
    (root / "formfeed.py").write_text(MODULE.format(odd="\x0c"), encoding="utf-8")
    (root / "separator.py").write_text(MODULE.format(odd="\u2028"), encoding="utf-8")
    (root / "latin1.py").write_bytes(b'"""Caf\xe9."""\n\n\ndef execute(ctx):\n    return 1\n')
    proc = start_replica(nats_server.url, EXECUTOR_SCRIPTS_DIR=str(root))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("name", ["formfeed", "separator"])
def test_named_script_with_odd_characters_runs_as_written(
    nats_server: NatsServer, odd_replica: ReplicaProcess, name: str
) -> None:
    """An installed script whose docstring holds a form feed or U+2028 runs with its declared
    input checked, its own code intact, and its tracebacks on the lines it was written with."""
    caller = Caller(nats_server.url, odd_replica.prefix)
    reply = caller.named(name, {"n": 4})
    assert reply.status == "ok", reply.error
    assert isinstance(reply.result, dict)
    assert reply.result["doubled"] == 8
    refused = caller.named(name, {"n": 0})
    assert refused.error is not None
    assert refused.error.code == "invalid_request"
    failed = caller.named(name, {"n": 13})
    assert failed.error is not None
    assert failed.error.code == "script_error", failed.error
    raising = 1 + MODULE.split("\n").index('        raise ValueError("unlucky")')
    assert f"line {raising}" in (failed.error.traceback or "")


def test_named_script_that_is_not_utf8_is_a_clear_refusal(
    nats_server: NatsServer, odd_replica: ReplicaProcess
) -> None:
    """An installed script that is not UTF-8 is refused as invalid_request naming it, not
    answered as an internal error."""
    reply = Caller(nats_server.url, odd_replica.prefix).named("latin1")
    assert reply.status == "rejected", reply
    assert reply.error is not None
    assert reply.error.code == "invalid_request", reply.error
    assert "latin1" in reply.error.message
    assert "UTF-8" in reply.error.message


# -- settings that name a time -----------------------------------------------------------------

SECONDS_VARIABLES = [v.name for v in VARIABLES if isinstance(v.parse, Seconds)]


@pytest.mark.parametrize("name", SECONDS_VARIABLES)
@pytest.mark.parametrize("value", ["1e300", "3.2e8"])
def test_a_time_too_long_to_use_is_refused_naming_the_variable(name: str, value: str) -> None:
    """A number of seconds no deadline, ack wait or retention can hold (JetStream durations
    are 64-bit nanoseconds) is refused with a message naming the variable."""
    env = {"EXECUTOR_DEFAULT_TIMEOUT": "1", name: value}
    with pytest.raises(ConfigError, match=f"^{name} must be at most 315360000 seconds"):
        config.load(env)


def test_ten_years_is_still_taken() -> None:
    """The bound is ten years: a long retention up to it still starts."""
    settings = config.load({"EXECUTOR_RESULTS_MAX_AGE": str(MAX_SECONDS)})
    assert settings.results_max_age == MAX_SECONDS


def test_a_replica_with_a_retention_it_cannot_use_exits_with_the_message(
    nats_server: NatsServer,
) -> None:
    """A replica started with EXECUTOR_RESULTS_MAX_AGE=1e300 stops at once with exit code 2
    and the variable's message, instead of an OverflowError traceback after connecting."""
    replica = start_replica(nats_server.url, wait=False, EXECUTOR_RESULTS_MAX_AGE="1e300")
    try:
        code = replica.process.wait(timeout=60)
    finally:
        replica.stop()
    output = "".join(replica.lines)
    assert code == 2, output[-2000:]
    assert "EXECUTOR_RESULTS_MAX_AGE must be at most" in output
    assert "OverflowError" not in output


# -- the client's answers to status and cancel -------------------------------------------------


@pytest.mark.parametrize("action", ["status", "cancel"])
def test_a_signed_answer_that_is_no_status_is_a_bad_reply(
    nats_server: NatsServer, action: str
) -> None:
    """An answer signed for the request but not shaped as the call's answer (a holder of the
    key with another version, or a bug) is BadReply, a ClientError, not a bare decode error."""
    import nats
    from pyexec_client.errors import BadReply
    from pyexec_client.signing import NONCE_HEADER, sign_reply

    from tests.conftest import KEY_ID, SECRET

    prefix = f"odd-{action}"

    async def scenario() -> BaseException | None:
        responder = await nats.connect(nats_server.url)

        async def answer(msg: nats.aio.msg.Msg) -> None:
            body = b'{"job_id": 5, "state": "sideways"}'
            nonce = (msg.headers or {})[NONCE_HEADER]
            headers = sign_reply(KEY_ID, SECRET.encode(), msg.subject, nonce, body)
            await responder.publish(msg.reply, body, headers=headers)

        await responder.subscribe(f"{prefix}.job.{action}", cb=answer)
        await responder.flush()
        try:
            async with Client.connect(nats_server.url, KEY_ID, SECRET, prefix=prefix) as client:
                try:
                    await once_routed(lambda: getattr(client, action)("0" * 32))
                except BadReply as exc:
                    return exc
                return None
        finally:
            await responder.close()

    raised = asyncio.run(scenario())
    assert isinstance(raised, BadReply)
    assert "could not be decoded" in str(raised)
