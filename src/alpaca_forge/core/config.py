"""One config machinery for every stage: a dataclass per stage, checked by pydantic.

A stage's config is a plain dataclass whose fields are declared with `setting(default, help,
ge=..., ...)`: the help line is what `--help` shows, the bounds are the valid range. pydantic does
the type coercion and the range checks (a model is derived from the dataclass once); what is ours
is where each value came from, so every problem names its flag (`--learning-rate`) or its
`file:line` in a YAML file, and all of them are reported at once, before any work starts.

    @dataclass(frozen=True)
    class InferConfig(Config):
        input: str = setting(REQUIRED, "instructions: .json array or .jsonl")
        batch_size: int = setting(8, "prompts generated together", ge=1)
        engine: EngineConfig = nested(EngineConfig, "engine")

Built from Python (`InferConfig(input="x.jsonl")`) the same checks run in `__post_init__`;
built from the command line or a YAML file (`build_config`), nested configs are flattened into
one set of flags and YAML keys, and may also be written as nested YAML sections.

Here: the `Config` base, the checks, and building a config from defaults, YAML and flags. How
fields are declared and flattened is in `config_fields`, reading YAML with its lines in
`config_yaml`; stage configs import what they declare fields with (`setting`, `nested`,
`REQUIRED`) from here, the command line and the recipe the rest from those two.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, get_origin

from .config_fields import (
    REQUIRED,
    FieldPath,
    Leaf,
    base_type,
    choices_of,
    field_types,
    is_nested,
    leaf_index,
    leaves,
    nested,
    setting,
    shown_default,
)
from .config_yaml import read_yaml_settings
from .errors import Problem, ValidationError

__all__ = [
    "REQUIRED",
    "Config",
    "FieldPath",
    "build_config",
    "config_from",
    "leaf_paths",
    "nested",
    "setting",
]


class Config:
    """Base of every stage config: checked when built, whatever builds it."""

    def check(self) -> Iterator[tuple[str, str, str]]:
        """Problems that involve several fields: (field, message, fix). None by default.

        Message and fix name this config's settings by its own flags: `--base-url`, or
        `--base-url=URL` with a value. They reach the user as the user gives settings: under a
        prefix on the command line (`--judge-base-url URL`), as keys in YAML (`judge_base_url: URL`).
        """
        return iter(())

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        checked, problems = _validate(type(self), _plain(values), {}, _flag_where(type(self)))
        if problems:
            raise ValidationError(problems, what=f"{type(self).__name__} settings")
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not is_nested(f):  # keep the coerced values ("5" -> 5, [..] -> (..))
                object.__setattr__(self, f.name, checked[f.name])

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON data (lists for tuples), as outputs record them."""
        return _json(_plain(self))


def _json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Validation: pydantic, with every problem located


@functools.cache
def _model(cls: type) -> Any:
    """A pydantic model with the dataclass's fields, types and bounds (defaults are not needed:
    values are always complete by the time they are checked)."""
    import pydantic

    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        t = field_types(cls)[f.name]
        if is_nested(f):
            fields[f.name] = (_model(t), ...)
        else:
            fields[f.name] = (t, pydantic.Field(..., **f.metadata.get("bounds", {})))
    return pydantic.create_model(f"{cls.__name__}Check", **fields)


def _plain(value: Any) -> Any:
    """Nested dataclasses as dicts, enums as their values, so pydantic sees plain data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return getattr(value, "value", value) if hasattr(value, "_value_") else value


def _flag_where(cls: type) -> Callable[[FieldPath], str]:
    """Problems name a setting by its flag, the one spelling users see in --help and errors."""
    flags = {leaf.path: leaf.flag for leaf in leaves(cls)}
    return lambda path: flags.get(path, ".".join(path))


def _describe(error: dict[str, Any], quote: bool) -> str:
    kind, ctx, got = error["type"], error.get("ctx") or {}, error.get("input")
    shown = "" if kind == "missing" else f", got {got!r}" if quote else f", got {got}"
    phrases = {
        "greater_than_equal": f"must be at least {ctx.get('ge')}",
        "greater_than": f"must be above {ctx.get('gt')}",
        "less_than_equal": f"must be at most {ctx.get('le')}",
        "less_than": f"must be below {ctx.get('lt')}",
        "int_parsing": "must be a whole number",
        "int_type": "must be a whole number",
        "int_from_float": "must be a whole number",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "string_type": "must be a text",
        "literal_error": f"must be one of {ctx.get('expected')}",
        "missing": "is required",
        "tuple_type": "must be a list",
        "list_type": "must be a list",
    }
    return phrases.get(kind, error["msg"].lower()) + shown


def _fix_for(leaf: Leaf | None, where: str) -> str:
    if leaf is None:
        return "check the settings"
    target = where if where.startswith("--") else leaf.name
    if leaf.default is REQUIRED:
        return f"give {target}: {leaf.help}"
    words = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
    wanted = " and ".join(f"{words[k]} {v:g}" for k, v in leaf.bounds.items())
    choices = choices_of(leaf.type)
    if choices:
        wanted = "one of: " + ", ".join(str(c) for c in choices)
    default = shown_default(leaf.default)
    text = (
        (f"give {target} " + (wanted if choices else f"a value of {wanted}"))
        if wanted
        else f"set {target}: {leaf.help}"
    )
    return text + (f" (default {default})" if default else "")


def _validate(
    cls: type,
    values: dict[str, Any],
    origins: dict[FieldPath, str],
    default_where: Callable[[FieldPath], str],
    named: Mapping[FieldPath, Leaf] | None = None,
) -> tuple[dict[str, Any], list[Problem]]:
    """Coerced values and every problem, each named by where its value came from. `named`: the
    settings as the outermost config names them (a nested config's own names lack its prefix)."""
    import pydantic

    named = {leaf.path: leaf for leaf in leaves(cls)} if named is None else named
    problems: list[Problem] = []
    try:
        checked = _model(cls).model_validate(values).model_dump()
    except pydantic.ValidationError as e:
        failed: set[str] = set()
        for err in e.errors():
            path = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
            failed.add(path[0] if path else "")
            leaf = named.get(path)
            where = origins.get(path) or default_where(path)
            flag = where.startswith("--")
            message = _describe(err, quote=not flag)
            if not flag:
                message = f"'{path[-1] if path else cls.__name__}' {message}"
            problems.append(Problem(where, message, _fix_for(leaf, where)))
        # Nested configs whose own fields are fine still get their cross-field checks, so one
        # run reports everything.
        for f in dataclasses.fields(cls):
            if is_nested(f) and f.name not in failed and isinstance(values.get(f.name), dict):
                inner = {p[1:]: w for p, w in origins.items() if p[:1] == (f.name,)}
                _, more = _validate(
                    field_types(cls)[f.name],
                    values[f.name],
                    inner,
                    lambda p, n=f.name: default_where((n, *p)),
                    {p[1:]: leaf for p, leaf in named.items() if p[:1] == (f.name,)},
                )
                problems += more
        return values, problems
    for path, message, fix, spelled in _cross_checks(cls, checked, named):
        where = origins.get(path) or default_where(path)
        in_yaml = not where.startswith("--")
        problems.append(Problem(where, _spell(message, spelled, in_yaml), _spell(fix, spelled, in_yaml)))
    return checked, problems


def _cross_checks(
    cls: type, checked: dict[str, Any], named: Mapping[FieldPath, Leaf], prefix: FieldPath = ()
) -> Iterator[tuple[FieldPath, str, str, dict[str, Leaf]]]:
    """Each config's own `check()` on checked values, its nested configs' too: (path, message,
    fix, and the config's own flags -> its settings as `named` has them)."""
    spelled = {own.flag: named[(*prefix, *own.path)] for own in leaves(cls) if (*prefix, *own.path) in named}
    for field, message, fix in _instance(cls, checked).check():
        yield (*prefix, *field.split(".")), message, fix, spelled
    for f in dataclasses.fields(cls):
        if is_nested(f):
            yield from _cross_checks(field_types(cls)[f.name], checked[f.name], named, (*prefix, f.name))


# A flag in a check()'s text: --name, --no-name, or --name=VALUE.
_FLAG = re.compile(r"(?<![\w-])--(no-)?([a-z][a-z0-9-]*)(?:=([^\s,;)]+))?")


def _spell(text: str, spelled: Mapping[str, Leaf], in_yaml: bool) -> str:
    """A check()'s text with its config's flags as the user gives those settings: the flag under
    the config's prefix, or the YAML key where the problem is in a file."""

    def one(m: re.Match[str]) -> str:
        negated, value = bool(m.group(1)), m.group(3)
        leaf = spelled.get("--" + m.group(2))
        if leaf is None:
            return m.group(0)
        if in_yaml:
            return f"{leaf.name}: false" if negated else f"{leaf.name}: {value}" if value else leaf.name
        flag = "--no-" + leaf.flag[2:] if negated else leaf.flag
        return f"{flag} {value}" if value else flag

    return _FLAG.sub(one, text)


def _instance(cls: type, data: dict[str, Any]) -> Any:
    """The dataclass holding already-checked values (no second round of checks)."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        v = data[f.name]
        if is_nested(f):
            v = _instance(field_types(cls)[f.name], v)
        elif isinstance(v, list) and get_origin(base_type(field_types(cls)[f.name])) is tuple:
            v = tuple(v)
        object.__setattr__(obj, f.name, v)
    return obj


# ---------------------------------------------------------------------------------------------
# From flags and YAML


def _set(tree: dict[str, Any], path: FieldPath, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _defaults_tree(cls: type) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if is_nested(f):
            tree[f.name] = _plain(f.default_factory())  # type: ignore[misc]
        elif f.default is not dataclasses.MISSING:
            tree[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            tree[f.name] = _plain(f.default_factory())
    return tree


def config_from(
    cls: type,
    values: Mapping[FieldPath, Any],
    origins: Mapping[FieldPath, str],
    default_where: Callable[[FieldPath], str],
) -> tuple[Any, list[Problem]]:
    """Defaults, then `values`: the config, or None and every problem (a recipe gathers the
    problems of all its stages before it reports)."""
    tree = _defaults_tree(cls)
    for path, value in values.items():
        _set(tree, path, value)
    checked, problems = _validate(cls, tree, dict(origins), default_where)
    return (None if problems else _instance(cls, checked)), problems


def leaf_paths(cls: type) -> dict[str, FieldPath]:
    """A setting's place in `cls` by its YAML key / flag name (`judge_model` -> judge.model)."""
    return {name: leaf.path for name, leaf in leaf_index(cls).items()}


def build_config(cls: type, flags: Mapping[str, Any], file: str | os.PathLike | None = None) -> Any:
    """Defaults, then the YAML `file`, then `flags` (by field name; flags win). Every problem in
    any of them is reported at once, each with its flag or file:line."""
    tree = _defaults_tree(cls)
    origins: dict[FieldPath, str] = {}
    problems: list[Problem] = []
    if file:
        values, origins, problems = read_yaml_settings(cls, file)
        for path, value in values.items():
            _set(tree, path, value)
    index = leaf_index(cls)
    for name, value in flags.items():
        leaf = index[name]
        _set(tree, leaf.path, value)
        origins[leaf.path] = leaf.flag
    checked, more = _validate(cls, tree, origins, _flag_where(cls))
    problems += more
    if problems:
        raise ValidationError(problems, what=f"settings of {file}" if file else "settings")
    return _instance(cls, checked)
