"""Magpie's pure steps: where a chat template puts a user's words, and which queries and answers
are kept.

    the chat template -> pre_query (its text up to a user turn's content, and where a turn ends)
    -> the teacher continues that text (a raw completion): the query -> cut_query -> query_problem
    -> the answer (a chat call) -> answer_problem -> ROUGE-L against the accepted queries
    -> magpie_row

An aligned model, shown only the start of a user turn, writes what users ask it: the query comes
from its template alone, no seed tasks. Nothing here talks to an engine or touches a file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.errors import UserError
from ..core.prompts import Message
from .config import FilterConfig
from .steps import filter_reason

# Stands for a user's words while the template is rendered: plain letters, so templates that
# trim or test the content leave it as it is.
SLOT = "MagpieQuerySlot7f3a"

# The reasons a conversation is dropped, each counted in the summary.
DROPS = (
    "query_empty",  # the teacher ended its turn at once
    "query_cut",  # the query ran past --magpie-query-max-new-tokens without ending its turn
    "query_markup",  # template tokens in the text: the teacher wrote past the turn
    "query_not_a_request",  # it reads as an assistant's reply or a greeting, not a task
    "query_garbage",  # mostly not letters
    "query_repetitive",  # the same words over and over
    "query_too_short",
    "query_too_long",
    "query_blacklisted",
    "query_banned_prefix",
    "query_starts_with_punctuation",
    "query_starts_non_ascii",
    "query_similar",  # ROUGE-L with an accepted query above --rouge-threshold
    "answer_empty",
    "answer_cut",  # the answer hit --max-new-tokens
    "answer_too_short",
    "answer_markup",
    "answer_repetitive",
    "answer_refusal",  # "I'm sorry, but ...": the answerer declined (or could not) and said so
    "over_target",
)

# A special token as templates write them: <|im_end|>, <|eot_id|>, <end_of_turn>, </s>, [/INST].
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?[a-z_]{1,30}>|\[/?[A-Z_]{2,20}\]")
_OPENER = re.compile(
    r"^(?:sure|certainly|of course|absolutely|great question|i'?m sorry|i am sorry|as an ai|"
    r"hello|hi|hey|greetings|thank you|thanks)\b",
    re.IGNORECASE,
)

# An answer that opens by declining: nothing to learn from but the refusal itself.
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|i apologi[sz]e|sorry,|as an ai|as a language model|i'?m an ai|"
    r"i can(?:'|no)t|i am (?:not able|unable)|i'?m (?:not able|unable)|unfortunately,? i)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class PreQuery:
    """What the teacher continues to write a query, and where the query ends."""

    text: str  # the template's rendering up to where a user turn's words go
    stops: tuple[str, ...]  # the end-of-turn marker, and the headers of the next turns


def pre_query(render: Callable[[Sequence[Message]], str], conversation: Sequence[Message] = ()) -> PreQuery:
    """The pre-query text of a chat template (`render`: messages -> the prompt it renders, a
    generation prompt added): `conversation` so far (system part included where the template
    writes one), then the header of a new user turn. Its stops: the first special token after
    the user's words (the end-of-turn marker), the line that opens the assistant's turn, and the
    user header itself (a model that starts another user turn has ended its own)."""
    rendered = render([*conversation, Message("user", SLOT)])
    if rendered.count(SLOT) != 1:
        raise UserError(
            "cannot find where a user's words go in this chat template (it rewrites or repeats them)",
            "use a model whose chat template writes each user message once, as it is",
        )
    head, tail = rendered.split(SLOT)
    if not head.strip():
        raise UserError(
            "this chat template writes nothing before a user's words, so the model cannot be asked to "
            "write a query (it is not a chat template with turns)",
            "use an aligned chat model whose template marks the user's turn",
        )
    stops: list[str] = []
    marker = _SPECIAL.search(tail)
    if marker:
        stops.append(marker.group(0))
    tail_lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if tail_lines:
        stops.append(tail_lines[0])
    head_lines = [line.strip() for line in head.splitlines() if line.strip()]
    user_header = head_lines[-1]
    if len(user_header) <= 40:  # a header, not a system prompt's last sentence
        stops.append(user_header)
    return PreQuery(head, tuple(dict.fromkeys(s for s in stops if s))[:4])  # OpenAI takes 4 stops


def cut_query(text: str, stops: Sequence[str]) -> str:
    """The query as a user would have typed it: up to the first stop, whitespace trimmed."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def is_repetitive(text: str) -> bool:
    """The same words over and over: under half of its word 3-grams distinct (a text of 12 words
    or more; a natural one repeats hardly any)."""
    words = text.lower().split()
    if len(words) < 12:
        return False
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) < 0.5 * len(grams)


def is_garbage(text: str) -> bool:
    """Mostly not letters (symbols, numbers, code noise), or no word of two letters."""
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return not visible or letters < 0.6 * len(visible) or not re.search(r"[^\W\d_]{2}", text)


def query_problem(
    query: str, cut_short: bool, filters: FilterConfig, blacklist: re.Pattern[str] | None
) -> str | None:
    """Why a query is dropped (one of DROPS), or None. `cut_short`: the teacher hit the query's
    token limit. The word counts, blacklist and prefixes are the self-instruct filters'."""
    if not query:
        return "query_empty"
    if cut_short:
        return "query_cut"
    if _SPECIAL.search(query):
        return "query_markup"
    if _OPENER.match(query):
        return "query_not_a_request"
    if is_garbage(query):
        return "query_garbage"
    if is_repetitive(query):
        return "query_repetitive"
    reason = filter_reason(query, filters, blacklist)
    return f"query_{reason}" if reason else None


def answer_problem(answer: str, cut_short: bool, min_words: int) -> str | None:
    """Why an answer is dropped (one of DROPS), or None. `cut_short`: it hit its token limit."""
    if not answer.strip():
        return "answer_empty"
    if cut_short:
        return "answer_cut"
    if len(answer.split()) < min_words:
        return "answer_too_short"
    if _SPECIAL.search(answer):
        return "answer_markup"
    if is_repetitive(answer):
        return "answer_repetitive"
    if _REFUSAL.match(answer.lstrip()):
        return "answer_refusal"
    return None


def magpie_row(turns: Sequence[tuple[str, str]], meta: dict[str, Any]) -> dict[str, Any]:
    """The output row: one exchange as an Alpaca record, more as `{"messages": [...]}`; both with
    `"magpie": meta`."""
    if len(turns) == 1:
        query, answer = turns[0]
        return {"instruction": query, "input": "", "output": answer, "magpie": meta}
    messages = []
    for query, answer in turns:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "magpie": meta}


def first_query(row: dict[str, Any]) -> str:
    """The opening query of an output row (what later queries must differ from)."""
    if "messages" in row:
        return next(m["content"] for m in row["messages"] if m.get("role") == "user")
    return row["instruction"]


def conversation_of(turns: Sequence[tuple[str, str]]) -> list[Message]:
    """The turns so far as messages (what the next query, or the answer, follows)."""
    out: list[Message] = []
    for query, answer in turns:
        out.append(Message("user", query))
        if answer:
            out.append(Message("assistant", answer))
    return out
