"""Kept for `from latentmas.cli import main`: the command lives in `latentmas.app.cli`."""

from latentmas.app.cli import capture_command, main, run_command  # noqa: F401
