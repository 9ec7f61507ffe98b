"""Exact ROUGE-L F1, fast: the near-duplicate filter of self-instruct.

Scores equal those of the `rouge-score` package's `RougeScorer(["rougeL"], use_stemmer=False)`:
the same tokenisation (lower-case, every run of characters other than a-z and 0-9 is a separator)
and the same F1 arithmetic. Speed comes from three places:

1. The longest common subsequence (LCS) is computed by rapidfuzz's `LCSseq` on token ids (one code
   point per token), many pairs per call on every core, instead of a Python dynamic programme.
2. Pairs that cannot reach the threshold are never scored. F1 = 2·LCS/(m+n) for token counts m and
   n, and LCS ≤ the number of tokens the two share, so F1 > τ needs the lengths to be close and
   the two to share more than τ·m/(2−τ) tokens. A prefix filter (index each instruction by its
   rarest tokens, enough of them that any qualifying pair must share one) finds every pair that
   could qualify, and bounds on the shared count discard most of those; only the rest are scored.
3. Tokenising, indexing and filtering are vectorised over whole blocks of texts (numpy), so Python
   runs a few dozen operations per block rather than per text or per token.
Nothing is approximated: the result is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

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
    lcs = np.asarray(lcs, dtype=np.float64)
    m = np.asarray(target_lens, dtype=np.float64)
    n = np.asarray(prediction_lens, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / n
        recall = lcs / m
        f1 = 2 * precision * recall / (precision + recall)
    return np.where((lcs > 0) & (n > 0) & (m > 0), f1, 0.0)


def f1_from_lcs_matrix(lcs: np.ndarray, query_lens: np.ndarray, choice_lens: np.ndarray) -> np.ndarray:
    """ROUGE-L F1 of every query (the targets) with every choice (the predictions)."""
    return f1_from_lcs_array(lcs, np.asarray(query_lens)[:, None], np.asarray(choice_lens)[None, :])


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated index ranges [s, s+c) for each (s, c), vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total)


def tokenize_corpus(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """rouge-score's tokens of many texts as dense integer ids, vectorised (no Python per token).

    Returns `(tokens, ptr)`: text k's token ids are `tokens[ptr[k]:ptr[k+1]]`. A token is a run of
    a-z0-9 bytes, so one of at most 8 bytes packs exactly into a uint64 (little-endian, zero-padded;
    its top bit is clear, every byte being < 0x80). Longer ones (a few percent) get ids from a dict,
    stored with the top bit set. Sorting the keys then names every distinct token.
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
        return np.zeros(0, dtype=np.int64), ptr
    size = ends - starts
    # Eight bytes read at every token start (an unaligned view of the blob), cut to the token.
    words = np.ndarray(shape=(len(blob) - 7,), dtype="<u8", buffer=blob, strides=(1,))[starts]
    bits = (np.minimum(size, 7) * 8).astype(np.uint64)
    keys = words & np.where(size >= 8, np.uint64(2**64 - 1), (np.uint64(1) << bits) - np.uint64(1))
    long = np.flatnonzero(size > 8)
    if len(long):
        names: dict[bytes, int] = {}
        bounds = zip(starts[long].tolist(), ends[long].tolist(), strict=True)
        ids = [names.setdefault(blob[a:b], len(names)) for a, b in bounds]
        keys[long] = np.array(ids, dtype=np.uint64) | np.uint64(2**63)
    ordered = np.sort(keys)
    distinct = ordered[np.r_[True, ordered[1:] != ordered[:-1]]]
    return np.searchsorted(distinct, keys), ptr


def element_ranks(tokens: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """Each text as a set of elements, in the CSR layout of `ptr`: `flat[ptr[k]:ptr[k+1]]`.

    An element is a (token, occurrence) pair, so that bags of tokens become sets and the shared
    elements of two texts number exactly the tokens they share. Elements are named by their rank
    (how many texts hold them, rarest first), and each text's are sorted, rarest first. Vectorised:
    two sorts of one integer key over every token of every text.
    """
    total = len(tokens)
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    vocab = int(tokens.max()) + 1
    doc = np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))
    doc_token = np.sort(doc * vocab + tokens)
    doc, token = np.divmod(doc_token, vocab)
    # Occurrence number within each run of one (text, token) pair.
    new_run = np.r_[True, doc_token[1:] != doc_token[:-1]]
    run_start = np.flatnonzero(new_run)
    occurrence = np.arange(total) - np.repeat(run_start, np.diff(np.r_[run_start, total]))
    # Token t has elements (t, 0) .. (t, c-1), c its largest count in one text: dense ids at once.
    run_size = np.diff(np.r_[run_start, total])
    size_key = np.sort(token[run_start] * (total + 1) + run_size)  # by token, then size
    last = np.r_[size_key[1:] // (total + 1) != size_key[:-1] // (total + 1), True]
    most = np.zeros(vocab, dtype=np.int64)
    most[size_key[last] // (total + 1)] = size_key[last] % (total + 1)
    element = (np.cumsum(most) - most)[token] + occurrence
    # An element occurs once per text at most, so its count is the number of texts holding it.
    counts = np.bincount(element)
    rank = np.empty(len(counts), dtype=np.int64)
    rank[np.lexsort((np.arange(len(counts)), counts))] = np.arange(len(counts))
    return np.sort(doc * len(counts) + rank[element]) % len(counts)  # grouped by text, rarest first


@dataclass(frozen=True)
class Dropped:
    index: int  # the dropped text's position in the input
    kept_index: int  # the earlier kept text it is most similar to (among those above the threshold)
    score: float  # their ROUGE-L F1 (above the threshold)


@dataclass
class _Postings:
    """Prefix postings sorted by `key` = element * span + text length, with each one's text.
    Sorting by length second makes the length filter a binary search."""

    key: np.ndarray
    doc: np.ndarray
    pos: np.ndarray  # the element's position in its text

    def merge(self, other: _Postings) -> None:
        """Add `other` (sorted too) to these, keeping the order."""
        at = np.searchsorted(self.key, other.key, side="right")
        self.key = np.insert(self.key, at, other.key)
        self.doc = np.insert(self.doc, at, other.doc)
        self.pos = np.insert(self.pos, at, other.pos)


def _as_strings(tokens: np.ndarray, ptr: np.ndarray) -> list[str] | list[list[int]]:
    """Each text's token ids as one code point per token: rapidfuzz compares str fastest. Ids
    from the surrogate range up move past it; a vocabulary too large for Unicode stays lists."""
    points = tokens + (tokens >= 0xD800) * 0x800
    bounds = ptr.tolist()
    if len(points) and points.max() >= 0x110000:
        ids = tokens.tolist()
        return [ids[a:b] for a, b in pairwise(bounds)]
    whole = points.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
    return [whole[a:b] for a, b in pairwise(bounds)]


class _GreedyDeduper:
    """One greedy pass, in blocks of texts, every step vectorised over a whole block.

    For text x (m tokens) and an earlier kept text y (n tokens), these exact filters run before
    any LCS is computed, cheapest first:
    1. prefix: x and y must share one of the first `m - min_overlap(m) + 1` elements of x, and of
       the first `n - min_overlap(n) + 1` of y (elements sorted rarest first), so only the
       postings of the kept texts' prefixes are searched;
    2. length: F1 ≤ 2·min(m, n)/(m + n), so n lies in a window around m (a range of the postings);
    3. position: the LCS is at most the number of shared elements. None comes before the first
       shared element the prefixes reveal, and every one they do not reveal comes after the last
       one they do (in both texts), which bounds the count from the positions of those two;
    4. buckets: elements hashed into a few buckets; the shared count is at most the sum over
       buckets of the smaller of the two texts' counts there.
    The LCS of what remains is computed by rapidfuzz, many pairs per call on every core.

    A block is first joined with every text kept before it; its survivors then go through in small
    groups, each joined with the block's texts kept so far, and then decided pair by pair.
    """

    BLOCK = 2048
    GROUP = 64
    BUCKETS = 128

    def __init__(self, texts: Sequence[str], threshold: float, block: int = BLOCK, group: int = GROUP):
        self.tau = threshold
        self.block, self.group = block, group
        tokens, self.ptr = tokenize_corpus(texts)
        self.strings = _as_strings(tokens, self.ptr)
        self.flat = element_ranks(tokens, self.ptr)
        self.lengths = np.diff(self.ptr)
        n_texts = len(self.lengths)
        docs = np.repeat(np.arange(n_texts), self.lengths)
        # Fewest shared tokens any partner of an m-token text needs: the best partner has just the
        # shared tokens (n = L), and 2L/(m+L) > τ <=> L > τm/(2-τ). The epsilon only lowers the
        # bound, so the prefix stays long enough under rounding and the filter stays exact.
        need_any = np.floor(threshold * self.lengths / (2 - threshold) - 1e-9).astype(np.int64) + 1
        self.prefix_len = np.where(self.lengths > 0, self.lengths - need_any + 1, 0)
        self.span = int(self.lengths.max()) + 2 if n_texts else 2
        # Partner lengths that can reach the threshold: 2n/(m+n) > τ and 2m/(m+n) > τ.
        self.n_lo = np.floor(threshold * self.lengths / (2 - threshold)).astype(np.int64) + 1
        n_hi = np.ceil((2 - threshold) * self.lengths / threshold)
        self.n_hi = np.minimum(n_hi, self.span - 2).astype(np.int64)
        # Positions in a prefix are below `width`; a block's sort key needs block·texts·width² < 2⁶³.
        self.width = int(self.prefix_len.max()) + 1 if n_texts else 1
        self.block = max(1, min(self.block, 2**62 // max(1, n_texts * self.width**2)))
        counts = np.bincount(docs * self.BUCKETS + self.flat % self.BUCKETS, minlength=n_texts * self.BUCKETS)
        dtype = np.uint16 if self.span < 2**16 else np.uint32
        self.buckets = counts.astype(dtype).reshape(n_texts, self.BUCKETS)
        self.kept = _Postings(*(np.zeros(0, dtype=np.int64),) * 3)

    def postings(self, docs: np.ndarray) -> _Postings:
        """The prefix postings of these texts, sorted."""
        plen = self.prefix_len[docs]
        doc = np.repeat(docs, plen)
        where = _ranges(self.ptr[docs], plen)
        key = self.flat[where] * self.span + self.lengths[doc]
        order = np.argsort(key, kind="stable")
        return _Postings(key[order], doc[order], (where - self.ptr[doc])[order])

    def join(self, queries: np.ndarray, index: _Postings, earlier_only: bool) -> tuple[np.ndarray, ...]:
        """Every (query, indexed text) pair with F1 above the threshold, as (query, text, F1) arrays;
        with `earlier_only`, only pairs whose indexed text comes first."""
        n_texts = len(self.lengths)
        plen = self.prefix_len[queries]
        local = np.repeat(np.arange(len(queries)), plen)
        where = _ranges(self.ptr[queries], plen)
        qi = where - np.repeat(self.ptr[queries], plen)  # each prefix element's position in its query
        probe = self.flat[where] * self.span
        order = np.argsort(probe)  # sorted needles search faster
        probe, local, qi = probe[order], local[order], qi[order]
        q = queries[local]
        lo = np.searchsorted(index.key, probe + self.n_lo[q])
        hi = np.searchsorted(index.key, probe + self.n_hi[q] + 1)
        hit = _ranges(lo, hi - lo)
        d, j = index.doc[hit], index.pos[hit]
        local, qi = np.repeat(local, hi - lo), np.repeat(qi, hi - lo)
        if earlier_only:
            keep = d < queries[local]
            local, qi, d, j = local[keep], qi[keep], d[keep], j[keep]
        if not len(d):
            return d, d, np.zeros(0)
        # Group the hits by pair, each group in element order: one sort of one integer key (the
        # block size keeps it within 63 bits). Both texts list elements in one order, so a pair's
        # first and last hits are its first and last shared prefix elements in both texts.
        w = self.width
        pair, at = np.divmod(np.sort(((local * n_texts + d) * w + qi) * w + j), w * w)
        qi, j = np.divmod(at, w)
        first = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        last = np.r_[first[1:], len(pair)] - 1
        q_local, d = np.divmod(pair[first], n_texts)
        q = queries[q_local]
        m, n = self.lengths[q], self.lengths[d]
        need = np.floor(self.tau * (m + n) / 2 - 1e-9).astype(np.int64) + 1
        ok = 1 + np.minimum(m - qi[first] - 1, n - j[first] - 1) >= need
        ok &= (last - first + 1) + np.minimum(m - qi[last] - 1, n - j[last] - 1) >= need
        q, d, need = q[ok], d[ok], need[ok]
        ok = np.minimum(self.buckets[q], self.buckets[d]).sum(axis=1, dtype=np.int64) >= need
        q, d = q[ok], d[ok]
        lcs = _pair_lcs([self.strings[k] for k in q.tolist()], [self.strings[k] for k in d.tolist()])
        f1 = f1_from_lcs_array(lcs, self.lengths[q], self.lengths[d])
        above = f1 > self.tau
        return q[above], d[above], f1[above]

    def _matches(self, queries: np.ndarray, index: _Postings) -> dict[int, tuple[int, float]]:
        """Each query above the threshold with an indexed text: its most similar one and the F1."""
        best: dict[int, tuple[int, float]] = {}
        for q, d, f1 in zip(*(a.tolist() for a in self.join(queries, index, False)), strict=True):
            if q not in best or (f1, -d) > (best[q][1], -best[q][0]):
                best[q] = (d, f1)
        return best

    def _greedy_group(self, group: np.ndarray, best: dict[int, tuple[int, float]]) -> list[int]:
        """Greedy among a few texts, from every pair of them above the threshold; fills `best`."""
        edges: dict[int, list[tuple[float, int]]] = {}
        for q, d, f1 in zip(*(a.tolist() for a in self.join(group, self.postings(group), True)), strict=True):
            edges.setdefault(q, []).append((f1, -d))
        kept: set[int] = set()
        for k in group.tolist():
            alive = [e for e in edges.get(k, ()) if -e[1] in kept]
            if alive:
                f1, d = max(alive)
                best[k] = (-d, f1)
            else:
                kept.add(k)
        return sorted(kept)

    def run(self, progress: Callable[[int], None] | None = None) -> tuple[list[int], list[Dropped]]:
        best: dict[int, tuple[int, float]] = {}  # dropped text -> (kept text, F1)
        total = len(self.lengths)
        for start in range(0, total, self.block):
            block = np.arange(start, min(start + self.block, total))
            block = block[self.lengths[block] > 0]  # rouge-score scores an empty text 0: always kept
            best.update(self._matches(block, self.kept))
            survivors = np.array([k for k in block.tolist() if k not in best], dtype=np.int64)
            here = _Postings(*(np.zeros(0, dtype=np.int64),) * 3)
            kept_here: list[int] = []
            for at in range(0, len(survivors), self.group):
                group = survivors[at : at + self.group]
                best.update(self._matches(group, here))
                group = np.array([k for k in group.tolist() if k not in best], dtype=np.int64)
                new = np.array(self._greedy_group(group, best), dtype=np.int64)
                here.merge(self.postings(new))
                kept_here += new.tolist()
            self.kept.merge(self.postings(np.array(kept_here, dtype=np.int64)))
            if progress:
                progress(min(start + self.block, total) - start)
        kept = [k for k in range(total) if k not in best]
        return kept, [Dropped(k, d, f1) for k, (d, f1) in sorted(best.items())]


def _pair_lcs(a: list, b: list) -> np.ndarray:
    """LCS lengths of a[k] and b[k] for every k, on every core."""
    from rapidfuzz import process
    from rapidfuzz.distance import LCSseq

    if not a:
        return np.zeros(0, dtype=np.int64)
    workers = -1 if len(a) > 2000 else 1
    return process.cpdist(a, b, scorer=LCSseq.similarity, dtype=np.int32, workers=workers).astype(np.int64)


def greedy_dedupe(
    texts: Sequence[str], threshold: float = 0.7, progress: Callable[[int], None] | None = None
) -> tuple[list[int], list[Dropped]]:
    """Keep each text unless its ROUGE-L F1 with an earlier kept text is above `threshold`.

    Returns the kept positions and, for each dropped text, a kept text it collided with. Exact:
    the filters only skip pairs that provably cannot score above the threshold.
    """
    return _GreedyDeduper(texts, threshold).run(progress)
