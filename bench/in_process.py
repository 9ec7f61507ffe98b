"""The real CLI run in the bench's own process, its output swallowed: what a bench times."""

from __future__ import annotations

import contextlib
import io
import time

from alpaca_forge.cli import main as cli


def timed_cli(args: list[str]) -> tuple[int | None, float, str]:
    """(exit code, seconds, what the command wrote to stderr) of `alpaca-forge ARGS`."""
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli(args)
    return code, time.perf_counter() - start, err.getvalue()
