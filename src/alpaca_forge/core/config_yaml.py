"""Settings read from YAML: a config file, or one section of a recipe, each value with its `file:line`.

Nodes are composed rather than loaded, so every key keeps its line; unknown keys, bad UTF-8 and
bad syntax are problems named by file and line.
"""

from __future__ import annotations

import dataclasses
import os
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


def yaml_where(path: str | os.PathLike, node: Any, yaml_path: FieldPath = ()) -> str:
    """`file:line`, with the key's place in the file (`stages.train.epochs`) when it is nested."""
    where = f"{path}:{node.start_mark.line + 1}"
    return f"{where} ({'.'.join(yaml_path)})" if len(yaml_path) > 1 else where


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
