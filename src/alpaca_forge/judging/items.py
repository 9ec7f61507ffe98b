"""What is judged: the items of a set of instructions (Alpaca records, seed tasks, the 252
user-oriented evaluation tasks with their `motivation_app` category), shared by `eval` and `prefer`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.errors import Problem, UserError, ValidationError
from ..core.json_items import iter_json_items
from ..core.records import records_from_item

# Fields a set's item may name its category by (the self-instruct evaluation set: motivation_app).
CATEGORY_FIELDS = ("category", "motivation_app")


@dataclass(frozen=True)
class Item:
    """One instruction of the evaluation set."""

    id: str
    instruction: str
    input: str = ""
    category: str | None = None
    where: str = ""  # file:line, for messages

    @property
    def key(self) -> tuple[str, str]:
        return text_key(self.instruction, self.input)

    def short(self, chars: int = 60) -> str:
        text = " ".join(self.instruction.split())
        return text if len(text) <= chars else text[: chars - 1] + "…"


def text_key(instruction: str, input: str) -> tuple[str, str]:
    """How an answer without an id finds its item: the texts with whitespace runs collapsed (the
    self-instruct predictions end their instructions with a newline the set does not have)."""
    return " ".join(instruction.split()), " ".join(input.split())


def read_set(path: str | os.PathLike, *, limit: int | None = None) -> list[Item]:
    """The items of an evaluation set, every problem reported at once. Items without an id get
    `item-N` (N counts from 1, in file order)."""
    problems: list[Problem] = []
    items: list[Item] = []
    first_at: dict[str, str] = {}
    for where, value in iter_json_items(path, problems):
        records, found = records_from_item(value, where, require_output=False)
        problems.extend(found)
        category = None
        if isinstance(value, dict):
            raw = next((value[f] for f in CATEGORY_FIELDS if value.get(f) is not None), None)
            if raw is not None and not isinstance(raw, str):
                problems.append(
                    Problem(
                        where,
                        f"the category must be a string, got {type(raw).__name__}",
                        'e.g. "category": "writing"',
                    )
                )
            category = raw.strip() or None if isinstance(raw, str) else None
        for rec in records:
            item_id = rec.id if rec.id is not None else f"item-{len(items) + 1}"
            if item_id in first_at:
                problems.append(
                    Problem(
                        where,
                        f"id {item_id!r} again (first at {first_at[item_id]})",
                        "give every item its own id, or drop the repeated one",
                    )
                )
                continue
            first_at[item_id] = where
            items.append(Item(item_id, rec.instruction, rec.input, category, where))
    if problems:
        raise ValidationError(problems, what=f"evaluation set {path}")
    if not items:
        raise UserError(f"{path}: holds no instructions", "name a set of instructions with --set")
    return items[:limit] if limit is not None else items
