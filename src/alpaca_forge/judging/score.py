"""Rating single records: our scoring rubric, the rating read back, a cache, and the scoring loop.

A judge reads one record (its instruction, input and output) and rates the output twice, from 1
to 5: accuracy (is it correct and does it do what was asked) and helpfulness (would the person who
asked be well served). AlpaGasus filtered Alpaca with one such rating; the wording here is ours.
The judge is asked to reply with two labelled lines (`Accuracy: 4`, `Helpfulness: 5`) and a reason;
`parse_rating` reads those back from what judges actually write (markdown, "4/5", "score of 4"),
and a reply it cannot read with certainty is `None`: asked again (`retries`), then counted,
never guessed.

Ratings are cached by everything that decides them (the rubric's version, the judge and its
settings, the text shown) in an append-only JSONL file: a rerun asks nothing, a killed run loses
at most the requests in flight. Rule judges (`rule:longer`, `rule:shorter`) rate by the output's
length, with no model: for offline demos and tests, not for quality.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.files import open_append, read_appended_jsonl, sync
from ..core.prompts import Message
from ..core.records import Record
from ..engines import Completion, Engine, FinishReason, GenerationSettings
from ..engines.batch import waiting_error
from ..engines.in_flight import chat_in_flight
from .rules import PREFIX, RuleJudge

# Bump when the rubric's wording changes: ratings made under another wording are not reused.
RUBRIC_VERSION = "score-v1"

RUBRIC = """\
You are reviewing one example from a dataset that will teach an assistant to follow instructions. \
Read the instruction (and its input, if any), then the response, and rate the response on two \
scales from 1 (worst) to 5 (best).

Accuracy: is the response correct, free of false statements and mistakes, and does it do what the \
instruction asks (all of it, in the form asked for)?
Helpfulness: would the person who wrote the instruction be well served: is it complete, on topic, \
clear and no longer than it needs to be?

1 = wrong, off topic or empty; 2 = mostly wrong or of little use; 3 = partly right, with clear \
gaps; 4 = right and useful, with small flaws; 5 = fully right and as useful as it could be.
{context}
### Instruction:
{instruction}
{input_block}
### Response:
{output}

Rate the response. Reply with exactly these two lines first, each with one whole number from 1 to 5:
Accuracy: <1-5>
Helpfulness: <1-5>
then one short sentence of reason."""

CUT_MARK = "\n[... the rest of this response is cut]"

FOLLOW_UP = (
    "Your reply did not give the two ratings in the form asked. Reply again with exactly these two "
    "lines, each with one whole number from 1 to 5:\nAccuracy: <1-5>\nHelpfulness: <1-5>"
)


@dataclass(frozen=True)
class Rating:
    """One record's two ratings, 1-5 each; `overall` is their mean."""

    accuracy: int
    helpfulness: int

    @property
    def overall(self) -> float:
        return (self.accuracy + self.helpfulness) / 2

    def to_dict(self, judge: str) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "helpfulness": self.helpfulness,
            "overall": self.overall,
            "judge": judge,
        }


# ---------------------------------------------------------------------------------------------
# The prompt


def score_messages(record: Record, max_output_chars: int | None = None) -> list[Message]:
    """The rubric filled in with `record`. A conversation shows its earlier turns as context; the
    rating is of its last assistant turn (the record's output)."""
    output = record.output.strip() or "(an empty response)"
    if max_output_chars is not None and len(output) > max_output_chars:
        output = output[:max_output_chars] + CUT_MARK
    context = ""
    messages = getattr(record, "messages", None)  # conversations (core.records) hold their turns
    if messages:
        last_user = max(i for i, m in enumerate(messages) if m.role == "user")
        earlier = list(messages[:last_user])
        if earlier:
            turns = "\n\n".join(f"[{m.role}]\n{m.content.strip()}" for m in earlier)
            context = f"\nThe response continues this conversation:\n\n### Conversation so far:\n{turns}\n"
    input_block = f"\n### Input:\n{record.input.strip()}\n" if record.input.strip() else ""
    text = RUBRIC.format(
        context=context, instruction=record.instruction.strip(), input_block=input_block, output=output
    )
    return [Message("user", text)]


def retry_messages(messages: list[Message], unreadable: str) -> list[Message]:
    """The rubric, the judge's reply that held no readable rating, and the form asked again."""
    return [*messages, Message("assistant", unreadable), Message("user", FOLLOW_UP)]


# ---------------------------------------------------------------------------------------------
# Reading the rating

_NUMBER = r"[*_\s:=\-–(\[]*(?:(?:score|rating|of|is)\W+){0,3}(?P<n>\d+(?:\.\d+)?)(?:\s*/\s*(?P<of>\d+))?"
_LABELS = {
    "accuracy": re.compile(rf"\b(?:accuracy|accurate|correctness)\b{_NUMBER}", re.IGNORECASE),
    "helpfulness": re.compile(rf"\b(?:helpfulness|helpful|usefulness)\b{_NUMBER}", re.IGNORECASE),
}


def _rated(m: re.Match) -> int | None:
    """A 1-5 whole number, as "4", "4/5" or "4.0"; anything else (6, 3.5, 8/10) is not a rating."""
    if m.group("of") and m.group("of") != "5":
        return None
    value = float(m.group("n"))
    return int(value) if value.is_integer() and 1 <= value <= 5 else None


def parse_rating(reply: str) -> Rating | None:
    """The two ratings in `reply`, or None where either is missing, out of range, or given twice
    with different values."""
    found: dict[str, int] = {}
    for name, pattern in _LABELS.items():
        values = {_rated(m) for m in pattern.finditer(reply)}
        if len(values) != 1 or None in values:
            return None
        found[name] = values.pop()  # type: ignore[assignment]
    return Rating(found["accuracy"], found["helpfulness"])


# ---------------------------------------------------------------------------------------------
# Rule judges: a rating from the output's length, for offline demos


def _length_band(words: int) -> int:
    """1 for an empty output, then 2 (1-9 words), 3 (10-29), 4 (30-99), 5 (100 or more)."""
    return 1 if words == 0 else 2 if words < 10 else 3 if words < 30 else 4 if words < 100 else 5


def rule_rating(rule: str, output: str) -> Rating:
    """`rule:longer`: the longer the output, the higher (1 empty, 2 for 1-9 words, 3 for 10-29,
    4 for 30-99, 5 for 100+); `rule:shorter`: an empty output 1, else the other way round (5 for
    1-9 words ... 2 for 100+). Both ratings get the same number."""
    band = _length_band(len(output.split()))
    value = band if rule == "longer" or band == 1 else 7 - band
    return Rating(value, value)


def rule_reply(rule: str, output: str) -> str:
    r = rule_rating(rule, output)
    return (
        f"Accuracy: {r.accuracy}\nHelpfulness: {r.helpfulness}\n"
        f"{PREFIX}{rule} rates by length: {len(output.split())} words."
    )


# ---------------------------------------------------------------------------------------------
# The cache


def score_key(judge: str, settings: GenerationSettings, messages: Sequence[Message]) -> str:
    """Everything that decides a rating, hashed: the rubric's version, who judged with which
    settings, and the exact text shown."""
    what = [RUBRIC_VERSION, judge, settings.to_dict(), [[m.role, m.content] for m in messages]]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()


class ScoreCache:
    """Judge replies by key, in an append-only JSONL file (flushed and synced as they come back).
    Each key keeps its first readable reply, and the number of times it was asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.replies: dict[str, str] = {}  # key -> the reply used: the first readable, else the last
        self.asked: dict[str, int] = {}
        self.costs: dict[str, tuple[int, int]] = {}  # key -> (prompt, completion) tokens, every try
        if self.path.exists():
            fix = "delete it (its ratings are lost) or name another --cache"
            for _line, row in read_appended_jsonl(self.path, ("key", "reply"), "data score", fix):
                self._note(row)

    def rating(self, key: str) -> Rating | None:
        return parse_rating(self.replies[key]) if key in self.replies else None

    def _note(self, row: dict[str, Any]) -> None:
        key = str(row["key"])
        self.asked[key] = self.asked.get(key, 0) + 1
        if self.rating(key) is None:  # a readable reply is kept; an unreadable one is replaced
            self.replies[key] = str(row["reply"])
        counts = [row.get(n) for n in ("prompt_tokens", "completion_tokens")]
        p, c = (n if isinstance(n, int) and not isinstance(n, bool) else 0 for n in counts)
        before = self.costs.get(key, (0, 0))
        self.costs[key] = (before[0] + p, before[1] + c)

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        with open_append(self.path, "--cache") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                self._note(row)
            sync(f)


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class Scored:
    """Every record's rating (None: the judge's reply could not be read), in record order."""

    ratings: list[Rating | None]
    replies: list[str]
    asked: int  # requests sent now (retries included)
    cached: int  # records whose rating came from the cache
    unreadable: int  # records left without a rating
    prompt_tokens: int  # what every rating cost, cached ones included (each distinct key once)
    completion_tokens: int


def _ask(
    engine: Engine | RuleJudge,
    prompts: dict[str, list[Message]],
    outputs: dict[str, str],
    keys: list[str],
    settings: GenerationSettings,
    batch_size: int,
) -> Iterator[list[tuple[str, Completion]]]:
    """Replies to `keys`, in groups as they come back: a server judge keeps `batch_size` requests
    in flight all the time (a finished one is replaced at once); a model in this process answers
    `batch_size` prompts per batch; a rule answers at once."""
    if isinstance(engine, RuleJudge):
        yield [(k, Completion(rule_reply(engine.rule, outputs[k]), FinishReason.STOP)) for k in keys]
        return
    yield from chat_in_flight(engine, keys, prompts.__getitem__, settings, batch_size)


def _pair(rating: Rating | None) -> list[int] | None:
    return [rating.accuracy, rating.helpfulness] if rating else None


def score_records(
    records: Sequence[Record],
    open_judge: Callable[[], Engine | RuleJudge],
    judge: str,
    settings: GenerationSettings,
    cache: ScoreCache,
    *,
    batch_size: int = 32,
    retries: int = 2,
    max_output_chars: int | None = 6000,
    progress: bool = True,
) -> Scored:
    """Every record rated, cached ratings read back; a reply that cannot be read is asked again,
    up to `retries` more times (across runs too: the cache counts the tries). `judge` is who the
    cache says rated (see judging.judge_identity); `open_judge()` is called only when something
    is left to ask, so a rerun loads no model."""
    from tqdm import tqdm

    prompts_by_record = [score_messages(r, max_output_chars) for r in records]
    keys = [score_key(judge, settings, m) for m in prompts_by_record]
    prompts = dict(zip(keys, prompts_by_record, strict=True))
    outputs = {k: r.output for k, r in zip(keys, records, strict=True)}
    unique = list(dict.fromkeys(keys))
    cached = sum(1 for k in keys if cache.rating(k) is not None)

    def todo() -> list[str]:
        return [k for k in unique if cache.rating(k) is None and cache.asked.get(k, 0) <= retries]

    pending = todo()
    asked = 0
    waiting = None  # a batch judge's requests without results: the command stops after this round
    engine = open_judge() if pending else None
    bar = tqdm(
        total=len(pending), desc="score", unit="record", disable=not progress or not pending, file=sys.stderr
    )
    try:
        while pending and engine is not None:
            # A retry is a follow-up turn: the unreadable reply, and the form asked for again
            # (the same request again would get the same reply from a greedy judge).
            asking = {
                k: retry_messages(prompts[k], cache.replies[k]) if k in cache.replies else prompts[k]
                for k in pending
            }
            for done in _ask(engine, asking, outputs, pending, settings, batch_size):
                cache.add(
                    [
                        {
                            "key": k,
                            "judge": judge,
                            "rubric_version": RUBRIC_VERSION,
                            "reply": c.text,
                            "rating": _pair(parse_rating(c.text)),
                            "prompt_tokens": c.prompt_tokens,
                            "completion_tokens": c.completion_tokens,
                        }
                        for k, c in done
                    ]
                )
                asked += len(done)
                bar.update(len(done))
            pending = todo()
            waiting = waiting_error(engine)
            if waiting is not None:
                break
            if pending:  # unreadable replies, asked again
                bar.total += len(pending)
                bar.refresh()
    finally:
        bar.close()
        if engine is not None:
            engine.close()
    if waiting is not None:
        raise waiting
    ratings = [cache.rating(k) for k in keys]
    spent = [cache.costs.get(k, (0, 0)) for k in unique]
    return Scored(
        ratings,
        [cache.replies.get(k, "") for k in keys],
        asked,
        cached,
        sum(1 for r in ratings if r is None),
        sum(p for p, _ in spent),
        sum(c for _, c in spent),
    )
