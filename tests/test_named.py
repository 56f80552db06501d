"""Scripts run by name on ``<prefix>.named``: the shipped set, unknown names, folder escapes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer.config import DEFAULT_SCRIPTS_DIR, environment_with
from consumer.inputs import declare
from tests.conftest import Caller, NatsServer, RawReply, ReplicaProcess, start_replica

SERVICE_ERROR_CODE = "Nats-Service-Error-Code"

NESTED_SCRIPT = '''"""A nested script."""


def execute(ctx):
    return {"where": "folder.sub.name", "doubled": ctx["n"] * 2}
'''

OUTSIDE_SCRIPT = '''"""A script outside the scripts folder; it must never be reachable by name."""


def execute(ctx):
    return "outside"
'''

IMPORTS_OS_SCRIPT = '''"""A script that tries to reach the host."""

import os


def execute(ctx):
    return os.getcwd()
'''

# An installed script written as an ordinary module: the names of its declaration imported.
DECLARED_SCRIPT = '''"""Echo the declared input; say whether Meta reached the run."""

from typing import Annotated, Any, Literal

from msgspec import Meta


class Input:
    n: Annotated[int, Meta(ge=1, le=10)]
    mode: Literal["plain", "fail"] = "plain"


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    try:
        Meta  # noqa: B018
    except NameError:
        reached = False
    else:
        reached = True
    if ctx["mode"] == "fail":
        raise ValueError("failed on purpose")
    return {"n": ctx["n"], "mode": ctx["mode"], "meta_in_run": reached}
'''
DECLARATION = """

class Input:
    n: Annotated[int, Meta(ge=1)] = 1


def execute(ctx):
    return "ran"
"""
# Import lines that are not exactly `from msgspec import Meta` alone on its line: left in the
# source, where the sandbox refuses them like any import it does not allow.
SMUGGLED = {
    "another_name": "from msgspec import Meta, json",
    "an_alias": "from msgspec import Meta as os",
    "the_module": "import msgspec",
    "two_on_a_line": "from msgspec import Meta; import os",
    "not_at_the_top": "if True:\n    from msgspec import Meta",
    "then_os": "from msgspec import Meta\nimport os",
}


def named_body(name: str, ctx: dict[str, object] | None = None) -> bytes:
    return json.dumps({"name": name, "ctx": ctx or {}}).encode()


def assert_unknown_script(raw: RawReply) -> None:
    assert raw.reply.status == "rejected"
    assert raw.reply.error is not None
    assert raw.reply.error.code == "unknown_script"
    assert raw.headers.get(SERVICE_ERROR_CODE) == "404"


# -- the shipped scripts -----------------------------------------------------------------------


def test_text_normalize_collapses_whitespace_by_default(caller: Caller) -> None:
    """text.normalize trims and collapses whitespace and reports that the text changed."""
    reply = caller.named("text.normalize", {"text": "  Hello \t  World \n"})
    assert reply.status == "ok", reply.error
    assert reply.result == {"text": "Hello World", "changed": True}


def test_text_normalize_reports_unchanged_text(caller: Caller) -> None:
    """text.normalize says changed=false when the text is already normal."""
    reply = caller.named("text.normalize", {"text": "already normal"})
    assert reply.status == "ok", reply.error
    assert reply.result == {"text": "already normal", "changed": False}


def test_text_normalize_applies_nfkc_and_case(caller: Caller) -> None:
    """text.normalize folds compatibility characters (NFKC default) and applies the case option."""
    reply = caller.named(
        "text.normalize", {"text": "\uff28\uff25\uff2c\uff2c\uff2f\u00a0 \ufb01ne", "case": "lower"}
    )
    assert reply.status == "ok", reply.error
    assert reply.result == {"text": "hello fine", "changed": True}


def test_text_normalize_honours_form_and_keeps_whitespace(caller: Caller) -> None:
    """text.normalize composes with form=NFC and leaves spaces alone when collapse is off."""
    reply = caller.named(
        "text.normalize",
        {"text": " e\u0301 ", "form": "NFC", "collapse_whitespace": False, "case": "upper"},
    )
    assert reply.status == "ok", reply.error
    assert reply.result == {"text": " \u00c9 ", "changed": True}


def test_text_normalize_without_text_is_rejected_naming_the_field(caller: Caller) -> None:
    """text.normalize without ctx.text is refused before it runs, naming the missing field."""
    reply = caller.named("text.normalize", {})
    assert reply.status == "rejected"
    assert reply.error is not None
    assert reply.error.code == "invalid_request"
    assert "`text`" in reply.error.message


def test_a_wrongly_typed_field_is_rejected_naming_it(caller: Caller) -> None:
    """A field of the wrong type or value is named in the invalid_request message."""
    reply = caller.named("text.normalize", {"text": "a", "case": "shout"})
    assert reply.error is not None
    assert reply.error.code == "invalid_request"
    assert "ctx.case" in reply.error.message
    reply = caller.named("text.normalize", {"text": "a", "extra": 1})
    assert reply.error is not None
    assert reply.error.code == "invalid_request"
    assert "`extra`" in reply.error.message


def test_sql_transpile_translates_between_dialects(caller: Caller) -> None:
    """sql.transpile rewrites MySQL into PostgreSQL, one output per input statement."""
    reply = caller.named(
        "sql.transpile",
        {"sql": "SELECT IFNULL(a, b) FROM t; SELECT 1", "read": "mysql", "write": "postgres"},
    )
    assert reply.status == "ok", reply.error
    assert reply.result == {"statements": ["SELECT COALESCE(a, b) FROM t", "SELECT 1"]}


def test_sql_transpile_pretty_prints_on_several_lines(caller: Caller) -> None:
    """sql.transpile with pretty=true formats the statement over several lines."""
    reply = caller.named("sql.transpile", {"sql": "select a from t where b = 1", "pretty": True})
    assert reply.status == "ok", reply.error
    assert reply.result == {"statements": ["SELECT\n  a\nFROM t\nWHERE\n  b = 1"]}


def test_sql_transpile_with_blank_sql_is_rejected_naming_the_field(caller: Caller) -> None:
    """sql.transpile with a blank ctx.sql is refused as invalid_request naming ctx.sql."""
    reply = caller.named("sql.transpile", {"sql": "   "})
    assert reply.status == "rejected"
    assert reply.error is not None
    assert reply.error.code == "invalid_request"
    assert "ctx.sql" in reply.error.message


def test_named_reply_echoes_the_request_id(caller: Caller) -> None:
    """A named call echoes the caller's request_id, like a code call."""
    reply = caller.named("text.normalize", {"text": "x"}, request_id="named-req-1")
    assert reply.status == "ok", reply.error
    assert reply.request_id == "named-req-1"


# -- unknown and escaping names ----------------------------------------------------------------


def test_unknown_name_is_rejected_with_404(caller: Caller) -> None:
    """A name with no installed script is rejected/unknown_script with service error code 404."""
    raw = caller.raw("named", named_body("no.such.script"))
    assert_unknown_script(raw)
    assert raw.reply.error is not None
    assert "no.such.script" in raw.reply.error.message
    assert raw.headers.get("Nats-Service-Error")


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "../../etc/passwd",
        "/etc/passwd",
        "text/normalize",
        "text\\normalize",
        ".hidden",
        "text..normalize",
        "text.",
        "_private",
        "text._x",
        "text.normalize\x00",
        "text\x00normalize",
        "text.normalize\n",
        "text\nnormalize",
        " text.normalize",
        "x" * 200,
    ],
    ids=repr,
)
def test_names_that_try_to_escape_are_unknown(caller: Caller, name: str) -> None:
    """Traversal, absolute, hidden, private, control-character and long names are unknown_script."""
    assert_unknown_script(caller.raw("named", named_body(name)))


def test_overlong_name_is_unknown_script(caller: Caller) -> None:
    """A name far longer than any script's name is rejected as unknown_script (404)."""
    assert_unknown_script(caller.raw("named", named_body("a" * 1000)))


def test_rejected_name_is_shown_printable_in_the_error(caller: Caller) -> None:
    """The error message for a name with a NUL or newline shows no raw control characters."""
    raw = caller.raw("named", named_body("bad\x00name\nhere"))
    assert_unknown_script(raw)
    assert raw.reply.error is not None
    assert "\x00" not in raw.reply.error.message
    assert "\n" not in raw.reply.error.message
    assert "\n" not in raw.headers.get("Nats-Service-Error", "")


# -- a custom scripts folder -------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scripts folder with a nested script, escaping symlinks and a script importing os."""
    base = tmp_path_factory.mktemp("named")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.py").write_text(OUTSIDE_SCRIPT)
    root = base / "scripts"
    (root / "folder" / "sub").mkdir(parents=True)
    (root / "folder" / "sub" / "name.py").write_text(NESTED_SCRIPT)
    (root / "imports_os.py").write_text(IMPORTS_OS_SCRIPT)
    (root / "broken_input.py").write_text(
        "class Input:\n    when: datetime\n\n\ndef execute(ctx):\n    return 1\n"
    )
    (root / "declared").mkdir()
    (root / "declared" / "module.py").write_text(DECLARED_SCRIPT)
    for name, imports in SMUGGLED.items():
        (root / "declared" / f"{name}.py").write_text(
            "from typing import Annotated\n" + imports + "\n" + DECLARATION
        )
    (root / "escape.py").symlink_to(outside / "secret.py")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def custom_replica(nats_server: NatsServer, scripts_dir: Path) -> Iterator[ReplicaProcess]:
    """A replica whose EXECUTOR_SCRIPTS_DIR is the custom folder."""
    proc = start_replica(nats_server.url, EXECUTOR_SCRIPTS_DIR=str(scripts_dir))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def custom(nats_server: NatsServer, custom_replica: ReplicaProcess) -> Caller:
    """Calls the replica serving the custom folder."""
    return Caller(nats_server.url, custom_replica.prefix)


def test_nested_script_runs_by_dotted_name(custom: Caller) -> None:
    """folder.sub.name runs folder/sub/name.py from EXECUTOR_SCRIPTS_DIR with the given ctx."""
    reply = custom.named("folder.sub.name", {"n": 21})
    assert reply.status == "ok", reply.error
    assert reply.result == {"where": "folder.sub.name", "doubled": 42}


@pytest.mark.parametrize("name", ["escape", "linked.secret"])
def test_symlink_out_of_the_folder_is_unknown(custom: Caller, name: str) -> None:
    """A symlink (file or folder) inside the scripts folder that leads outside is unknown_script."""
    assert_unknown_script(custom.raw("named", named_body(name)))


def test_custom_folder_replaces_the_shipped_scripts(custom: Caller) -> None:
    """With EXECUTOR_SCRIPTS_DIR set, the shipped text.normalize is not served."""
    assert_unknown_script(custom.raw("named", named_body("text.normalize", {"text": "a"})))


def test_named_script_runs_in_the_sandbox(custom: Caller) -> None:
    """An installed script doing `import os` is refused with policy_violation, like sent code."""
    reply = custom.named("imports_os")
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "policy_violation"
    assert "os" in reply.error.message
    assert reply.result is None


def test_scripts_listing_leaves_out_escaping_symlinks(scripts_dir: Path) -> None:
    """`pyexec scripts` over the custom folder lists runnable scripts, not symlinks leading out."""
    env = environment_with(EXECUTOR_SCRIPTS_DIR=str(scripts_dir))
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "scripts"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    declared = {f"declared.{name}" for name in [*SMUGGLED, "module"]}
    assert set(listed) == {"broken_input", "folder.sub.name", "imports_os", *declared}
    assert "A nested script." in listed["folder.sub.name"]


def test_a_script_with_an_unreadable_input_declaration_is_refused(custom: Caller) -> None:
    """An installed script whose class Input uses an unknown type is refused, naming the line;
    nothing runs."""
    reply = custom.named("broken_input", {"when": "now"})
    assert reply.status == "rejected"
    assert reply.error is not None
    assert reply.error.code == "invalid_request"
    assert "unusable class Input" in reply.error.message
    assert "line 2" in reply.error.message


# -- scripts that import the names of their declaration ----------------------------------------


def test_a_script_importing_its_declarations_names_runs_without_meta(custom: Caller) -> None:
    """`from typing import Annotated, Literal` and `from msgspec import Meta` make a script an
    ordinary module; its input is still checked by the service, and Meta never reaches the
    run (its import is blanked with the declaration)."""
    reply = custom.named("declared.module", {"n": 3})
    assert reply.status == "ok", reply.error
    assert reply.result == {"n": 3, "mode": "plain", "meta_in_run": False}
    refused = custom.named("declared.module", {"n": 11})
    assert refused.status == "rejected"
    assert refused.error is not None
    assert refused.error.code == "invalid_request"
    assert refused.error.message == (
        "invalid ctx for 'declared.module': Expected `int` <= 10 - at `ctx.n`"
    )


def test_blanked_lines_keep_the_scripts_line_numbers(custom: Caller) -> None:
    """The blanked import and declaration leave their lines empty: a traceback names the
    line the author wrote."""
    reply = custom.named("declared.module", {"n": 1, "mode": "fail"})
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "script_error"
    assert reply.error.traceback is not None
    raising = 1 + DECLARED_SCRIPT.splitlines().index(
        '        raise ValueError("failed on purpose")'
    )
    assert f"line {raising}" in reply.error.traceback


@pytest.mark.parametrize("name", SMUGGLED)
def test_only_the_exact_meta_import_is_blanked(custom: Caller, name: str) -> None:
    """An import that is not exactly `from msgspec import Meta` alone on its lines is not
    removed: the sandbox refuses it as any import outside its list, so the rule cannot be used
    to bring in msgspec or anything else."""
    reply = custom.named(f"declared.{name}")
    assert reply.status == "error", reply
    assert reply.error is not None
    assert reply.error.code == "policy_violation", reply.error
    assert reply.result is None


SHIPPED = sorted(DEFAULT_SCRIPTS_DIR.rglob("*.py"))


@pytest.mark.parametrize(
    "path",
    SHIPPED,
    ids=[".".join(p.relative_to(DEFAULT_SCRIPTS_DIR).with_suffix("").parts) for p in SHIPPED],
)
def test_each_shipped_script_is_an_ordinary_module(path: Path) -> None:
    """A shipped script imports as plain Python (every name of its declaration imported); the
    source the service runs has no msgspec import left."""
    spec = importlib.util.spec_from_file_location(f"shipped_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.execute)
    source = path.read_text(encoding="utf-8")
    declared = declare(source, path.stem)
    assert declared.input_type is not None
    assert "msgspec" not in declared.source
    assert len(declared.source.splitlines()) == len(source.splitlines())
