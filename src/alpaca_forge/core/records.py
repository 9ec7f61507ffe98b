"""Alpaca records: `{instruction, input, output}`, read from and written to JSON arrays or JSONL.

Reading streams the file item by item (`core/json_items.py`), each item with where it came from,
so every problem can be reported as `file:line` plus the field and a fix. Here each item becomes
records, whatever its shape; these are understood:

- Alpaca: `{"instruction", "input", "output"}`, as in the 52K `alpaca_data.json`;
- seed tasks and evaluation tasks: `{"id", "instruction", "instances": [{"input", "output"}]}`,
  one record per instance;
- conversations: OpenAI `{"messages": [{"role", "content"}, ...]}` or ShareGPT
  `{"conversations": [{"from", "value"}, ...]}` (`core/conversations.py` checks them). One exchange
  with no system message is an Alpaca record like any other; a system message or more than one
  exchange keeps the turns in `Record.messages`, and then `instruction` is the last user turn and
  `output` the assistant's reply to it ("" when none);
- predictions: `{"instruction", "input", "response"}`: the response is read as the output;
- anything else is reported, never dropped silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conversations import OPENAI, is_multi_turn, layout_of, read_conversation, to_rows
from .errors import Problem, UserError, ValidationError
from .files import atomic_writer
from .json_items import RECORD_EXAMPLE, iter_json_items
from .prompts import Message


@dataclass(frozen=True)
class Record:
    """One instruction-following example."""

    instruction: str
    input: str = ""
    output: str = ""
    id: str | None = None  # kept from the source when it has one (seed and evaluation tasks do)
    # A conversation's turns (system first if any), when it is more than one plain exchange.
    messages: tuple[Message, ...] | None = None
    where: str = field(default="", compare=False, repr=False)  # a conversation's file:line, for messages

    @property
    def is_conversation(self) -> bool:
        return self.messages is not None

    @classmethod
    def from_messages(cls, messages: Sequence[Message], id: str | None = None, where: str = "") -> Record:
        """A record of these turns: a plain record when they are one exchange with no system
        message, else a conversation whose instruction is its last user turn."""
        turns = tuple(messages)
        last_user = max(i for i, m in enumerate(turns) if m.role == "user")
        reply = turns[last_user + 1].content if last_user + 1 < len(turns) else ""
        if not is_multi_turn(turns):
            return cls(turns[last_user].content, "", reply, id)
        return cls(turns[last_user].content, "", reply, id, turns, where)

    def conversation(self) -> tuple[Message, ...]:
        """Every turn: a conversation's own, or a plain record's user message and its reply (none
        when its output is empty: an instruction still to answer)."""
        if self.messages is not None:
            return self.messages
        user = Message.from_record(self.instruction, self.input)
        return (user, Message("assistant", self.output)) if self.output else (user,)

    def prompt_messages(self) -> list[Message]:
        """What a model answers: the turns up to and including the last user turn."""
        if self.messages is None:
            return [Message.from_record(self.instruction, self.input)]
        last_user = max(i for i, m in enumerate(self.messages) if m.role == "user")
        return list(self.messages[: last_user + 1])

    def to_dict(self) -> dict[str, Any]:
        if self.messages is not None:
            d: dict[str, Any] = {"messages": to_rows(self.messages, OPENAI)}
        else:
            d = {"instruction": self.instruction, "input": self.input, "output": self.output}
        if self.id is not None:
            d = {"id": self.id, **d}
        return d


# ---------------------------------------------------------------------------------------------
# Validation: raw items -> records


def _check_text(value: Any, field: str, where: str, problems: list[Problem], *, required: bool) -> str | None:
    if value is None and not required:
        return ""
    if value is None:
        problems.append(Problem(where, f"field '{field}' is missing", f'add "{field}": "..." to the record'))
        return None
    if not isinstance(value, str):
        problems.append(
            Problem(
                where,
                f"field '{field}' must be a string, got {type(value).__name__} ({json.dumps(value)[:40]})",
                f'write \'{field}\' as a JSON string, e.g. "{field}": "..."'
                + ("" if required else ' (or "" when empty)'),
            )
        )
        return None
    return value


def records_from_item(value: Any, where: str, *, require_output: bool) -> tuple[list[Record], list[Problem]]:
    """Turn one raw JSON item into records, or into the problems that stop it from being one."""
    problems: list[Problem] = []
    if not isinstance(value, dict):
        problems.append(
            Problem(
                where,
                f"expected a JSON object, got {type(value).__name__}",
                f"write each record as {RECORD_EXAMPLE}",
            )
        )
        return [], problems

    raw_id = value.get("id")
    rec_id = None if raw_id is None else str(raw_id)
    layout = layout_of(value)
    if layout is not None:  # a conversation: OpenAI messages or ShareGPT
        turns, problems = read_conversation(value[layout.field], layout, where, require_output=require_output)
        return ([Record.from_messages(turns, rec_id, where)] if turns else []), problems

    instruction = _check_text(value.get("instruction"), "instruction", where, problems, required=True)
    if instruction is not None and not instruction.strip():
        problems.append(
            Problem(where, "field 'instruction' is empty", "write the task to perform in 'instruction'")
        )

    if "instances" in value:  # seed-task and evaluation-task format
        instances = value["instances"]
        if not isinstance(instances, list) or not instances:
            problems.append(
                Problem(
                    where,
                    "field 'instances' must be a non-empty list",
                    'write it as "instances": [{"input": "...", "output": "..."}]',
                )
            )
            return [], problems
        records = []
        for k, inst in enumerate(instances):
            inst_where = f"{where} instances[{k}]"
            if not isinstance(inst, dict):
                problems.append(
                    Problem(
                        inst_where, "expected a JSON object", 'write it as {"input": "...", "output": "..."}'
                    )
                )
                continue
            inp = _check_text(inst.get("input"), "input", inst_where, problems, required=False)
            out = _check_text(inst.get("output"), "output", inst_where, problems, required=require_output)
            if not problems:
                sub_id = rec_id if len(instances) == 1 or rec_id is None else f"{rec_id}#{k}"
                records.append(Record(instruction or "", inp or "", out or "", sub_id))
        return ([], problems) if problems else (records, [])

    inp = _check_text(value.get("input"), "input", where, problems, required=False)
    # Prediction files (`infer`'s, the evaluation predictions) call the answer "response".
    field = "output" if "output" in value or "response" not in value else "response"
    out = _check_text(value.get(field), field, where, problems, required=require_output)
    if problems:
        return [], problems
    return [Record(instruction or "", inp or "", out or "", rec_id)], []


def iter_records(
    path: str | os.PathLike, problems: list[Problem], *, require_output: bool = True
) -> Iterator[Record]:
    """The records of a JSON or JSONL file (gzip too) one at a time, as it is read: a stream for a
    tool that need not hold the whole file (`data dedupe`). Each problem goes into `problems`,
    with file, line and field, and leaves its item's records out; the caller reports them."""
    for where, value in iter_json_items(path, problems):
        recs, probs = records_from_item(value, where, require_output=require_output)
        problems.extend(probs)
        yield from recs


def _raise_problems(path: str | os.PathLike, problems: list[Problem], count: int) -> None:
    if problems:
        raise ValidationError(problems, what=str(path))
    if not count:
        raise UserError(
            f"{path}: holds no records", f"add records, one JSON object per line: {RECORD_EXAMPLE}"
        )


def read_records(path: str | os.PathLike, *, require_output: bool = True) -> list[Record]:
    """Read and validate every record of a JSON or JSONL file (gzip too).

    Raises `ValidationError` listing every problem found, with file, line and field; nothing is
    dropped silently. With `require_output=False` (inference inputs) 'output' may be absent.
    """
    problems: list[Problem] = []
    records = list(iter_records(path, problems, require_output=require_output))
    _raise_problems(path, problems, len(records))
    return records


def check_records(
    path: str | os.PathLike,
    *,
    require_output: bool = True,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Validate a file as `read_records` does, holding no record: how many it holds, or the same
    errors (every problem at once). A streaming tool runs it first, so that bad input is reported
    before anything is computed or written. `progress` hears of every 1,024 records."""
    problems: list[Problem] = []
    count = 0
    for _ in iter_records(path, problems, require_output=require_output):
        count += 1
        if progress and not count % 1024:
            progress(1024)
    if progress and count % 1024:
        progress(count % 1024)
    _raise_problems(path, problems, count)
    return count


# ---------------------------------------------------------------------------------------------
# Writing


def write_records(path: str | os.PathLike, records: Iterable[Record | dict]) -> Path:
    """Write records atomically: a `.json` path gets a JSON array (indented like `alpaca_data.json`),
    anything else JSONL (gzip when the name ends in `.gz`). A crash never leaves half a file."""
    with record_writer(path) as write:
        for rec in records:
            write(rec)
    return Path(path)


@contextlib.contextmanager
def record_writer(path: str | os.PathLike) -> Iterator[Callable[[Record | dict], None]]:
    """`write_records` one record at a time: the writer takes each record as it comes, into a
    temporary file that replaces `path` when the block ends (and is removed if it raises)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    as_array = path.suffix == ".json"
    with atomic_writer(path) as f:
        first = True

        def write(rec: Record | dict) -> None:
            nonlocal first
            d = rec.to_dict() if isinstance(rec, Record) else rec
            if as_array:
                f.write(("\n" if first else ",\n") + _indent(json.dumps(d, ensure_ascii=False, indent=4)))
            else:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
            first = False

        if as_array:
            f.write("[")
        yield write
        if as_array:
            f.write("\n]\n")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def split_records(
    records: Sequence[Record], val_size: float, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """The one seeded train/validation split (`data split` and `train --val-size` hold out the same
    records for the same seed and size). `val_size` below 1 is a share, otherwise a count; both
    halves keep the file's order, so a split is easy to read and to diff."""
    n = len(records)
    if val_size <= 0 or (val_size >= 1 and val_size != int(val_size)):
        raise UserError(
            f"--val-size must be a share in (0, 1) or a whole count, got {val_size:g}",
            "e.g. --val-size 0.05 or --val-size 200",
        )
    count = round(val_size * n) if val_size < 1 else int(val_size)
    if not 0 < count < n:
        raise UserError(*_split_problem(val_size, count, n))
    held = set(random.Random(seed).sample(range(n), count))
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


def _split_problem(val_size: float, count: int, n: int) -> tuple[str, str]:
    """Why `val_size` splits no `n` records into two non-empty halves, and a size that does
    (`count` is what it would hold out)."""
    nothing = "; or, in train, --val-size 0 to hold out nothing"
    if n < 2:
        held = "records" if n == 0 else "record"
        return (
            f"--val-size {val_size:g}: a split needs at least 2 records (one on each side), and there "
            f"{'is' if n == 1 else 'are'} {n} {held}",
            "give a file with more records" + nothing,
        )
    # The smallest share that holds out one record (clear of round()'s halves), 0.1 once that does.
    share = 0.1 if n >= 10 else round(1 / n + 0.01, 2)
    if count >= n:
        problem = f"holds out {count} of {n} records, leaving nothing to train on"
    else:
        problem = (
            f"holds out {count} of {n} records ({val_size:g} x {n} rounds to 0), leaving no validation record"
        )
    sizes = "of 1" if n == 2 else f"from 1 to {n - 1}"
    return (
        f"--val-size {val_size:g} {problem}",
        f"give --val-size a count {sizes}, or a share such as {share:g}" + nothing,
    )
