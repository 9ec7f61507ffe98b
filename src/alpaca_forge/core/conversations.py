"""Conversations in data files: OpenAI `messages` and ShareGPT `conversations`, checked and read.

Two layouts of the same thing, a list of turns:

- OpenAI: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`;
- ShareGPT: `{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}` (also
  "user"/"assistant" as `from`, which some exports write).

A conversation is read whole and every problem is reported at once, each with the item's place
and the field (`data.jsonl:7 messages[3].role`): a role out of order (an assistant first, two
users in a row, a system message that is not the first), an empty turn, a non-string content,
an unknown role. Nothing is dropped: a system message is kept as the conversation's first turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import Problem
from .prompts import ROLES, Message


@dataclass(frozen=True)
class Layout:
    """How one data format spells a conversation."""

    field: str  # the item's key holding the list of turns
    role_key: str
    content_key: str
    roles: dict[str, str]  # the format's role names -> ours (system, user, assistant)
    allowed: str  # the role names as the format's users know them, for messages

    def example(self) -> str:
        user, assistant = (next(k for k, v in self.roles.items() if v == r) for r in ("user", "assistant"))
        return (
            f'"{self.field}": [{{"{self.role_key}": "{user}", "{self.content_key}": "..."}}, '
            f'{{"{self.role_key}": "{assistant}", "{self.content_key}": "..."}}]'
        )


OPENAI = Layout("messages", "role", "content", {r: r for r in ROLES}, "system, user, assistant")
SHAREGPT = Layout(
    "conversations",
    "from",
    "value",
    {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"},
    "system, human, gpt (also user, assistant)",
)
LAYOUTS = (OPENAI, SHAREGPT)
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}  # ours -> ShareGPT's


def layout_of(item: dict[str, Any]) -> Layout | None:
    """The conversation layout an item is written in, or None for an Alpaca-style item."""
    return next((lay for lay in LAYOUTS if lay.field in item), None)


def read_conversation(
    value: Any, layout: Layout, where: str, *, require_output: bool
) -> tuple[tuple[Message, ...] | None, list[Problem]]:
    """The turns of one item's conversation, or every problem that stops it from being one."""
    name = layout.field
    if not isinstance(value, list) or not value:
        return None, [
            Problem(
                f"{where} {name}",
                f"field '{name}' must be a non-empty list of turns, got {_shown(value)}",
                f"write it as {layout.example()}",
            )
        ]
    problems: list[Problem] = []
    turns: list[tuple[int, str, str]] = []  # (position, our role, content) of the turns with a known role
    for k, turn in enumerate(value):
        at = f"{where} {name}[{k}]"
        if not isinstance(turn, dict):
            problems.append(
                Problem(
                    at,
                    f"expected a JSON object, got {_shown(turn)}",
                    f'write each turn as {{"{layout.role_key}": "...", "{layout.content_key}": "..."}}',
                )
            )
            continue
        role = _role(turn.get(layout.role_key), layout, f"{at}.{layout.role_key}", problems)
        content = turn.get(layout.content_key)
        if not isinstance(content, str):
            kind = type(content).__name__
            article = "an" if kind[0] in "aeiou" else "a"
            got = "missing" if content is None else f"{article} {kind}, not a string ({_shown(content)})"
            problems.append(
                Problem(
                    f"{at}.{layout.content_key}",
                    f"the turn's '{layout.content_key}' is {got}",
                    f'write the text as a JSON string: "{layout.content_key}": "..."',
                )
            )
        elif role is not None and not content.strip():
            problems.append(
                Problem(
                    f"{at}.{layout.content_key}",
                    f"empty {role} turn",
                    "write the reply, or end the conversation before this turn"
                    if role == "assistant"
                    else f"write the {role} message's text, or remove the turn",
                )
            )
        if role is not None:
            turns.append((k, role, content if isinstance(content, str) else ""))
    problems += _order_problems(turns, layout, where)
    if turns and not problems and require_output and turns[-1][1] != "assistant":
        k = turns[-1][0]
        problems.append(
            Problem(
                f"{where} {name}[{k}]",
                "the conversation ends with a user turn that has no assistant reply",
                "add the assistant's reply after it, or remove that last user turn",
            )
        )
    if problems:  # in the order of the turns, as the user reads the file
        return None, sorted(problems, key=lambda p: _turn_at(p.where, name))
    return tuple(Message(role, content) for _, role, content in turns), []


def _role(raw: Any, layout: Layout, at: str, problems: list[Problem]) -> str | None:
    if isinstance(raw, str) and raw in layout.roles:
        return layout.roles[raw]
    what = "missing" if raw is None else f"{_shown(raw)}, which is not a role"
    problems.append(
        Problem(
            at,
            f"'{layout.role_key}' is {what}; the roles are: {layout.allowed}",
            f'write one of them, e.g. "{layout.role_key}": "{next(iter(k for k in layout.roles if k != "system"))}"',
        )
    )
    return None


def _order_problems(turns: Sequence[tuple[int, str, str]], layout: Layout, where: str) -> list[Problem]:
    """System first (at most once), then user and assistant turns alternating, the user first."""
    problems: list[Problem] = []
    name, key = layout.field, layout.role_key
    previous: tuple[int, str] | None = None  # the last user or assistant turn
    for k, role, _ in turns:
        at = f"{where} {name}[{k}].{key}"
        if role == "system":
            if k != 0:
                problems.append(
                    Problem(
                        at,
                        "a system message that is not the first turn",
                        "put the one system message first, or remove this one",
                    )
                )
            continue
        if previous is None and role == "assistant":
            problems.append(
                Problem(
                    at,
                    "the conversation starts with an assistant turn",
                    "start with the user's message (after the system message, if any)",
                )
            )
        elif previous is not None and previous[1] == role:
            problems.append(
                Problem(
                    at,
                    f"two {role} turns in a row ({name}[{previous[0]}] and {name}[{k}]); user and "
                    "assistant turns alternate",
                    f"merge the two {role} turns into one, or put the "
                    f"{'assistant' if role == 'user' else 'user'}'s turn between them",
                )
            )
        previous = (k, role)
    if turns and previous is None:
        problems.append(
            Problem(
                f"{where} {name}",
                "the conversation has no user turn",
                f"add the user's message and the reply: {layout.example()}",
            )
        )
    return problems


def _turn_at(where: str, name: str) -> int:
    """The turn a problem's place names (`... messages[3].role` -> 3); the whole list: after all."""
    head, _, tail = where.rpartition(f"{name}[")
    return int(tail.split("]", 1)[0]) if head or tail.startswith(tuple("0123456789")) else 1 << 30


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:39] + "…"


def is_multi_turn(messages: Sequence[Message]) -> bool:
    """Kept as a conversation (not an Alpaca record): a system message, or more than one exchange."""
    turns = [m for m in messages if m.role != "system"]
    return len(turns) != len(messages) or len(turns) > 2


def to_rows(messages: Sequence[Message], layout: Layout) -> list[dict[str, str]]:
    """Turns written in a layout: `[{"role", "content"}]` or ShareGPT's `[{"from", "value"}]`."""
    names = SHAREGPT_NAMES if layout is SHAREGPT else {r: r for r in ROLES}
    return [{layout.role_key: names[m.role], layout.content_key: m.text} for m in messages]
