"""What is judged, shared by `eval` and `prefer`: the set's items, and each system's answers to them.

A set is any file `read_records` understands (Alpaca records, seed tasks, the 252 user-oriented
evaluation tasks with their `motivation_app` category, conversations: the item is the last user
turn, the turns before it go to the model as context, the judge reads the item alone). A system is a predictions file (JSONL or a
JSON array: `infer`'s output, or `{instruction, input, response}` rows as the self-instruct
predictions are) or a model, answered first. Answers are matched to items by `id` where a row
has one, else by instruction and input (whitespace aside). Every mismatch is an error that names
the items and the file: a comparison on the wrong rows is worse than none.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import Problem, UserError, ValidationError
from ..core.json_items import iter_json_items
from ..core.prompts import Message
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
    # A conversation's turns before its last user turn (the instruction), sent with it to a model.
    context: tuple[Message, ...] = ()

    def prompt(self) -> list[Message]:
        """What a model answers: the earlier turns, then the instruction."""
        return [*self.context, Message.from_record(self.instruction, self.input)]

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


def read_set(path: str | os.PathLike, *, limit: int | None = None, flag: str = "--set") -> list[Item]:
    """The items of an evaluation set, every problem reported at once. Items without an id get
    `item-N` (N counts from 1, in file order). `flag` is the one the messages name."""
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
            context = tuple(rec.prompt_messages()[:-1])
            items.append(Item(item_id, rec.instruction, rec.input, category, where, context))
    if problems:
        raise ValidationError(
            problems, what=f"instructions {path}" if flag != "--set" else f"evaluation set {path}"
        )
    if not items:
        raise UserError(f"{path}: holds no instructions", f"name a set of instructions with {flag}")
    return items[:limit] if limit is not None else items


# Where a predictions row keeps its answer, in the order looked for (without --answer-field).
ANSWER_FIELDS = ("output", "response")
MODEL_PREFIX = "model:"
SHOWN_MISSING = 5  # items named one by one in a "no answer for" error


@dataclass(frozen=True)
class System:
    """One side of a comparison: a name and its answer to every item."""

    name: str
    source: str  # the predictions file, or "model:SPEC"
    answers: dict[str, str]  # item id -> answer

    @property
    def empty_answers(self) -> int:
        return sum(1 for a in self.answers.values() if not a.strip())


@dataclass(frozen=True)
class SystemSpec:
    """A system as named on the command line: `[NAME=]FILE` or `[NAME=]model:SPEC`."""

    name: str
    path: str | None = None  # a predictions file
    model: str | None = None  # a model to answer the set with (in-process: transformers or a .gguf)

    @property
    def source(self) -> str:
        return self.path if self.path is not None else MODEL_PREFIX + (self.model or "")


def parse_system(spec: str, flag: str) -> SystemSpec:
    """`[NAME=]FILE` or `[NAME=]model:SPEC`; the name defaults to the file's stem or the model's
    last path part."""
    text, name = spec.strip(), ""
    head, sep, rest = text.partition("=")
    if sep and re.fullmatch(r"[\w.+-]+", head.strip()):  # a name has no slash or colon; a path may
        name, text = head.strip(), rest.strip()
    if not text:
        raise UserError(
            f"{flag} {spec!r} names no system",
            f"give a predictions file or a model, e.g. {flag} out/predictions.jsonl or {flag} model:smollm2-135m-instruct",
        )
    if text.startswith(MODEL_PREFIX):
        model = text[len(MODEL_PREFIX) :].strip()
        if not model:
            raise UserError(
                f"{flag} {spec!r}: model: names no model", f"e.g. {flag} model:smollm2-135m-instruct"
            )
        return SystemSpec(name or Path(model.rstrip("/")).name.removesuffix(".gguf"), model=model)
    path = Path(text)
    stem = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        stem = stem.removesuffix(suffix)
    return SystemSpec(name or stem, path=text)


def check_names(specs: list[SystemSpec]) -> None:
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen:
            raise UserError(
                f"two systems are both called {s.name!r} ({seen[s.name]} and {s.source})",
                "name them apart: NAME=FILE, e.g. --a base=out/a.jsonl --b tuned=out/b.jsonl",
            )
        seen[s.name] = s.source


# ---------------------------------------------------------------------------------------------
# A system's answers


def read_answers(
    spec: SystemSpec, items: list[Item], *, answer_field: str | None = None, partial_set: bool = False
) -> System:
    """A predictions file's answer to every item. A row for no item of the set, two rows for one
    item, or an item without a row: all errors, named (with `partial_set`, as under --limit, rows
    for items beyond the set are skipped)."""
    assert spec.path is not None
    path = spec.path
    by_id = {it.id: it for it in items}
    by_key: dict[tuple[str, str], list[Item]] = {}
    for it in items:
        by_key.setdefault(it.key, []).append(it)
    problems: list[Problem] = []
    answers: dict[str, str] = {}
    answered_at: dict[str, str] = {}
    fields = (answer_field,) if answer_field else ANSWER_FIELDS
    for where, row in iter_json_items(path, problems):
        if not isinstance(row, dict):
            problems.append(
                Problem(
                    where, f"expected a JSON object, got {type(row).__name__}", "write one answer per line"
                )
            )
            continue
        present = [f for f in fields if f in row]
        if len(present) > 1:
            problems.append(
                Problem(
                    where,
                    f"both {' and '.join(repr(f) for f in present)}: which one is this system's answer is unclear",
                    f"name it with --answer-field (e.g. --answer-field {present[-1]})",
                )
            )
            continue
        field = present[0] if present else None
        if field is None:
            problems.append(
                Problem(
                    where,
                    f"no answer field ({' or '.join(repr(f) for f in fields)})",
                    "name the field that holds the answer with --answer-field",
                )
            )
            continue
        answer = row[field]
        if not isinstance(answer, str):
            problems.append(
                Problem(
                    where,
                    f"field {field!r} must be a string, got {type(answer).__name__}",
                    f'write "{field}": "..."',
                )
            )
            continue
        item = _item_of(row, where, by_id, by_key, problems, partial_set)
        if item is None:
            continue
        if item.id in answered_at:
            problems.append(
                Problem(
                    where,
                    f"a second answer to item {item.id!r} (the first is at {answered_at[item.id]})",
                    "keep one answer per instruction",
                )
            )
            continue
        answered_at[item.id] = where
        answers[item.id] = answer
    if problems:
        raise ValidationError(problems, what=f"answers of {spec.name} ({path})")
    missing = [it for it in items if it.id not in answers]
    if missing:
        shown = "; ".join(f"{it.id} ({it.short(40)!r})" for it in missing[:SHOWN_MISSING])
        more = f"; and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        raise UserError(
            f"{spec.name} ({path}) has no answer for {len(missing)} of the set's {len(items)} instructions: {shown}{more}",
            "answer them (alpaca-forge infer --input SET --output FILE), or evaluate on the set this file answers",
        )
    return System(spec.name, path, answers)


def _item_of(
    row: dict[str, Any],
    where: str,
    by_id: dict[str, Item],
    by_key: dict[tuple[str, str], list[Item]],
    problems: list[Problem],
    partial_set: bool,
) -> Item | None:
    raw_id = row.get("id")
    instruction, input = row.get("instruction"), row.get("input") or ""
    if raw_id is not None and str(raw_id) in by_id:
        item = by_id[str(raw_id)]
        if (
            isinstance(instruction, str)
            and isinstance(input, str)
            and text_key(instruction, input) != item.key
        ):
            shown = " ".join(instruction.split())[:60]
            problems.append(
                Problem(
                    where,
                    f"id {item.id!r} is the set's, but the instruction is another: {shown!r}",
                    "check that --set names the instructions this file answers (ids and texts must agree)",
                )
            )
            return None
        return item
    if not isinstance(instruction, str) or not isinstance(input, str):
        problems.append(
            Problem(
                where,
                "neither an id of the set nor an instruction (and input) to find the item by",
                'give each row the item\'s "id", or its "instruction" and "input" as text',
            )
        )
        return None
    found = by_key.get(text_key(instruction, input), [])
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        problems.append(
            Problem(
                where,
                f"the instruction is the set's items {', '.join(it.id for it in found)} alike: which one this answers is unclear",
                'give each row the item\'s "id"',
            )
        )
        return None
    if partial_set:
        return None
    shown = " ".join(instruction.split())[:60]
    problems.append(
        Problem(
            where,
            f"answers an instruction that is not in the set: {shown!r}",
            "check that --set names the instructions this file answers",
        )
    )
    return None
