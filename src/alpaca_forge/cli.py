"""The `alpaca-forge` command: lists the stages and maps errors to exit codes, nothing else.

Each stage registers its own subcommand (`<stage>/cli.py`), its flags derived from its config.
Errors the user can fix (`UserError`) print as a message and a fix with exit status 2 (3: a batch
teacher's requests wait for their results); Ctrl-C exits with 130. Neither prints a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
from .core.cli import ArgumentParser, HelpFormatter
from .core.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# In the order `--help` lists them: the path of the data, seed task to served answer.
STAGES = ("generate", "data", "train", "prefer", "prompt", "chat", "infer", "serve", "export", "eval", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="alpaca-forge",
        description="Make instruction-following models the Stanford Alpaca way, offline-first.",
        epilog="Run `alpaca-forge COMMAND --help` for each command's flags and an example.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alpaca-forge {__version__}")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only results and errors (no progress or load messages)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="one of the commands below")
    for stage in STAGES:
        importlib.import_module(f".{stage}.cli", __package__).register(sub)
    return parser


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is now (tests capture it), not the one at creation."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _log_to_stderr(*, quiet: bool) -> None:
    """Our own messages (loading, summaries) go to stderr; other libraries' logs stay off."""
    log = logging.getLogger("alpaca_forge")
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    # Offline-first: nothing is downloaded unless the user explicitly sets HF_HUB_OFFLINE=0.
    # Set before transformers / huggingface_hub are imported, which read it once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name, value in (("TOKENIZERS_PARALLELISM", "false"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # told by the command they were given to, so the fix names its --help
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USER_ERROR
    _log_to_stderr(quiet=args.quiet)
    try:
        return args.run(args)
    except UserError as e:
        command = " ".join(filter(None, [args.command, getattr(args, "tool", None)]))
        # A batch teacher's waiting requests (engines.batch.BatchPending) stop with their own status.
        print(f"alpaca-forge {command}: {getattr(e, 'label', 'error')}: {e}", file=sys.stderr)
        return getattr(e, "exit_status", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `alpaca-forge infer ... --print | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
