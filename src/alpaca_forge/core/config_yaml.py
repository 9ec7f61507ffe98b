"""Settings read from YAML: a config file, or one section of a recipe, each value with its `file:line`.

Nodes are composed rather than loaded, so every key keeps its line; unknown keys, bad UTF-8 and
bad syntax are problems named by file and line. `--set KEY=VALUE` writes over a composed tree;
what it wrote is named `--set KEY` in problems instead of a line.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config_fields import FieldPath, field_types, is_nested, leaf_index, leaves
from .errors import Problem, UserError


def compose_yaml(path: str | os.PathLike) -> Any:
    """The YAML file's node tree (None when empty), every line number kept; read and syntax
    errors are the user's, named by file and line."""
    import yaml

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read the config ({e.strerror})", "check the path") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{p}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})",
            f"save the config as UTF-8, e.g. `iconv -f latin1 -t utf-8 {p.name} > fixed.yaml`",
        ) from e
    try:
        return yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise UserError(
            f"{where}: not valid YAML ({getattr(e, 'problem', e)})", "fix the syntax at that line"
        ) from e


SET_FLAG = "--set"


def yaml_where(path: str | os.PathLike, node: Any, yaml_path: FieldPath = ()) -> str:
    """`file:line`, with the key's place in the file (`stages.train.epochs`) when it is nested;
    `--set KEY` for what --set wrote."""
    if str(node.start_mark.name).startswith(f"{SET_FLAG} "):
        return str(node.start_mark.name)
    where = f"{path}:{node.start_mark.line + 1}"
    return f"{where} ({'.'.join(yaml_path)})" if len(yaml_path) > 1 else where


def apply_overrides(root: Any, overrides: tuple[str, ...] | list[str]) -> Any:
    """`root` (a composed YAML mapping) with each `KEY=VALUE` written over it: KEY is the dotted
    place of a key (`stages.train.max_steps`), made where missing; VALUE is read as YAML, so `2`,
    `1e-3`, `true` and `[a, b]` mean what they would in the file."""
    import yaml

    for item in overrides:
        key, eq, text = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(p.strip() for p in parts):
            raise UserError(
                f"{SET_FLAG} {item!r}: not KEY=VALUE",
                f"e.g. {SET_FLAG} stages.train.epochs=1 (a dotted key, =, a value)",
            )
        mark = yaml.Mark(f"{SET_FLAG} {key.strip()}", 0, 0, 0, None, None)
        try:
            value = yaml.compose(text) or yaml.ScalarNode("tag:yaml.org,2002:null", "")
        except yaml.YAMLError as e:
            raise UserError(
                f"{SET_FLAG} {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})",
                "quote it as the recipe file would, e.g. --set 'stages.generate.model=\"a: b\"'",
            ) from e
        for node in _nodes(value):
            node.start_mark = node.end_mark = mark
        node = root
        for depth, part in enumerate(parts):
            if not isinstance(node, yaml.MappingNode):
                place = ".".join(parts[:depth]) or "the file"
                raise UserError(
                    f"{SET_FLAG} {key}: {place} is not a mapping", "check the key against the file"
                )
            at = next((i for i, (k, _) in enumerate(node.value) if str(k.value) == part), None)
            if depth == len(parts) - 1:
                entry = (yaml.ScalarNode("tag:yaml.org,2002:str", part, mark, mark), value)
                if at is None:
                    node.value.append(entry)
                else:
                    node.value[at] = entry
            elif at is None:
                child = yaml.MappingNode("tag:yaml.org,2002:map", [], mark, mark)
                node.value.append((yaml.ScalarNode("tag:yaml.org,2002:str", part, mark, mark), child))
                node = child
            else:
                node = node.value[at][1]
    return root


def _nodes(node: Any) -> Iterator[Any]:
    """`node` and every node under it."""
    import yaml

    yield node
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from _nodes(key)
            yield from _nodes(value)
    elif isinstance(node, yaml.SequenceNode):
        for value in node.value:
            yield from _nodes(value)


def read_yaml_settings(
    cls: type, path: str | os.PathLike
) -> tuple[dict[FieldPath, Any], dict[FieldPath, str], list[Problem]]:
    """The settings a YAML file gives, each with its file:line; unknown keys are problems."""
    import yaml

    p = Path(path)
    root = compose_yaml(p)
    if root is None:
        return {}, {}, []
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{p}: a config is a mapping of settings", "write one `name: value` per line")
    return settings_from_node(cls, root, p)


def settings_from_node(
    cls: type, root: Any, p: str | os.PathLike, yaml_path: FieldPath = ()
) -> tuple[dict[FieldPath, Any], dict[FieldPath, str], list[Problem]]:
    """The settings one YAML mapping gives `cls` (a whole file, or a section of a recipe at
    `yaml_path`), each with where it was written; unknown keys are problems."""
    import yaml

    values: dict[FieldPath, Any] = {}
    origins: dict[FieldPath, str] = {}
    problems: list[Problem] = []
    index = leaf_index(cls)
    sections = {f.name: field_types(cls)[f.name] for f in dataclasses.fields(cls) if is_nested(f)}

    def take(node: Any, scope: type, prefix: FieldPath) -> None:
        names = {
            leaf.path[len(prefix)]: leaf
            for leaf in leaves(scope, prefix)
            if len(leaf.path) == len(prefix) + 1
        }
        for key_node, value_node in node.value:
            name = str(key_node.value).replace("-", "_")
            # a section of a recipe names the key's place; a file of one config, its line alone
            where = yaml_where(p, key_node, (*yaml_path, *prefix, str(key_node.value)) if yaml_path else ())
            if not prefix and name in sections and isinstance(value_node, yaml.MappingNode):
                take(value_node, sections[name], (name,))
                continue
            leaf = names.get(name) or (index.get(name) if not prefix else None)
            if leaf is None:
                known = sorted(names) if prefix else sorted(index)
                close = [n for n in known if n.startswith(name[:4])] or known
                problems.append(
                    Problem(
                        where,
                        f"unknown setting '{key_node.value}'",
                        f"known settings include: {', '.join(close)}",
                    )
                )
                continue
            values[leaf.path] = yaml.safe_load(yaml.serialize(value_node))
            origins[leaf.path] = where

    take(root, cls, ())
    return values, origins, problems
