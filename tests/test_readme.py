"""The README's commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```sh\n(.+?)\n```", text)[:2]


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs the README's second command (install and test) verbatim."""
    _serve, test_command = readme_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci_lines


def test_readme_starts_with_serve_then_test() -> None:
    """The README's first command installs and serves, the second installs and tests."""
    serve, test_command = readme_commands()
    assert serve.endswith("pyexec serve")
    assert "pytest" in test_command
