"""End-to-end smoke: a script runs through a real replica."""

from tests.conftest import Caller


def test_trivial_script_returns_its_result(caller: Caller) -> None:
    """execute(ctx) runs in the sandbox and its return value comes back as the result."""
    reply = caller.code("def execute(ctx):\n    return ctx['x'] + 1", {"x": 41})
    assert reply.status == "ok"
    assert reply.result == 42
