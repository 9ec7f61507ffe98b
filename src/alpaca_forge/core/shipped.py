"""The data files that ship with alpaca-forge, named `package:NAME` wherever a command reads a file.

A user with nothing but `pip install` has seed tasks for `generate`, an evaluation set for
`infer` and `eval`, and the red-team prompts of `eval safety`: `--seeds package:demo-seeds.jsonl`.
They live in one folder inside the package (`shipped_data/`). Readers resolve the name where they
open a file (`core.json_items`), so messages and outputs keep the user's spelling; outputs refuse
it (`core.files`): nothing is written into the package.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .errors import UserError

PACKAGE_PREFIX = "package:"

# Every file in shipped_data/, with what it holds (tests/test_shipped.py checks both ways).
SHIPPED = {
    "demo-seeds.jsonl": "32 seed tasks",
    "demo-eval.jsonl": "12 evaluation instructions",
    "redteam.jsonl": "60 red-team prompts",
}


def shipped_folder() -> Path:
    """Where the shipped files are installed."""
    return Path(str(resources.files("alpaca_forge.core") / "shipped_data"))


def is_shipped(value: str | os.PathLike) -> bool:
    """Whether a path as the user wrote it names a shipped file (`package:NAME`)."""
    return os.fspath(value).startswith(PACKAGE_PREFIX)


def listing() -> str:
    """The shipped names, each with what it holds, for help lines and errors."""
    return ", ".join(f"{PACKAGE_PREFIX}{name} ({what})" for name, what in SHIPPED.items())


def package_file(name: str) -> Path:
    """The shipped file `name` (`demo-seeds.jsonl`), or an error listing the shipped ones."""
    if name not in SHIPPED:
        raise UserError(
            f"{PACKAGE_PREFIX}{name}: alpaca-forge ships no file of that name",
            f"use one of the shipped files: {listing()}; or give a path to a file of your own",
        )
    return shipped_folder() / name


def input_path(value: str | os.PathLike) -> Path:
    """The file a reader opens for what the user wrote: a shipped one for `package:NAME`."""
    if is_shipped(value):
        return package_file(os.fspath(value)[len(PACKAGE_PREFIX) :])
    return Path(value)


def refuse_shipped_output(value: str | os.PathLike, flag: str) -> None:
    """An output may not be `package:NAME`: the package's files are only read."""
    if is_shipped(value):
        name = os.fspath(value)[len(PACKAGE_PREFIX) :] or "out.jsonl"
        raise UserError(
            f"{flag} {value}: package: names a file shipped with alpaca-forge, which is only read, "
            "never written",
            f"give {flag} a path of your own, e.g. {flag} {Path(name).name}",
        )


def or_shipped(*names: str) -> str:
    """The end of an input flag's help line: the shipped files it can read."""
    return "; or a shipped file: " + ", ".join(f"{PACKAGE_PREFIX}{n} ({SHIPPED[n]})" for n in names)
