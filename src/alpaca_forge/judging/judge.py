"""The LLM judge: our judging prompt, its verdict read back, and a cache of every judgement.

One judgement is one item with two answers in one order: slot A and slot B. The judge replies
"A", "B" or "tie" on its first line and a short reason after it. `parse_verdict` reads that
back from whatever the judge wrote (a bare letter, "Verdict: B", "Response A is better.",
markdown around it); a reply it cannot read with certainty is `None`, counted and reported, never
guessed. Judgements are cached by everything that decides them (the prompt version, the judge,
its settings, the instruction and the two answers in their order), in an append-only JSONL file:
a rerun is free and a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..core.files import open_append, read_appended_jsonl, sync
from ..core.models import DEFAULT_MODEL
from ..core.prompts import Message
from ..engines import Completion, Engine, EngineConfig, FinishReason, GenerationSettings, open_engine
from ..engines.batch import waiting_error
from ..engines.in_flight import chat_in_flight
from .items import Item
from .rules import RuleJudge, rule_name

Verdict = Literal["A", "B", "tie"]

# Bump when the prompt's wording changes: cached judgements of another wording are not reused.
PROMPT_VERSION = "pairwise-v1"

# The body every wording shares (and tests/fake_judge.py reads): headings, then the question last.
_BODY = """\

### Instruction:
{instruction}
{input_block}
### Response A:
{a}

### Response B:
{b}

Question: """

# Judging prompts by version id: the wordings of `prefer --annotators N` (the first N), each a
# simulated annotator as AlpacaFarm's pool has several. Plain headings and the question last: even
# a 135M model answers these with a letter first (tried against a longer rubric with a system
# message, which it paraphrased instead). "pairwise-v1" is eval's, and every command's default.
JUDGE_PROMPTS = {
    PROMPT_VERSION: (
        "Here is an instruction and two responses to it. Judge which response follows the instruction "
        "better: the more helpful, correct and clear one, whatever its place or its length.\n"
        + _BODY
        + 'which response is better? Answer "A", "B" or "tie" first, then give one short sentence of reason.'
    ),
    "pairwise-v2-correct": (
        "Two assistants answered the same instruction. Decide which answer a careful expert would "
        "accept: correct first, then complete, then clearly written. Do not favour the longer answer "
        "or the first one.\n"
        + _BODY
        + 'which response is more correct and complete? Reply "A", "B" or "tie" on the first line, '
        "then one sentence why."
    ),
    "pairwise-v3-user": (
        "Imagine you asked for what the instruction below says. Which of the two replies would you "
        "rather get: the one that does what was asked, directly and without padding?\n"
        + _BODY
        + 'which reply would you rather get? Say "A", "B" or "tie" first, then a short reason.'
    ),
    "pairwise-v4-concise": (
        "Compare two responses to an instruction. Prefer the one that answers exactly what was asked, "
        "accurately and concisely; an answer that rambles, repeats itself or drifts off topic is worse.\n"
        + _BODY
        + 'which response answers better? Start with "A", "B" or "tie", then one sentence of reason.'
    ),
}
JUDGE_PROMPT = JUDGE_PROMPTS[PROMPT_VERSION]

CUT_MARK = "\n[... the rest of this response is cut]"


@dataclass(frozen=True)
class Judgement:
    """One item judged in one order."""

    item_id: str
    first: str  # the system shown as Response A
    second: str  # ... and as Response B
    verdict: Verdict | None  # in slots; None: the reply held no verdict we could read
    reply: str  # what the judge wrote, as written

    def side(self, a: str) -> str | None:
        """The verdict from system `a`'s side: "a" (it won), "b", "tie", or None (unread)."""
        return side_of(self.verdict, shown_first=self.first == a)


def side_of(verdict: Verdict | None, *, shown_first: bool) -> str | None:
    """A verdict in slots ("A", "B", "tie") turned to one system's side: "a" where the system it
    is read for won, "b" where the other did. Worked out from the slots, never from names."""
    if verdict is None or verdict == "tie":
        return verdict
    return "a" if (verdict == "A") == shown_first else "b"


def open_judge(cfg: EngineConfig, *, seed: int = 0) -> Engine | RuleJudge:
    """The judge `cfg` names: a rule judge (`rule:NAME`, see judging/rules.py), else its engine
    (a model loads here)."""
    rule = rule_name(cfg.model)
    return RuleJudge(rule) if rule else open_engine(cfg, seed=seed)


def judge_name(cfg: EngineConfig) -> str:
    """Who judged, as the report says: the model as named (a server's model name, a built-in
    name, a folder or file as given)."""
    return cfg.model or DEFAULT_MODEL


def judge_identity(cfg: EngineConfig) -> str:
    """Who judged, as the cache keys it: the name, plus every engine setting that changes the
    verdicts and is not its default (the engine, a prompt format, a system message, a dtype).
    A server's address is left out, so a judge that moved keeps its verdicts."""
    parts = [judge_name(cfg)]
    defaults = EngineConfig()
    for name in ("engine", "format", "system", "dtype"):
        value = getattr(cfg, name)
        if value != getattr(defaults, name):
            parts.append(f"{name}={value}")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# The prompt


def judge_messages(
    item: Item, a: str, b: str, max_answer_chars: int | None = None, prompt: str = PROMPT_VERSION
) -> list[Message]:
    def cut(text: str) -> str:
        text = text.strip() or "(an empty response)"
        if max_answer_chars is not None and len(text) > max_answer_chars:
            return text[:max_answer_chars] + CUT_MARK
        return text

    input_block = f"\n### Input:\n{item.input.strip()}\n" if item.input.strip() else ""
    text = JUDGE_PROMPTS[prompt].format(
        instruction=item.instruction.strip(), input_block=input_block, a=cut(a), b=cut(b)
    )
    return [Message("user", text)]


# ---------------------------------------------------------------------------------------------
# Reading the verdict

_TIE = r"(?:tie|tied|draw|equal(?:ly good)?|both(?: are)? (?:equally )?(?:good|bad)|neither)"
_NAMED = r"(?:response|answer|output|assistant|option)"
_LETTER = r"(?P<slot>(?-i:[AB])|(?<=\()[ab](?=\)))"  # an upper-case letter, or (a) / (b)
_SLOT = rf"(?:(?P<named>{_NAMED})\s*)?[\(\[\"'*]*\s*{_LETTER}\b"
# "better" not negated: "is better", "is clearly the better", never "is not better"
_IS_BETTER = r"(?:is|was)\s+(?:(?!not\b|never\b|no\b|hardly\b)\w+\s+){0,2}(?:better|superior|preferred)\b"
# A first line that starts with the verdict: "A", "**B**", "Verdict: tie", "Response A.", "B, since ..."
_VERDICT_LINE = re.compile(
    r"^\W*(?P<label>(?:final\s+)?(?:verdict|answer|decision|winner|choice|better response)\s*(?:is)?\s*[:\-=]?\s*)?"
    rf"(?:{_SLOT}|(?P<tie>{_TIE}))\)?"
    rf"(?P<after>\W*$|\s*[.,:;!\-–—]|\s+{_IS_BETTER}|\s+wins\b)",
    re.IGNORECASE,
)
_LABELLED = re.compile(
    r"\b(?:(?:verdict|decision|winner|choice)\s*(?:is)?\s*[:\-=]|better (?:response|answer|one) is|the answer is)\s*"
    rf"(?:{_SLOT}|(?P<tie>{_TIE}))",
    re.IGNORECASE,
)
_BETTER = re.compile(
    rf"(?:\b{_NAMED}\s*)?\(?\b((?-i:[AB]))\)?\s+{_IS_BETTER}"
    rf"|\b(?:prefer|choose|pick)\s+(?:{_NAMED}\s*)?\(?\b((?-i:[AB]))\)?\b"
    rf"|\b(?:{_NAMED}\s*)?\(?\b((?-i:[AB]))\)?\s+wins\b",
    re.IGNORECASE,
)
_TIE_PROSE = re.compile(
    r"\b(?:it(?:'s| is) a tie|a tie\b|both (?:responses|answers) are equally|neither (?:response|answer) is better)",
    re.IGNORECASE,
)


def parse_verdict(reply: str) -> Verdict | None:
    """The verdict in `reply`, or None where it holds none, or two that disagree anywhere in it
    ("A" on the first line and "B is better" below it is no verdict)."""
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    m = _VERDICT_LINE.match(lines[0].replace("*", "").strip())
    # "Response A: ..." and "Assistant B - ..." introduce a comment on that response, not a verdict
    if (
        m
        and m.group("named")
        and not m.group("label")
        and m.group("after").strip()[:1] in (":", "-", "–", "—")
    ):
        m = None
    found = _prose_verdicts(reply)
    if m:
        verdict = "tie" if m.group("tie") else m.group("slot").upper()
        return None if found - {verdict} else verdict  # type: ignore[return-value]
    return found.pop() if len(found) == 1 else None  # type: ignore[return-value]


def _prose_verdicts(text: str) -> set[str]:
    """Verdicts stated in prose: labelled ones ("Verdict: B") and comparisons ("A is better")."""
    found = {"tie" if m.group("tie") else m.group("slot").upper() for m in _LABELLED.finditer(text)}
    found |= {next(g for g in m.groups() if g).upper() for m in _BETTER.finditer(text)}
    if _TIE_PROSE.search(text):
        found.add("tie")
    return found


# ---------------------------------------------------------------------------------------------
# The cache


def judgement_key(
    judge: str,
    settings: GenerationSettings,
    max_answer_chars: int | None,
    item: Item,
    a: str,
    b: str,
    prompt: str = PROMPT_VERSION,
) -> str:
    """Everything that decides a judgement, hashed: a cached one is reused only when all agree."""
    what = [prompt, judge, settings.to_dict(), max_answer_chars, item.instruction, item.input, a, b]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()


class JudgementCache:
    """Judge replies by key, in an append-only JSONL file (one line per reply, flushed and synced
    after every batch); a line cut off by a kill is dropped on reading."""

    def __init__(self, path: str | Path, command: str = "eval pairwise"):
        self.path = Path(path)
        self.replies: dict[str, str] = {}
        # What each judgement cost, by key: (prompt tokens, completion tokens), as the engine counted
        self.costs: dict[str, tuple[int, int]] = {}
        if self.path.exists():
            fix = "delete it (its judgements are lost) or name another --cache"
            for _line, row in read_appended_jsonl(self.path, ("key", "reply"), command, fix):
                self.replies[str(row["key"])] = str(row["reply"])
                self._count(row)

    def _count(self, row: dict) -> None:
        counts = [row.get(name) for name in ("prompt_tokens", "completion_tokens")]
        ok = [n if isinstance(n, int) and not isinstance(n, bool) else 0 for n in counts]
        self.costs[str(row["key"])] = (ok[0], ok[1])

    def cost(self, keys: Iterable[str]) -> tuple[int, int]:
        """(prompt tokens, completion tokens) the judgements of `keys` cost, each key once."""
        spent = [self.costs.get(k, (0, 0)) for k in set(keys)]
        return sum(p for p, _ in spent), sum(c for _, c in spent)

    def add(self, rows: Sequence[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open_append(self.path, "--cache") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.replies[row["key"]] = row["reply"]
                self._count(row)
            sync(f)


@dataclass(frozen=True)
class Task:
    """One judgement to make."""

    item: Item
    first: str
    second: str
    a: str  # the first system's answer
    b: str
    prompt: str = PROMPT_VERSION  # the judging prompt's version id (a key of JUDGE_PROMPTS)


def _ask(
    engine: Engine | RuleJudge,
    tasks: Sequence[Task],
    pending: list[int],
    settings: GenerationSettings,
    batch_size: int,
    max_answer_chars: int | None,
) -> Iterator[list[tuple[int, Completion]]]:
    """The judge's replies to the pending tasks, in groups as they come back. A server judge
    (`upstream`) keeps `batch_size` requests in flight all the time: each finished one is replaced
    at once, and what came back is yielded (to be cached) while the rest are still out. A model
    in this process answers `batch_size` at a time, batched; a rule answers at once."""
    if isinstance(engine, RuleJudge):  # the rule reads the answers themselves, whole
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            yield [(i, Completion(engine.reply(tasks[i].a, tasks[i].b), FinishReason.STOP)) for i in batch]
        return

    def messages(i: int) -> list[Message]:
        t = tasks[i]
        return judge_messages(t.item, t.a, t.b, max_answer_chars, t.prompt)

    yield from chat_in_flight(engine, pending, messages, settings, batch_size)


def judge_all(
    tasks: Sequence[Task],
    open_judge: Callable[[], Engine | RuleJudge],
    judge: str,
    settings: GenerationSettings,
    cache: JudgementCache,
    *,
    batch_size: int = 8,
    max_answer_chars: int | None = None,
    progress: bool = True,
) -> tuple[list[Judgement], int]:
    """Every task judged, cached ones read back; returns the judgements (in task order) and how
    many were asked of the judge now. `judge` is who the cache says judged (its name and the
    engine settings that change verdicts); `open_judge()` is called only when something is not
    cached, so a rerun loads no model."""
    from tqdm import tqdm

    keys = [judgement_key(judge, settings, max_answer_chars, t.item, t.a, t.b, t.prompt) for t in tasks]
    first_of: dict[str, int] = {}  # the same pair in the same order is asked once
    for i, k in enumerate(keys):
        if k not in cache.replies:
            first_of.setdefault(k, i)
    pending = list(first_of.values())
    waiting = None
    if pending:
        engine = open_judge()
    bar = tqdm(
        total=len(pending),
        desc="judge",
        unit="judgement",
        disable=not progress or not pending,
        file=sys.stderr,
    )
    try:
        for done in _ask(engine, tasks, pending, settings, batch_size, max_answer_chars) if pending else ():
            cache.add(
                [
                    {
                        "key": keys[i],
                        "item": tasks[i].item.id,
                        "first": tasks[i].first,
                        "second": tasks[i].second,
                        "judge": judge,
                        "prompt_version": tasks[i].prompt,
                        "reply": c.text,
                        "verdict": parse_verdict(c.text),
                        "prompt_tokens": c.prompt_tokens,  # what the judge cost (`run` sums them)
                        "completion_tokens": c.completion_tokens,
                    }
                    for i, c in done
                ]
            )
            bar.update(len(done))
        if pending:  # a batch judge's requests without results stop the command here
            waiting = waiting_error(engine)
    finally:
        bar.close()
        if pending:
            engine.close()
    if waiting is not None:
        raise waiting
    judgements = [
        Judgement(t.item.id, t.first, t.second, parse_verdict(cache.replies[k]), cache.replies[k])
        for t, k in zip(tasks, keys, strict=True)
    ]
    return judgements, len(pending)
