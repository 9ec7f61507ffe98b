"""Self-instruct data generation, the Alpaca recipe: seed tasks -> teacher prompts -> new records.

Data flow (one request): sample 3 seed tasks (seeded by the request number) -> `build_prompt`
-> teacher completion -> `parse_tasks` -> `filter_reason` for each candidate (length, blacklist,
prefixes, first character) -> ROUGE-L against the pool (seeds + everything accepted) -> append.

This module holds the pure steps; they are what decides which records a run produces.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from .records import Record

TASKS_PER_PROMPT = 20  # tasks the teacher is asked for in one completion
DEMOS_PER_PROMPT = 3  # seed tasks shown as examples in each prompt

# Our own wording of the Alpaca recipe's requirements.
PREAMBLE = f"""Write {TASKS_PER_PROMPT} new tasks that people might give an AI assistant, each with a good answer.

Rules for the tasks:
1. Make them different from one another: use a different verb in each, and mix kinds of task (open questions, classification, rewriting, brainstorming, extraction, reasoning, advice, short coding).
2. Write in English. Each instruction is one or two sentences, an imperative or a question.
3. When a task needs material to work on, give a realistic and concrete input of at most 100 words; otherwise write <noinput> as the input.
4. Give each task an appropriate answer of fewer than 100 words.
5. A language model can only read and write text: do not ask for images, drawings, audio, video, files, or actions in the world such as sending an email or setting an alarm.

Tasks:
"""


def format_demo(number: int, record: Record) -> str:
    """One example task in the numbered layout the teacher is asked to continue."""
    return (
        f"###\n{number}. Instruction: {record.instruction}\n"
        f"{number}. Input:\n{record.input or '<noinput>'}\n"
        f"{number}. Output:\n{record.output}\n"
    )


def sample_demos(seeds: Sequence[Record], request_number: int, seed: int) -> list[Record]:
    """The demonstrations for one request: a fixed function of (seed, request number), so that a
    resumed run asks exactly what an uninterrupted one would have."""
    rng = random.Random(f"{seed}:{request_number}")
    return rng.sample(list(seeds), min(DEMOS_PER_PROMPT, len(seeds)))


def build_prompt(demos: Sequence[Record]) -> str:
    """The teacher's prompt; it ends where the next instruction begins."""
    body = "".join(format_demo(i, r) for i, r in enumerate(demos, start=1))
    return f"{PREAMBLE}{body}###\n{len(demos) + 1}. Instruction:"


# ---------------------------------------------------------------------------------------------
# Parsing what the teacher wrote

# A field label at the start of a line: "4. Instruction:", "5) Input:", "Output:", "**6. Output:**".
_LABEL = re.compile(
    r"^[ \t]*[*_#]*[ \t]*(?:(\d+)[ \t]*[.)][ \t]*)?[*_]*(Instruction|Input|Output)[*_]*[ \t]*:[*_]*[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
_TRAILING_HASHES = re.compile(r"(?:\n[ \t]*#+[ \t]*)+\s*$")
_NO_INPUT = re.compile(r"<?\s*no[\s_-]*input\s*>?\.?|n/?a|none|-|", re.IGNORECASE)


@dataclass
class ParsedTasks:
    records: list[Record] = field(default_factory=list)
    unparseable: int = 0  # blocks with an instruction but no output, or fields out of order
    truncated: int = 0  # the last block, dropped because the completion hit its length limit


def parse_tasks(completion: str, first_number: int, finish_reason: str = "stop") -> ParsedTasks:
    """Records from a teacher's completion of `build_prompt`.

    The prompt ended in "N. Instruction:", so the completion starts inside an instruction; a chat
    model may instead restate that label, number differently, skip numbers, add a preamble
    ("Sure! Here are ...") or bold its labels. Blocks are found by their labels, not their numbers.
    """
    text = completion.replace("\r\n", "\n")
    first = _LABEL.search(text)
    if first is None or first.group(2).lower() != "instruction":
        # A plain continuation of the prompt: its first instruction carries no label.
        text = f"{first_number}. Instruction:\n{text}"
    else:
        text = text[first.start() :]  # whatever precedes the first label is chat preamble
    parsed = ParsedTasks()
    blocks: list[dict[str, str]] = []
    labels = list(_LABEL.finditer(text))
    for k, label in enumerate(labels):
        end = labels[k + 1].start() if k + 1 < len(labels) else len(text)
        # Blocks end at "###"; a model that writes fewer hashes leaves a line of them behind.
        value = _TRAILING_HASHES.sub("", text[label.end() : end].split("###")[0]).strip()
        name = label.group(2).lower()
        if name == "instruction":
            blocks.append({"instruction": value})
        elif blocks and name not in blocks[-1]:
            blocks[-1][name] = value
        else:
            parsed.unparseable += 1  # an Input/Output with no instruction before it, or twice
    if finish_reason == "length" and blocks:
        blocks.pop()
        parsed.truncated = 1
    for block in blocks:
        if not block["instruction"] or "output" not in block or not block["output"]:
            parsed.unparseable += 1
            continue
        inp = block.get("input", "")
        parsed.records.append(
            Record(block["instruction"], "" if _NO_INPUT.fullmatch(inp.strip()) else inp, block["output"])
        )
    return parsed


# ---------------------------------------------------------------------------------------------
# Filters (the ROUGE-L one needs the pool and lives with it)

DEFAULT_BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip


@dataclass(frozen=True)
class FilterConfig:
    """Which candidates are dropped before the ROUGE-L check; every threshold is a flag."""

    min_words: int = 4  # instructions of 3 words or fewer say too little
    max_words: int = 150  # longer ones are usually the teacher running on
    blacklist: tuple[str, ...] = DEFAULT_BLACKLIST  # whole words, any case: tasks a text model cannot do
    banned_prefixes: tuple[str, ...] = ("Write a program",)  # answers too long to check
    rouge_threshold: float = 0.7  # drop when ROUGE-L F1 with any pool instruction is above this

    def blacklist_pattern(self) -> re.Pattern[str]:
        words = "|".join(re.escape(w) for w in self.blacklist)
        return re.compile(rf"\b(?:{words})\b", re.IGNORECASE)


FILTERS = (
    "too_short",
    "too_long",
    "blacklisted",
    "banned_prefix",
    "starts_with_punctuation",
    "starts_non_ascii",
)


def filter_reason(
    instruction: str, config: FilterConfig, blacklist: re.Pattern[str] | None = None
) -> str | None:
    """Why a candidate instruction is dropped (one of FILTERS), or None if it passes."""
    words = len(instruction.split())
    if words < config.min_words:
        return "too_short"
    if words > config.max_words:
        return "too_long"
    if (blacklist or config.blacklist_pattern()).search(instruction):
        return "blacklisted"
    if any(instruction.startswith(p) for p in config.banned_prefixes):
        return "banned_prefix"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    return None
