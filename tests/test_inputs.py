"""Typed script input: the class Input declaration read without running it, and ctx checked."""

from __future__ import annotations

import pytest

from consumer.errors import InvalidRequest
from consumer.inputs import InputDeclarationError, declare

SCRIPT = '''"""Doc."""


class Row:
    name: str
    qty: Annotated[int, Meta(ge=0)] = 1


class Input:
    """What ctx holds."""

    rows: list[Row]
    mode: Literal["fast", "exact"] = "fast"
    note: str | None = None
    tags: list[str] = []


def execute(ctx):
    return ctx
'''


def test_ctx_is_checked_and_completed_with_defaults() -> None:
    """A valid ctx comes back with every default filled, nested objects included."""
    script = declare(SCRIPT, "demo")
    ctx = script.check("demo", {"rows": [{"name": "a"}]})
    assert ctx == {"rows": [{"name": "a", "qty": 1}], "mode": "fast", "note": None, "tags": []}


@pytest.mark.parametrize(
    ("ctx", "named"),
    [
        ({}, "missing required field `rows`"),
        ({"rows": [{"name": "a", "qty": -1}]}, "`ctx.rows[0].qty`"),
        ({"rows": [{"qty": 1}]}, "missing required field `name` - at `ctx.rows[0]`"),
        ({"rows": [], "mode": "slow"}, "`ctx.mode`"),
        ({"rows": [], "colour": "red"}, "unknown field `colour`"),
        ({"rows": [{"name": "a", "size": 2}]}, "unknown field `size` - at `ctx.rows[0]`"),
    ],
)
def test_bad_ctx_is_invalid_request_naming_the_field(ctx: dict[str, object], named: str) -> None:
    """Each kind of bad input is refused with the field's path in the message."""
    script = declare(SCRIPT, "demo")
    with pytest.raises(InvalidRequest) as caught:
        script.check("demo", ctx)
    assert named in str(caught.value)


def test_declarations_are_blanked_and_line_numbers_kept() -> None:
    """The classes used for input do not run, and execute() stays on its line."""
    script = declare(SCRIPT, "demo")
    assert "class Input" not in script.source
    assert "class Row" not in script.source
    assert script.source.splitlines().index("def execute(ctx):") == SCRIPT.splitlines().index(
        "def execute(ctx):"
    )


def test_defaults_are_not_shared_between_calls() -> None:
    """A list default is a fresh list on every call."""
    script = declare(SCRIPT, "demo")
    first = script.check("demo", {"rows": []})
    first["tags"].append("x")
    assert script.check("demo", {"rows": []})["tags"] == []


@pytest.mark.parametrize(
    "body",
    [
        "x: bytes",
        "x: str = make()",
        "x: Annotated[int, Meta(bogus=1)]",
        "x = 1",
        "def f(self): pass",
        "x: Node",
    ],
)
def test_declarations_outside_the_vocabulary_are_refused(body: str) -> None:
    """Types, defaults and statements outside the small vocabulary are refused with a reason."""
    source = f"class Node:\n    child: Node\n\n\nclass Input:\n    {body}\n"
    with pytest.raises(InputDeclarationError):
        declare(source, "bad")


def test_a_script_without_input_gets_ctx_as_sent() -> None:
    """No class Input: the source runs unchanged and ctx is passed through."""
    script = declare("def execute(ctx):\n    return ctx\n", "plain")
    assert script.input_type is None
    assert script.check("plain", {"anything": [1]}) == {"anything": [1]}
