"""How a config's settings are declared, and how nested configs flatten into one list of settings.

`setting(...)` and `nested(...)` declare a field (its help line, bounds, flag spelling); `leaves`
flattens a config into `Leaf`s, one per setting as the command line (`core/cli.py`) and a YAML file
(`core/config_yaml.py`) see it; `core/config.py` checks the values. Stage configs import `setting`,
`nested` and `REQUIRED` from `core.config`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

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


def is_nested(f: dataclasses.Field) -> bool:
    """A config inside a config (declared with `nested`)."""
    return bool(f.metadata.get("nested"))


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The fields' types, resolved once per config class."""
    return typing.get_type_hints(cls)


def leaves(cls: type, prefix: FieldPath = (), defaults: Any = None, name_prefix: str = "") -> list[Leaf]:
    """Every setting of `cls`, nested configs expanded, with its default."""
    out = []
    for f in dataclasses.fields(cls):
        t = field_types(cls)[f.name]
        if is_nested(f):
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


def leaf_index(cls: type) -> dict[str, Leaf]:
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


def shown_default(value: Any) -> str | None:
    """A default worth showing (not None, off, empty)."""
    if value is REQUIRED or value is None or value is False or value == "" or value == ():
        return None
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
