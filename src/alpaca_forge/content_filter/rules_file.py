"""Reading rules files into `Rules`: the shipped `default_rules.yaml`, extended or replaced by
the user's `--filter-rules FILE`. The file is read as YAML nodes, not plain data, so that every
problem (bad YAML, unknown keys, a pattern that is not a valid regular expression, one that
matches empty text, a control character from a double-quoted `\\b`) is reported at once with its
file:line and the fix."""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import Problem, UserError, ValidationError
from .rules import Category, PatternGroup, Rules

DEFAULT_RULES = "default_rules.yaml"  # package data of alpaca_forge.content_filter

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass
class _CategoryEdit:
    """One category as one rules file gives it, before it is merged into the rules so far."""

    name: str
    where: str  # "rules.yaml:12"
    description: str | None
    patterns: list[re.Pattern[str]]
    triggers: tuple[str, ...]
    remove: bool  # `name: []`
    written: int  # patterns written, good or bad (a bad one is a problem of its own)


def load_rules(path: str | os.PathLike | None) -> Rules:
    """The shipped rules, extended (or replaced, with `replace_defaults: true`) by the file at
    `path`. Every problem in the file is reported at once, each with its file:line and fix."""
    base: dict[str, tuple[str, list[PatternGroup]]] = {
        e.name: (e.description or "", [_group(e)]) for e in _default_edits()
    }
    if path is not None:
        text, where = _read_text(path)
        replace, edits, problems = _parse_rules(text, where)
        if replace:
            base = {}
        for e in edits:
            if e.remove:
                if base.pop(e.name, None) is None:
                    problems.append(
                        Problem(
                            e.where,
                            f"`{e.name}: []` removes a category, but there is no category '{e.name}'",
                            f"categories so far: {', '.join(base) or 'none'}; check the name or drop the line",
                        )
                    )
            elif e.name in base:
                description, groups = base[e.name]
                base[e.name] = (e.description or description, groups + [_group(e)] * bool(e.patterns))
            elif not e.written:
                problems.append(
                    Problem(
                        e.where, f"new category '{e.name}' has no patterns", "add `patterns:` with a list"
                    )
                )
            else:
                base[e.name] = (e.description or "", [_group(e)])
        if problems:
            raise ValidationError(problems, what=f"filter rules {where}")
    return Rules(tuple(Category(n, d, tuple(gs)) for n, (d, gs) in base.items()))


def _group(e: _CategoryEdit) -> PatternGroup:
    return PatternGroup(tuple(e.patterns), e.triggers)


@functools.cache
def _default_edits() -> tuple[_CategoryEdit, ...]:
    # Compiled once per process: ~60 ms of regex compilation that every load_rules would repeat.
    text = importlib.resources.files(__package__).joinpath(DEFAULT_RULES).read_text(encoding="utf-8")
    _replace, edits, problems = _parse_rules(text, f"alpaca_forge/content_filter/{DEFAULT_RULES}")
    if problems:  # a bug of ours, caught by the tests
        raise ValidationError(problems, what="shipped filter rules")
    return tuple(edits)


def _read_text(path: str | os.PathLike) -> tuple[str, str]:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(
            f"--filter-rules {path}: cannot read it ({e.strerror})", "check the path of the rules file"
        ) from e
    try:
        return raw.decode("utf-8"), os.fspath(path)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8", "save the rules file as UTF-8") from e


def _parse_rules(text: str, where: str) -> tuple[bool, list[_CategoryEdit], list[Problem]]:
    """(replace_defaults, the categories in file order, problems) of one rules file."""
    import yaml

    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        raise UserError(
            f"{at}: not valid YAML ({getattr(e, 'problem', None) or e})",
            "fix the syntax at that line; single-quote patterns with backslashes: '\\bword\\b'",
        ) from e
    if root is None:
        return False, [], []
    if not isinstance(root, yaml.MappingNode):
        raise UserError(
            f"{where}:{root.start_mark.line + 1}: a rules file is a mapping with `categories:`",
            "start the file with `categories:` and list each category under it",
        )
    replace, edits, problems = False, [], []
    for key, value in root.value:
        at = f"{where}:{key.start_mark.line + 1}"
        if key.value == "replace_defaults":
            flag = yaml.safe_load(yaml.serialize(value))
            if isinstance(flag, bool):
                replace = flag
            else:
                problems.append(
                    Problem(at, "replace_defaults must be true or false", "write `replace_defaults: true`")
                )
        elif key.value == "categories":
            if isinstance(value, yaml.MappingNode):
                edits = _parse_categories(value, where, problems)
            elif not _is_null(value):
                problems.append(
                    Problem(
                        at, "categories must be a mapping of name -> patterns", "write `  name: ['pattern']`"
                    )
                )
        else:
            problems.append(
                Problem(
                    at,
                    f"unknown key '{key.value}'",
                    "the top level takes `categories:` and `replace_defaults:`",
                )
            )
    return replace, edits, problems


def _parse_categories(node: Any, where: str, problems: list[Problem]) -> list[_CategoryEdit]:
    import yaml

    edits: list[_CategoryEdit] = []
    seen: dict[str, str] = {}
    for key, value in node.value:
        at = f"{where}:{key.start_mark.line + 1}"
        name = str(key.value)
        if not _NAME.fullmatch(name):
            problems.append(
                Problem(
                    at, f"category name {name!r} is not a plain name", "use letters, digits, _ and - only"
                )
            )
            continue
        if name in seen:
            problems.append(
                Problem(at, f"category '{name}' is given twice (also at {seen[name]})", "merge them")
            )
            continue
        seen[name] = at
        description, items, triggers = None, None, ()
        if isinstance(value, yaml.SequenceNode):
            items = value
        elif isinstance(value, yaml.MappingNode):
            for k, v in value.value:
                if k.value == "description" and isinstance(v, yaml.ScalarNode) and not _is_null(v):
                    description = " ".join(str(v.value).split())
                elif k.value == "patterns" and isinstance(v, yaml.SequenceNode):
                    items = v
                elif k.value == "triggers" and isinstance(v, yaml.SequenceNode):
                    triggers = _triggers(v, name, where, problems)
                else:
                    problems.append(
                        Problem(
                            f"{where}:{k.start_mark.line + 1}",
                            f"category '{name}': `{k.value}` is not `description: TEXT`, `triggers: [...]` "
                            "or `patterns: [...]`",
                            "give `description:` one line of text, `triggers:` a list of words and `patterns:` "
                            "a list of regular expressions",
                        )
                    )
            if items is None:
                items = yaml.SequenceNode("tag:yaml.org,2002:seq", [])
        else:
            problems.append(
                Problem(
                    at,
                    f"category '{name}' must be a list of patterns (or `description:` + `patterns:`)",
                    f"write `{name}: ['\\bpattern\\b']`, or `{name}: []` to remove the category",
                )
            )
            continue
        remove = isinstance(value, yaml.SequenceNode) and not value.value
        patterns = [p for item in items.value if (p := _compile(item, name, where, problems)) is not None]
        edits.append(_CategoryEdit(name, at, description, patterns, triggers, remove, len(items.value)))
    return edits


def _triggers(node: Any, category: str, where: str, problems: list[Problem]) -> tuple[str, ...]:
    import yaml

    out = []
    for item in node.value:
        if isinstance(item, yaml.ScalarNode) and not _is_null(item) and str(item.value).strip():
            out.append(str(item.value).casefold())
        else:
            problems.append(
                Problem(
                    f"{where}:{item.start_mark.line + 1}",
                    f"category '{category}': a trigger must be a non-empty word",
                    "write each trigger as plain text, e.g. `triggers: [bomb, explosive]`",
                )
            )
    return tuple(out)


def _compile(node: Any, category: str, where: str, problems: list[Problem]) -> re.Pattern[str] | None:
    import yaml

    # Block scalars (`- |`) start on the line after their marker; re.error counts lines within.
    first = node.start_mark.line + 1 + (getattr(node, "style", None) in ("|", ">"))
    at = f"{where}:{first}"
    if not isinstance(node, yaml.ScalarNode) or _is_null(node):
        problems.append(
            Problem(
                at,
                f"category '{category}': a pattern must be a string",
                "write it in single quotes: '\\bword\\b'",
            )
        )
        return None
    source = str(node.value)
    control = next((c for c in source if ord(c) < 32 and c not in "\t\n\r"), None)
    if control is not None:
        problems.append(
            Problem(
                at,
                f"category '{category}': pattern {_short(source)} holds control character U+{ord(control):04X} "
                "(in double quotes YAML reads \\b as a backspace)",
                "write the pattern in single quotes: '\\bword\\b'",
            )
        )
        return None
    try:
        pattern = re.compile(source, re.IGNORECASE)
    except re.error as e:
        line = first + (e.lineno - 1 if e.lineno else 0)
        problems.append(
            Problem(
                f"{where}:{line}",
                f"category '{category}': {_short(source)} is not a valid regular expression "
                f"({e.msg} at position {e.pos})",
                "fix the expression; escape a literal ( [ { . * + ? | \\ with a backslash",
            )
        )
        return None
    if pattern.search("") is not None:
        problems.append(
            Problem(
                at,
                f"category '{category}': {_short(source)} matches empty text, so it would flag every message",
                "make it require at least one character (no pattern whose every part is optional)",
            )
        )
        return None
    return pattern


def _short(source: str) -> str:
    flat = " ".join(source.split())
    return repr(flat if len(flat) <= 60 else flat[:57] + "...")


def _is_null(node: Any) -> bool:
    return node.tag == "tag:yaml.org,2002:null"
