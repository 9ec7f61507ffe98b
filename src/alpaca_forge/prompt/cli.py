"""`alpaca-forge prompt` on the command line: prints the prompt to stdout and nothing else."""

from __future__ import annotations

import sys
from typing import Any

from ..core.cli import add_command
from .runner import PromptConfig

DESCRIPTION = """\
Print the exact prompt string for one instruction (and optional input) to stdout, and nothing
else, so you can check what the model sees.

example:
  alpaca-forge prompt --format alpaca --instruction 'Summarise this.' --input 'Some text.'"""


def register(sub: Any) -> None:
    add_command(
        sub,
        "prompt",
        "print the exact prompt a model sees for an instruction",
        DESCRIPTION,
        PromptConfig,
        _main,
        config_file=False,
    )


def _main(config: PromptConfig, args: Any) -> int:
    from .runner import run

    text = run(config).text
    if hasattr(sys.stdout, "buffer"):  # the bytes, whatever the terminal's encoding
        sys.stdout.buffer.write(text.encode("utf-8"))
    else:
        sys.stdout.write(text)
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
