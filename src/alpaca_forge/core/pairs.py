"""Preference pairs: an instruction with a chosen and a rejected answer, read from and written to
JSONL or JSON arrays (gzip too).

One row per pair, as `prefer` writes it and `train --method dpo|orpo|kto|simpo|reward` reads it:

    {"id", "prompt", "chosen", "rejected", "instruction", "input", "verdicts", "agreement", "judge"}

`prompt` is TRL's plain format (the instruction, then a blank line and the input when there is
one). A reader takes `instruction`/`input` when present, else `prompt`: a string, or TRL's
conversational list of messages (the last user message is the instruction); `chosen`/`rejected`
may be strings or a one-message assistant list. Without any prompt, a conversational `chosen`
that starts with the user's message (TRL's "implicit prompt") gives it. Every other key (the
verdicts, their agreement, the judge) is kept in `Pair.meta` and written back as it was.

Every problem is reported with `file:line`, the field and a fix, all at once, nothing dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Problem, UserError, ValidationError
from .files import atomic_writer
from .json_items import iter_json_items
from .prompts import user_message

PAIR_EXAMPLE = (
    '{"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "I cannot answer that."}'
)
# The keys a row is made of; anything else is the pair's `meta`.
_CORE_KEYS = ("id", "prompt", "chosen", "rejected", "instruction", "input")


@dataclass(frozen=True)
class Pair:
    """One preference: for `instruction` (and `input`), `chosen` is the better answer."""

    id: str
    instruction: str
    input: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt(self) -> str:
        """TRL's plain prompt: the instruction, then a blank line and the input if any."""
        return user_message(self.instruction, self.input)


def pair_id(instruction: str, input: str, chosen: str, rejected: str) -> str:
    """A stable id for a pair that came without one: a hash of its four texts."""
    h = hashlib.sha256()
    for part in (instruction, input, chosen, rejected):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:12]


def pair_row(pair: Pair) -> dict[str, Any]:
    """The agreed row of a pair file: TRL's `prompt`/`chosen`/`rejected`, our `instruction`/`input`,
    then the pair's meta (verdicts, agreement, judge, ...)."""
    row: dict[str, Any] = {
        "id": pair.id,
        "prompt": pair.prompt,
        "chosen": pair.chosen,
        "rejected": pair.rejected,
        "instruction": pair.instruction,
        "input": pair.input,
    }
    row.update({k: v for k, v in pair.meta.items() if k not in row})
    return row


# ---------------------------------------------------------------------------------------------
# Reading


def _message_text(msg: Any) -> str | None:
    if not isinstance(msg, dict):
        return None
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}]
        parts = [c.get("text") for c in content if isinstance(c, dict) and c.get("type") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    return None


def _last_user(messages: list[Any]) -> str | None:
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return _message_text(msg)
    return None


def _answer(value: Any, name: str, where: str, problems: list[Problem]) -> str | None:
    """A chosen or rejected answer: a string, or a conversation whose last message is the assistant's."""
    if value is None:
        problems.append(
            Problem(where, f"field '{name}' is missing", f'add "{name}": "..." (see {PAIR_EXAMPLE})')
        )
        return None
    if isinstance(value, list):
        last = value[-1] if value else None
        text = _message_text(last)
        if not isinstance(last, dict) or last.get("role") != "assistant" or text is None:
            problems.append(
                Problem(
                    where,
                    f"field '{name}' is a list whose last message is not the assistant's, with text",
                    f'write it as "{name}": "..." or [{{"role": "assistant", "content": "..."}}]',
                )
            )
            return None
        value = text
    if not isinstance(value, str):
        problems.append(
            Problem(
                where,
                f"field '{name}' must be a string, got {type(value).__name__} ({json.dumps(value)[:40]})",
                f'write it as "{name}": "..."',
            )
        )
        return None
    if not value.strip():
        problems.append(
            Problem(where, f"field '{name}' is empty", f"give the {name} answer's text, or drop the pair")
        )
        return None
    return value


def _prompt(value: dict[str, Any], where: str, problems: list[Problem]) -> tuple[str, str] | None:
    """(instruction, input) from `instruction`/`input`, else `prompt`, else an implicit prompt."""
    if "instruction" in value:
        instruction, inp = value["instruction"], value.get("input") or ""
        for name, text in (("instruction", instruction), ("input", inp)):
            if not isinstance(text, str):
                problems.append(
                    Problem(
                        where,
                        f"field '{name}' must be a string, got {type(text).__name__} ({json.dumps(text)[:40]})",
                        f'write it as "{name}": "..."',
                    )
                )
                return None
        if not instruction.strip():
            problems.append(Problem(where, "field 'instruction' is empty", "write the task in 'instruction'"))
            return None
        return instruction, inp
    prompt = value.get("prompt")
    if prompt is None and isinstance(value.get("chosen"), list):  # TRL's implicit prompt
        prompt = [m for m in value["chosen"] if isinstance(m, dict) and m.get("role") != "assistant"]
        prompt = prompt or None
    if prompt is None:
        problems.append(
            Problem(
                where,
                "the pair has no prompt: neither 'instruction' nor 'prompt' is there",
                f'add "instruction": "..." (and "input" if any), or TRL\'s "prompt": "..." (see {PAIR_EXAMPLE})',
            )
        )
        return None
    if isinstance(prompt, list):
        text = _last_user(prompt)
        if text is None:
            problems.append(
                Problem(
                    where,
                    "field 'prompt' is a list of messages with no user message with text",
                    'write it as "prompt": [{"role": "user", "content": "..."}]',
                )
            )
            return None
        prompt = text
    if not isinstance(prompt, str):
        problems.append(
            Problem(
                where,
                f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}",
                'write it as "prompt": "..."',
            )
        )
        return None
    if not prompt.strip():
        problems.append(Problem(where, "field 'prompt' is empty", "write the instruction in 'prompt'"))
        return None
    return prompt, ""


def pair_from_item(value: Any, where: str) -> tuple[Pair | None, list[Problem]]:
    """One raw JSON item as a pair, or the problems that stop it from being one."""
    problems: list[Problem] = []
    if not isinstance(value, dict):
        problems.append(
            Problem(
                where,
                f"expected a JSON object, got {type(value).__name__}",
                f"write each pair as {PAIR_EXAMPLE}",
            )
        )
        return None, problems
    prompt = _prompt(value, where, problems)
    chosen = _answer(value.get("chosen"), "chosen", where, problems)
    rejected = _answer(value.get("rejected"), "rejected", where, problems)
    if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
        problems.append(
            Problem(
                where,
                "fields 'chosen' and 'rejected' are the same answer, so the pair teaches nothing",
                "drop the pair, or give two different answers",
            )
        )
    if problems or prompt is None or chosen is None or rejected is None:
        return None, problems
    instruction, inp = prompt
    raw_id = value.get("id")
    pid = pair_id(instruction, inp, chosen, rejected) if raw_id is None else str(raw_id)
    meta = {k: v for k, v in value.items() if k not in _CORE_KEYS}
    return Pair(pid, instruction, inp, chosen, rejected, meta), []


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Read and check every pair of a JSONL or JSON file (gzip too).

    Raises `ValidationError` (a `UserError`) listing every problem with file:line and field.
    """
    problems: list[Problem] = []
    pairs: list[Pair] = []
    for where, value in iter_json_items(path, problems):
        pair, probs = pair_from_item(value, where)
        problems.extend(probs)
        if pair is not None:
            pairs.append(pair)
    if problems:
        raise ValidationError(problems, what=f"pair file {path}")
    if not pairs:
        raise UserError(
            f"{path}: holds no preference pairs", f"add pairs, one JSON object per line: {PAIR_EXAMPLE}"
        )
    return pairs


def write_pairs(path: str | os.PathLike, pairs: Iterable[Pair]) -> Path:
    """Write pairs atomically as JSONL (gzip when the name ends in `.gz`; a `.json` path gets an array)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    as_array = path.suffix == ".json"
    with atomic_writer(path) as f:
        rows = [json.dumps(pair_row(p), ensure_ascii=False) for p in pairs]
        if as_array:
            f.write("[\n" + ",\n".join(rows) + "\n]\n")
        else:
            f.writelines(row + "\n" for row in rows)
    return path


def pairs_fingerprint(pairs: Iterable[Pair]) -> str:
    """A hash of the pairs' text, in order: a resumed run must train on the same pairs."""
    h = hashlib.sha256()
    for p in pairs:
        for part in (p.instruction, p.input, p.chosen, p.rejected):
            h.update(part.encode("utf-8"))
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()[:16]
