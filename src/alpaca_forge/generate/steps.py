"""Self-instruct's pure steps after the teacher, in the order a reply goes through them.

    (teacher_prompt: seed tasks -> sample_demos -> build_prompt) -> the teacher -> parse_tasks
    -> filter_reason -> Pool.too_similar (ROUGE-L against the seeds and everything accepted;
    Pool.scores_many with --similarity-details) -> accepted record

Nothing here talks to a teacher or touches a file; these functions and the prompt alone decide
which records a run produces, so they are what the unit tests pin down.
"""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.records import Record
from ..core.rouge import Vocabulary, f1_from_lcs, f1_from_lcs_matrix, lcs_matrix
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

# A pair is scored exactly when its bound is above the threshold less this: far above the
# rounding of either F1 formula, so a float near the threshold is never decided by the bound.
_MARGIN = 1e-9


class Pool:
    """Instructions a candidate must differ from: the seeds, then every accepted one, in order.

    `scores_many` scores candidates against every entry (exact; O(pool) LCS per candidate).
    `too_similar` answers only whether a candidate scores above a threshold against some entry,
    with the same result, scoring exactly only the entries that could: ROUGE-L F1 = 2·LCS/(m+n),
    and LCS <= S = Σ, over the candidate's tokens that the entry holds, of their count in the
    candidate, so an entry with 2·min(S, m, n)/(m+n) <= the threshold cannot score above it. S
    comes from a token -> entries index looked up by the candidate's rarer tokens: the work
    follows their postings (a few entries each), not the pool's size times the LCS cost.
    """

    def __init__(self, instructions: Sequence[str]):
        self.vocab = Vocabulary()
        self.texts: list[str] = []
        self.ids: list[str] = []  # each text's tokens, one code point per token (`Vocabulary`)
        self._lens = np.zeros(1024, dtype=np.int64)  # grows by doubling; first len(texts) are real
        self._postings: dict[str, list[int]] = {}  # too_similar's index of the first `_indexed` entries
        self._indexed = 0
        for text in instructions:
            self.add(text)

    @property
    def lengths(self) -> np.ndarray:
        return self._lens[: len(self.ids)]

    def encode(self, instructions: Sequence[str]) -> list[str]:
        """Each instruction's tokens as this pool's code points (what `add` and the scores take)."""
        return [self.vocab.encode(t) for t in instructions]

    def add(self, instruction: str, ids: str | None = None) -> None:
        """Append `instruction` (`ids`: its `encode`, if done already)."""
        ids = self.vocab.encode(instruction) if ids is None else ids
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

    def too_similar(self, instructions: Sequence[str], threshold: float) -> np.ndarray:
        """Whether each instruction's ROUGE-L F1 with some pool instruction is above `threshold`:
        `(scores_many(instructions) > threshold).any(axis=1)`, the same booleans, exactly.

        A query's most common tokens (in the pool) are left out of the lookup, as many as keep
        their count F <= level·m/(2 − level) (level: the threshold less _MARGIN; m: the query's
        length): an entry holding none of the others has S <= F, so it scores at most
        2·min(F, n)/(m + n) <= 2F/(m + F) <= level whatever its length n. The entries found through
        the other (rarer) tokens, with S_rare of S from them, are bounded by
        2·min(S_rare + F, m, n)/(m + n); only those above the level are scored exactly.
        """
        return np.array([self.close_to_any(q, threshold) for q in self.encode(instructions)], dtype=bool)

    def close_to_any(self, query: str, threshold: float) -> bool:
        """`too_similar` of one instruction given as its `encode`."""
        # Plain Python on a few hundred postings: numpy or rapidfuzz's batch calls would each let
        # the teacher's threads take the interpreter lock, and the reply wait for it back.
        postings = self._index(len(self.ids))
        m = len(query)
        if not m:
            return False
        level = threshold - _MARGIN
        counts = Counter(query)
        tokens = sorted(counts, key=lambda t: len(postings.get(t, ())), reverse=True)  # most held first
        limit = level * m / (2 - level)
        left_out = common = 0  # F, and how many tokens it covers
        while common < len(tokens) and left_out + counts[tokens[common]] <= limit:
            left_out += counts[tokens[common]]
            common += 1
        rare = [postings[t] * counts[t] for t in tokens[common:] if t in postings]  # a token's count: repeats
        # An entry of n tokens, `shared` of them counted here, is bounded above the level only if
        # limit < n < 2·min(shared + F, m)/level − m (2·min(S, m, n) > level·(m + n), solved for n).
        reach = [2 * min(shared + left_out, m) / level - m for shared in range(m + 1)]
        ids = self.ids
        for j, shared in Counter(itertools.chain.from_iterable(rare)).items():
            if limit < len(ids[j]) < reach[shared] and _f1(query, ids[j]) > threshold:
                return True
        return False

    def _index(self, size: int) -> dict[str, list[int]]:
        """Token -> the entries holding it (in pool order), brought up to the first `size` entries."""
        postings = self._postings
        for j in range(self._indexed, size):
            for token in set(self.ids[j]):
                entries = postings.get(token)
                if entries is None:
                    postings[token] = [j]
                else:
                    entries.append(j)
        self._indexed = size
        return postings


def _f1(query: str, other: str) -> float:
    """ROUGE-L F1 of two encoded texts, `query` the target (as a row of `Pool.scores_many`)."""
    from rapidfuzz.distance import LCSseq

    return f1_from_lcs(LCSseq.similarity(query, other), len(query), len(other))


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
    pool: Pool, candidates: Sequence[Record], threshold: float, room: int, details: bool = False
) -> tuple[list[tuple[Record, dict[str, Any]]], int, int]:
    """Add to `pool` those of one reply's filtered candidates that differ enough, greedy in
    order, as if scored one by one: each against the pool as it was before this reply and against
    the candidates of this reply accepted before it. At most `room` are accepted (what the target
    still needs).

    Returns each accepted record with its `similarity_summary` (`details`: every candidate scored
    against the whole pool, O(pool) each) or {} (without: only the pairs that could be above the
    threshold are scored; the same records are accepted), and the counts dropped as too similar
    and as over the target.
    """
    texts = [c.instruction for c in candidates]
    queries = pool.encode(texts)
    if details:
        vs_pool = pool.scores_many(texts)  # (candidates, pool before this reply)
        lengths = np.array([len(q) for q in queries], dtype=np.int64)
        vs_batch = f1_from_lcs_matrix(lcs_matrix(queries, queries), lengths, lengths)  # (candidates, candidates)
    picked: list[int] = []
    accepted: list[tuple[Record, dict[str, Any]]] = []
    similar = over = 0
    for k, record in enumerate(candidates):
        if len(picked) >= room:
            over += 1
            continue
        if details:
            scores = np.concatenate([vs_pool[k], vs_batch[k, picked]])  # in pool order, as it grows
            close = bool(len(scores)) and scores.max() > threshold
        else:
            close = pool.close_to_any(queries[k], threshold)  # the pool holds this reply's accepted ones
        if close:
            similar += 1
            continue
        accepted.append((record, similarity_summary(pool, scores) if details else {}))
        pool.add(record.instruction, queries[k])
        picked.append(k)
    return accepted, similar, over
