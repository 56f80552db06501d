"""``python -m consumer`` is ``pyexec``."""

from consumer.cli import main

main()
