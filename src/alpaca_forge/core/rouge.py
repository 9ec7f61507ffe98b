"""Exact ROUGE-L F1: the similarity self-instruct filters with, as rouge-score computes it.

Scores equal those of the `rouge-score` package's `RougeScorer(["rougeL"], use_stemmer=False)`:
the same tokenisation (lower-case, every run of characters other than a-z and 0-9 is a separator)
and the same F1 arithmetic. The longest common subsequence (LCS) is computed by rapidfuzz's
`LCSseq` on token ids (one code point per token), many pairs per call on every core, instead of a
Python dynamic programme. The greedy near-duplicate filter over whole corpora, which scores only
the pairs that could qualify, is `core.rouge_dedupe`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# rouge-score lower-cases, then treats every character other than a-z and 0-9 as a separator.
# On UTF-8 bytes that is one C-level `translate`: every byte of a non-ASCII character is >= 0x80,
# so it becomes a separator too. (NUL is kept: it separates texts when many are encoded at once.)
_KEEP = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789\x00")
_SEPARATE = bytes(c if c in _KEEP else 0x20 for c in range(256))


def _token_bytes(text: str) -> list[bytes]:
    return text.lower().encode("utf-8").translate(_SEPARATE).replace(b"\x00", b" ").split()


def rouge_tokens(text: str) -> list[str]:
    """Tokens as rouge-score's default tokenizer (no stemming) makes them."""
    return [t.decode("ascii") for t in _token_bytes(text)]


def f1_from_lcs(lcs: int, target_len: int, prediction_len: int) -> float:
    """ROUGE-L F1 with rouge-score's own arithmetic (the same float operations, so the same bits)."""
    if target_len == 0 or prediction_len == 0 or lcs == 0:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    return 2 * precision * recall / (precision + recall)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (symmetric)."""
    from rapidfuzz.distance import LCSseq

    ta, tb = rouge_tokens(a), rouge_tokens(b)
    return f1_from_lcs(LCSseq.similarity(ta, tb), len(ta), len(tb)) if ta and tb else 0.0


class Vocabulary:
    """Token -> one code point: a text becomes the str of its token ids, which rapidfuzz compares
    ~1.6x faster than a list of the same integers (generate's pool: 16 candidates against 10K
    accepted instructions, every reply) and holds in a fraction of the memory. Ids from the
    surrogate range up move past it, as in `_as_strings`."""

    def __init__(self) -> None:
        self.ids: dict[bytes, str] = {}

    def encode(self, text: str) -> str:
        ids = self.ids
        return "".join([ids.get(t) or ids.setdefault(t, _code_point(len(ids))) for t in _token_bytes(text)])


def _code_point(token_id: int) -> str:
    point = token_id + (token_id >= 0xD800) * 0x800
    if point >= 0x110000:
        raise ValueError("more than 1.1 million distinct tokens: too many for one Vocabulary")
    return chr(point)


def lcs_matrix(queries: Sequence[Sequence[int]], choices: Sequence[Sequence[int]]) -> np.ndarray:
    """LCS lengths of every query with every choice; large jobs use every core (the GIL is released)."""
    from rapidfuzz import process
    from rapidfuzz.distance import LCSseq

    if not queries or not choices:
        return np.zeros((len(queries), len(choices)), dtype=np.int32)
    workers = -1 if len(queries) * len(choices) > 20_000 else 1
    return process.cdist(queries, choices, scorer=LCSseq.similarity, dtype=np.int32, workers=workers)


def f1_from_lcs_array(lcs: np.ndarray, target_lens: np.ndarray, prediction_lens: np.ndarray) -> np.ndarray:
    """ROUGE-L F1 element-wise (arrays broadcast), with `f1_from_lcs`'s exact float operations."""
    m = np.asarray(target_lens, dtype=np.float64)
    n = np.asarray(prediction_lens, dtype=np.float64)
    lcs = np.asarray(lcs)
    recall = np.empty(np.broadcast_shapes(lcs.shape, m.shape, n.shape))  # ours, worked on in place
    recall[...] = lcs
    # Few passes and temporaries over what can be 16 x 10K scores per call (generate's pool),
    # each operation the scalar formula's own, in its order: the same bits.
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.divide(recall, n, out=np.empty_like(recall))
        np.divide(recall, m, out=recall)
        total = precision + recall
        precision *= 2
        precision *= recall
        precision /= total
    # A zero LCS or length gives 0/0 somewhere (NaN) and nothing else does: those score 0.
    return np.nan_to_num(precision, copy=False, nan=0.0)


def f1_from_lcs_matrix(lcs: np.ndarray, query_lens: np.ndarray, choice_lens: np.ndarray) -> np.ndarray:
    """ROUGE-L F1 of every query (the targets) with every choice (the predictions)."""
    return f1_from_lcs_array(lcs, np.asarray(query_lens)[:, None], np.asarray(choice_lens)[None, :])
