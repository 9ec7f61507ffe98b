"""What every stage's command line shares: flags derived from its config, and the help layout.

A stage registers itself with `add_command(subparsers, name, summary, description, Config, handler)`:
every field of `Config` becomes a flag (nested configs under their own heading), `--config FILE`
reads the same settings from YAML, and `handler(config, args)` runs with the checked config.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any, NoReturn, get_origin

from .config import REQUIRED, build_config
from .config_fields import Leaf, base_type, choices_of, leaves, shown_default

log = logging.getLogger("alpaca_forge")
Handler = Callable[[Any, argparse.Namespace], int]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own errors (a misspelt command or flag, a flag without its value) in the form
    every other mistake takes: the message and a fix, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n  fix: `{self.prog} --help` lists what it takes\n")


def say(message: str, *args: object) -> None:
    """A line for the user on stderr (hidden by --quiet); results go to stdout."""
    log.info(message, *args)


def _metavar(leaf: Leaf) -> str:
    if leaf.field.metadata.get("metavar"):
        return leaf.field.metadata["metavar"]
    choices = choices_of(leaf.type)
    if choices:
        return "{" + ",".join(str(c) for c in choices) + "}"
    t = base_type(leaf.type)
    if t is int:
        return "N"
    if t is float:
        return "X"
    if get_origin(t) in (tuple, list):
        return "TEXT"
    return leaf.name.upper()


def _help(leaf: Leaf) -> str:
    text = leaf.help
    shown = shown_default(leaf.default)
    if shown is not None:
        text += f" (default: {shown})"
    elif leaf.default is REQUIRED and not leaf.field.metadata.get("positional"):
        text += " (required)"
    return text.replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per setting; a flag not given leaves the config's (or the YAML file's) value."""
    groups: dict[str, Any] = {}
    for leaf in leaves(cls):
        meta = leaf.field.metadata
        if not meta.get("cli", True):
            continue
        target = parser
        if len(leaf.path) > 1:
            title = dict(_titles(cls)).get(leaf.path[0], leaf.path[0])
            target = groups.setdefault(title, parser.add_argument_group(title))
        if meta.get("positional"):
            many = get_origin(base_type(leaf.type)) in (tuple, list)
            target.add_argument(
                leaf.name,
                nargs="+" if many else None,
                metavar=meta.get("metavar") or "FILE",
                help=_help(leaf),
            )
            continue
        kwargs: dict[str, Any] = {"dest": leaf.name, "default": argparse.SUPPRESS, "help": _help(leaf)}
        if base_type(leaf.type) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = _metavar(leaf)
            if meta.get("repeat"):
                kwargs["action"] = "append"
        target.add_argument(leaf.flag, **kwargs)


def _titles(cls: type) -> list[tuple[str, str]]:
    import dataclasses

    return [(f.name, f.metadata["title"]) for f in dataclasses.fields(cls) if f.metadata.get("nested")]


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The checked config: defaults < --config FILE < flags."""
    flags: dict[str, Any] = {}
    for leaf in leaves(cls):
        if not leaf.field.metadata.get("cli", True) or not hasattr(args, leaf.name):
            continue
        value = getattr(args, leaf.name)
        sep = leaf.field.metadata.get("sep")
        if sep and isinstance(value, str):
            value = [v.strip() for v in value.split(sep) if v.strip()]
        flags[leaf.name] = value
    return build_config(cls, flags, getattr(args, "config", None))


def add_command(
    sub: Any,
    name: str,
    summary: str,
    description: str,
    config: type | None,
    handler: Handler,
    *,
    config_file: bool = True,
) -> argparse.ArgumentParser:
    """A subcommand whose flags come from `config`; `handler(checked config, args)` runs it."""
    p = sub.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)
    if config is not None:
        if config_file:
            p.add_argument(
                "--config", metavar="FILE", help="YAML file of these settings (names as the flags, with _)"
            )
        add_config_flags(p, config)

    def run(args: argparse.Namespace) -> int:
        return handler(config_from_args(config, args) if config is not None else None, args)

    p.set_defaults(run=run, config_class=config, command_parser=p)
    return p


def add_tool_group(
    sub: Any,
    name: str,
    summary: str,
    description: str,
    tools: list[tuple[str, str, str, type]],
    handlers: dict[str, Handler],
) -> argparse.ArgumentParser:
    """A command whose subcommands are tools (`data validate`, `export gguf`): each tool's
    (name, summary, description, config) with its handler. The command alone prints its help and
    exits 2, as a command line without a command does."""
    group = add_command(sub, name, summary, description, None, lambda config, args: _print_help(group))
    tools_sub = group.add_subparsers(dest="tool", metavar="TOOL", help="one of the tools below")
    for tool, tool_summary, tool_description, config in tools:
        add_command(tools_sub, tool, tool_summary, tool_description, config, handlers[tool])
    return group


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
