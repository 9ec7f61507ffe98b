"""What `eval rate` rates: the set and both systems' answers to every item, checked before
anything listens (and again before a report)."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.errors import UserError
from ...judging.items import Item, System, check_names, parse_system, read_answers, read_set
from .config import RateConfig


@dataclass(frozen=True)
class Comparison:
    items: list[Item]
    a: System
    b: System


def load_comparison(config: RateConfig) -> Comparison:
    """The set and both systems' answers to every item, or an error naming what is wrong."""
    specs = [parse_system(config.a, "--a"), parse_system(config.b, "--b")]
    for flag, spec in zip(("--a", "--b"), specs, strict=True):
        if spec.model is not None:
            raise UserError(
                f"{flag} {spec.source}: people rate answers already written, not a model",
                f"run `alpaca-forge infer --model {spec.model} --input {config.set} --output FILE` first, "
                f"then rate its file: {flag} {spec.name}=FILE",
            )
    check_names(specs)
    items = read_set(config.set)
    a, b = (read_answers(s, items, answer_field=config.answer_field) for s in specs)
    return Comparison(items, a, b)
