"""Self-instruct's pure steps after the teacher, in the order a reply goes through them.

    (teacher_prompt: seed tasks -> sample_demos -> build_prompt) -> the teacher -> parse_tasks
    -> filter_reason -> Pool.scores_many (ROUGE-L against the seeds and everything accepted)
    -> accepted record

Nothing here talks to a teacher or touches a file; these functions and the prompt alone decide
which records a run produces, so they are what the unit tests pin down.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.records import Record
from ..core.rouge import Vocabulary, f1_from_lcs_matrix, lcs_matrix
from .config import FilterConfig

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
    """Records from a teacher's completion of `build_prompt` (`finish_reason` "length": the
    teacher ran out of tokens, so the last block is cut and dropped).

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

FILTERS = (
    "too_short",
    "too_long",
    "blacklisted",
    "banned_prefix",
    "starts_with_punctuation",
    "starts_non_ascii",
)


def blacklist_pattern(words: Sequence[str]) -> re.Pattern[str] | None:
    """Whole words, any case; None for an empty list (an empty alternation would match anything)."""
    if not words:
        return None
    return re.compile(rf"\b(?:{'|'.join(re.escape(w) for w in words)})\b", re.IGNORECASE)


def filter_reason(
    instruction: str, config: FilterConfig, blacklist: re.Pattern[str] | None = None
) -> str | None:
    """Why a candidate instruction is dropped (one of FILTERS), or None if it passes.
    `blacklist` is `blacklist_pattern(config.blacklist)`, compiled once by the caller."""
    words = len(instruction.split())
    if words < config.min_words:
        return "too_short"
    if words > config.max_words:
        return "too_long"
    pattern = blacklist if blacklist is not None else blacklist_pattern(config.blacklist)
    if pattern is not None and pattern.search(instruction):
        return "blacklisted"
    if any(instruction.startswith(p) for p in config.banned_prefixes):
        return "banned_prefix"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    return None


# ---------------------------------------------------------------------------------------------
# The pool: seeds plus everything accepted, scored against each candidate


class Pool:
    """Instructions a candidate must differ from: the seeds, then every accepted one, in order."""

    def __init__(self, instructions: Sequence[str]):
        self.vocab = Vocabulary()
        self.texts: list[str] = []
        self.ids: list[list[int]] = []
        self._lens = np.zeros(1024, dtype=np.int64)  # grows by doubling; first len(texts) are real
        for text in instructions:
            self.add(text)

    @property
    def lengths(self) -> np.ndarray:
        return self._lens[: len(self.ids)]

    def add(self, instruction: str) -> None:
        ids = self.vocab.encode(instruction)
        if len(self.ids) == len(self._lens):
            self._lens = np.concatenate([self._lens, np.zeros_like(self._lens)])
        self._lens[len(self.ids)] = len(ids)
        self.texts.append(instruction)
        self.ids.append(ids)

    def scores(self, instruction: str) -> np.ndarray:
        """ROUGE-L F1 against every pool instruction (exact, as rouge-score computes it)."""
        return self.scores_many([instruction])[0]

    def scores_many(self, instructions: Sequence[str]) -> np.ndarray:
        """(len(instructions), len(pool)) F1 matrix, in one multi-core LCS call."""
        queries = [self.vocab.encode(t) for t in instructions]
        lcs = lcs_matrix(queries, self.ids)
        return f1_from_lcs_matrix(lcs, np.array([len(q) for q in queries]), self.lengths)


def similarity_summary(pool: Pool, scores: np.ndarray, top: int = 10) -> dict[str, Any]:
    """What the original kept with each record: its most similar instructions and the mean score."""
    top = min(top, len(scores))
    best = np.argpartition(-scores, top - 1)[:top] if top else np.zeros(0, dtype=np.int64)
    best = best[np.lexsort((best, -scores[best]))]  # highest first; ties by pool order
    return {
        "most_similar_instructions": {pool.texts[i]: round(float(scores[i]), 6) for i in best},
        "avg_similarity_score": round(float(scores.mean()), 6) if len(scores) else 0.0,
    }


def accept_into(
    pool: Pool, candidates: Sequence[Record], threshold: float, room: int
) -> tuple[list[tuple[Record, dict[str, Any]]], int, int]:
    """Add to `pool` those of one reply's filtered candidates that differ enough, greedy in
    order, as if scored one by one: each against the pool as it was before this reply and against
    the candidates of this reply accepted before it. At most `room` are accepted (what the target
    still needs).

    Returns each accepted record with its `similarity_summary`, and the counts dropped as too
    similar and as over the target.
    """
    texts = [c.instruction for c in candidates]
    vs_pool = pool.scores_many(texts)  # (candidates, pool before this reply)
    vs_batch = Pool(texts).scores_many(texts)  # (candidates, candidates)
    picked: list[int] = []
    accepted: list[tuple[Record, dict[str, Any]]] = []
    similar = over = 0
    for k, record in enumerate(candidates):
        if len(picked) >= room:
            over += 1
            continue
        scores = np.concatenate([vs_pool[k], vs_batch[k, picked]])  # in pool order, as it grows
        if len(scores) and scores.max() > threshold:
            similar += 1
            continue
        accepted.append((record, similarity_summary(pool, scores)))
        pool.add(record.instruction)
        picked.append(k)
    return accepted, similar, over
