"""The token tables behind the greedy ROUGE-L dedupe (`core.rouge_dedupe`): texts tokenised as
rouge-score does, vectorised over blocks; each token ranked (rarest first) and each occurrence an
element (token rank, occurrence) so repeated tokens stay distinct; postings of the kept texts'
prefixes; a block of texts with its elements, strings for the LCS and bucket counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from .rouge import _SEPARATE

BUCKETS = 128  # elements hashed into this many buckets: a cheap bound on a pair's shared count


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated index ranges [s, s+c) for each (s, c), vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total)


def _token_keys(texts: Sequence[str], long_names: dict[bytes, int]) -> tuple[np.ndarray, np.ndarray]:
    """rouge-score's tokens of many texts as uint64 keys, vectorised (no Python per token).

    Returns `(keys, ptr)`: text k's are `keys[ptr[k]:ptr[k+1]]`. A token is a run of a-z0-9 bytes,
    so one of at most 8 bytes packs exactly into a uint64 (little-endian, zero-padded; its top bit
    is clear, every byte being < 0x80). Longer ones (a few percent) are numbered by `long_names`
    (kept by the caller, so that numbers agree between calls), stored with the top bit set.
    """
    parts = [t.lower().encode("utf-8") for t in texts]
    blob = b" ".join(parts).translate(_SEPARATE).replace(b"\x00", b" ") + b" " * 8
    chars = np.frombuffer(blob, dtype=np.uint8) != 0x20
    starts = np.flatnonzero(chars[1:] & ~chars[:-1]) + 1
    if len(chars) and chars[0]:
        starts = np.r_[0, starts]
    ends = np.flatnonzero(chars[:-1] & ~chars[1:]) + 1
    text_start = np.cumsum([0] + [len(p) + 1 for p in parts])
    ptr = np.searchsorted(starts, text_start)
    if not len(starts):
        return np.zeros(0, dtype=np.uint64), ptr
    size = ends - starts
    # Eight bytes read at every token start (an unaligned view of the blob), cut to the token.
    words = np.ndarray(shape=(len(blob) - 7,), dtype="<u8", buffer=blob, strides=(1,))[starts]
    bits = (np.minimum(size, 7) * 8).astype(np.uint64)
    keys = words & np.where(size >= 8, np.uint64(2**64 - 1), (np.uint64(1) << bits) - np.uint64(1))
    long = np.flatnonzero(size > 8)
    if len(long):
        bounds = zip(starts[long].tolist(), ends[long].tolist(), strict=True)
        ids = [long_names.setdefault(blob[a:b], len(long_names)) for a, b in bounds]
        keys[long] = np.array(ids, dtype=np.uint64) | np.uint64(2**63)
    return keys, ptr


def tokenize_corpus(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """rouge-score's tokens of many texts as dense integer ids: text k's token ids are
    `tokens[ptr[k]:ptr[k+1]]`, equal ids for equal tokens (sorting the keys names every one)."""
    keys, ptr = _token_keys(texts, {})
    if not len(keys):
        return np.zeros(0, dtype=np.int64), ptr
    ordered = np.sort(keys)
    distinct = ordered[np.r_[True, ordered[1:] != ordered[:-1]]]
    return np.searchsorted(distinct, keys), ptr


class _TokenTable:
    """Token key -> id, first come first numbered, across every block of a stream."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)  # sorted
        self.ids = np.zeros(0, dtype=np.int64)  # of each key
        self.long_names: dict[bytes, int] = {}

    def ids_of(self, keys: np.ndarray) -> np.ndarray:
        if not len(keys):
            return np.zeros(0, dtype=np.int64)
        distinct = np.unique(keys)
        at = np.minimum(np.searchsorted(self.keys, distinct), max(len(self.keys) - 1, 0))
        new = distinct[self.keys[at] != distinct] if len(self.keys) else distinct
        if len(new):
            if len(self.ids) + len(new) > _TOKEN_LIMIT:
                raise ValueError(f"more than {_TOKEN_LIMIT} distinct tokens: too many to dedupe at once")
            where = np.searchsorted(self.keys, new)
            self.ids = np.insert(self.ids, where, np.arange(len(self.ids), len(self.ids) + len(new)))
            self.keys = np.insert(self.keys, where, new)
        return self.ids[np.searchsorted(self.keys, keys)]


# An element is a (token, occurrence) pair, so that bags of tokens become sets and the shared
# elements of two texts number exactly the tokens they share: id = token << 18 | occurrence.
_OCC_BITS = 18
_TOKEN_LIMIT = 1 << 23
# Elements are ordered rarest first: those never seen in the sample (numbered by their id, all
# below _SEEN), then the sample's by how many of its texts hold them. Any fixed order is exact;
# rarest first keeps the prefixes' postings short.
_SEEN = 1 << 41
_RANK_MASK = (1 << 42) - 1
_LEN_BITS = 21  # a posting's key: rank << 21 | its text's length
_MAX_LEN = (1 << _LEN_BITS) - 2


def _elements(tokens: np.ndarray, ptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each token as its element, grouped by text: (text of each, element ids), vectorised."""
    total = len(tokens)
    doc = np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))
    doc_token = np.sort((doc << 23) | tokens)
    new_run = np.r_[True, doc_token[1:] != doc_token[:-1]]
    run_start = np.flatnonzero(new_run)
    occurrence = np.arange(total) - np.repeat(run_start, np.diff(np.r_[run_start, total]))
    if total and occurrence.max() >= 1 << _OCC_BITS:
        raise ValueError(f"a token occurs over {1 << _OCC_BITS} times in one text: too long to dedupe")
    return doc_token >> 23, ((doc_token & ((1 << 23) - 1)) << _OCC_BITS) | occurrence


@dataclass
class _Postings:
    """Prefix postings sorted by `key` = element rank << 21 | text length, with each one's text.
    Sorting by length second makes the length filter a binary search."""

    key: np.ndarray
    doc: np.ndarray
    pos: np.ndarray  # the element's position in its text

    @classmethod
    def empty(cls) -> _Postings:
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32))

    def merge(self, other: _Postings) -> None:
        """Add `other` (sorted too) to these, keeping the order."""
        at = np.searchsorted(self.key, other.key, side="right")
        self.key = np.insert(self.key, at, other.key)
        self.doc = np.insert(self.doc, at, other.doc)
        self.pos = np.insert(self.pos, at, other.pos)


def _as_strings(tokens: np.ndarray, ptr: np.ndarray) -> list[str] | list[list[int]]:
    """Each text's token ids as one code point per token: rapidfuzz compares str fastest. Ids
    from the surrogate range up move past it; a vocabulary too large for Unicode stays lists
    (of the same shifted numbers, so that the two forms compare alike)."""
    points = tokens + (tokens >= 0xD800) * 0x800
    bounds = ptr.tolist()
    if len(points) and points.max() >= 0x110000:
        ids = points.tolist()
        return [ids[a:b] for a, b in pairwise(bounds)]
    whole = points.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
    return [whole[a:b] for a, b in pairwise(bounds)]


class _Block:
    """One block of texts, tokenized: what is needed of them as queries and to index them."""

    def __init__(self, start: int, tokens: np.ndarray, ptr: np.ndarray, rank: np.ndarray, doc: np.ndarray):
        self.start, self.ptr = start, ptr
        n_texts = len(ptr) - 1
        # Each text's elements by rank, rarest first (the block is small: doc << 42 fits).
        self.flat = np.sort((doc << 42) | rank) & _RANK_MASK
        self.strings = _as_strings(tokens, ptr)
        counts = np.bincount(doc * BUCKETS + self.flat % BUCKETS,
                             minlength=n_texts * BUCKETS)  # fmt: skip
        self.buckets = counts.reshape(n_texts, BUCKETS).astype(np.int32)
