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
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .errors import Problem, UserError, ValidationError

REQUIRED: Any = dataclasses.MISSING  # a setting with no default: the user must give it
FieldPath = tuple[str, ...]  # a field's place in a nested config, e.g. ("engine", "model")


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    positional: bool = False,
    repeat: bool = False,
    sep: str | None = None,
    metavar: str | None = None,
    flag: str | None = None,
    cli: bool = True,
) -> Any:
    """A config field. `ge/gt/le/lt` bound a number; `repeat` makes a flag repeatable and `sep`
    splits one flag value into a list; `cli=False` keeps a field out of the command line."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {
        "help": help,
        "bounds": bounds,
        "positional": positional,
        "repeat": repeat,
        "sep": sep,
        "metavar": metavar,
        "flag": flag,
        "cli": cli,
    }
    return dataclasses.field(default=default, metadata=metadata)


def nested(
    cls: type,
    title: str,
    factory: Callable[[], Any] | None = None,
    exclude: tuple[str, ...] = (),
    prefix: str = "",
) -> Any:
    """A config inside a config (its flags shown under `title`); `exclude` leaves some of its
    fields off the command line where the outer config has a flag of the same name; `prefix`
    names its settings apart from another of the same kind (`judge` -> --judge-model)."""
    return dataclasses.field(
        default_factory=factory or cls,
        metadata={"nested": True, "title": title, "exclude": exclude, "prefix": prefix},
    )


class Config:
    """Base of every stage config: checked when built, whatever builds it."""

    def check(self) -> Iterator[tuple[str, str, str]]:
        """Problems that involve several fields: (field, message, fix). None by default."""
        return iter(())

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        checked, problems = _validate(type(self), _plain(values), {}, _python_where(type(self)))
        if problems:
            raise ValidationError(problems, what=f"{type(self).__name__} settings")
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not _is_nested(f):  # keep the coerced values ("5" -> 5, [..] -> (..))
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
# Fields, flattened


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One setting as the command line and a YAML file see it."""

    path: FieldPath
    field: dataclasses.Field
    type: Any
    default: Any  # REQUIRED when there is none
    prefix: str = ""  # the nested config's name prefix, if it has one (`judge` -> judge_model)

    @property
    def name(self) -> str:
        return f"{self.prefix}_{self.path[-1]}" if self.prefix else self.path[-1]

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag") or "--" + self.name.replace("_", "-")

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def bounds(self) -> dict[str, float]:
        return self.field.metadata.get("bounds", {})


def _is_nested(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("nested"))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def leaves(cls: type, prefix: FieldPath = (), defaults: Any = None, name_prefix: str = "") -> list[Leaf]:
    """Every setting of `cls`, nested configs expanded, with its default."""
    out = []
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        if _is_nested(f):
            inner = f.default_factory()  # type: ignore[misc]
            for leaf in leaves(t, (*prefix, f.name), inner, f.metadata.get("prefix", "") or name_prefix):
                if leaf.path[-1] not in f.metadata["exclude"]:
                    out.append(leaf)
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        out.append(Leaf((*prefix, f.name), f, t, default, name_prefix))
    return out


def _leaf_index(cls: type) -> dict[str, Leaf]:
    """Settings by name, as YAML keys and flags spell them (a field whose flag differs, e.g.
    `echo` / `--print`, answers to both)."""
    index: dict[str, Leaf] = {}
    for leaf in leaves(cls):
        index.setdefault(leaf.name, leaf)  # the outer config's own field wins a name clash
    for leaf in leaves(cls):
        index.setdefault(leaf.flag.lstrip("-").replace("-", "_"), leaf)
    return index


def base_type(t: Any) -> Any:
    """`int | None` -> int; `tuple[str, ...]` -> tuple; a Literal stays a Literal."""
    args = [a for a in get_args(t) if a is not type(None)]
    if get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
        return base_type(args[0])
    return t


def choices_of(t: Any) -> tuple[Any, ...] | None:
    t = base_type(t)
    return get_args(t) if get_origin(t) is Literal else None


# ---------------------------------------------------------------------------------------------
# Validation: pydantic, with every problem located


@functools.cache
def _model(cls: type) -> Any:
    """A pydantic model with the dataclass's fields, types and bounds (defaults are not needed:
    values are always complete by the time they are checked)."""
    import pydantic

    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        if _is_nested(f):
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


def _python_where(cls: type) -> Callable[[FieldPath], str]:
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


def shown_default(value: Any) -> str | None:
    """A default worth showing (not None, off, empty)."""
    if value is REQUIRED or value is None or value is False or value == "" or value == ():
        return None
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


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
) -> tuple[dict[str, Any], list[Problem]]:
    """Coerced values and every problem, each named by where its value came from."""
    import pydantic

    by_path = {leaf.path: leaf for leaf in leaves(cls)}
    problems: list[Problem] = []
    try:
        checked = _model(cls).model_validate(values).model_dump()
    except pydantic.ValidationError as e:
        failed: set[str] = set()
        for err in e.errors():
            path = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
            failed.add(path[0] if path else "")
            leaf = by_path.get(path)
            where = origins.get(path) or default_where(path)
            flag = where.startswith("--")
            message = _describe(err, quote=not flag)
            if not flag:
                message = f"'{path[-1] if path else cls.__name__}' {message}"
            problems.append(Problem(where, message, _fix_for(leaf, where)))
        # Nested configs whose own fields are fine still get their cross-field checks, so one
        # run reports everything.
        for f in dataclasses.fields(cls):
            if _is_nested(f) and f.name not in failed and isinstance(values.get(f.name), dict):
                inner = {p[1:]: w for p, w in origins.items() if p[:1] == (f.name,)}
                _, more = _validate(
                    _hints(cls)[f.name], values[f.name], inner, lambda p, n=f.name: default_where((n, *p))
                )
                problems += more
        return values, problems
    for path, message, fix in _cross_checks(cls, checked):
        problems.append(Problem(origins.get(path) or default_where(path), message, fix))
    return checked, problems


def _cross_checks(
    cls: type, checked: dict[str, Any], prefix: FieldPath = ()
) -> Iterator[tuple[FieldPath, str, str]]:
    """Each config's own `check()` on checked values, its nested configs' too: (path, message, fix)."""
    for field, message, fix in _instance(cls, checked).check():
        yield (*prefix, *field.split(".")), message, fix
    for f in dataclasses.fields(cls):
        if _is_nested(f):
            yield from _cross_checks(_hints(cls)[f.name], checked[f.name], (*prefix, f.name))


def _instance(cls: type, data: dict[str, Any]) -> Any:
    """The dataclass holding already-checked values (no second round of checks)."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        v = data[f.name]
        if _is_nested(f):
            v = _instance(_hints(cls)[f.name], v)
        elif isinstance(v, list) and get_origin(base_type(_hints(cls)[f.name])) is tuple:
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
        if _is_nested(f):
            tree[f.name] = _plain(f.default_factory())  # type: ignore[misc]
        elif f.default is not dataclasses.MISSING:
            tree[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            tree[f.name] = _plain(f.default_factory())
    return tree


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
    index = _leaf_index(cls)
    sections = {f.name: _hints(cls)[f.name] for f in dataclasses.fields(cls) if _is_nested(f)}

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
    return {name: leaf.path for name, leaf in _leaf_index(cls).items()}


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
    index = _leaf_index(cls)
    for name, value in flags.items():
        leaf = index[name]
        _set(tree, leaf.path, value)
        origins[leaf.path] = leaf.flag
    flag_of = {leaf.path: leaf.flag for leaf in leaves(cls)}
    checked, more = _validate(cls, tree, origins, lambda path: flag_of.get(path, ".".join(path)))
    problems += more
    if problems:
        raise ValidationError(problems, what=f"settings of {file}" if file else "settings")
    return _instance(cls, checked)
