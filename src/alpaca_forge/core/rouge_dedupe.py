"""Greedy ROUGE-L near-duplicate removal over whole corpora, exact and fast (`data dedupe`, and
`data clean`'s near_duplicate check). Scores are `core.rouge`'s. Speed comes from three places:

1. The LCS of a pair is rapidfuzz's, many pairs per call (`core.rouge`).
2. Pairs that cannot reach the threshold are never scored. F1 = 2·LCS/(m+n) for token counts m and
   n, and LCS ≤ the number of tokens the two share, so F1 > τ needs the lengths to be close and
   the two to share more than τ·m/(2−τ) tokens. A prefix filter (index each instruction by its
   rarest tokens, enough of them that any qualifying pair must share one) finds every pair that
   could qualify, and bounds on the shared count discard most of those; only the rest are scored.
3. Tokenising, indexing and filtering are vectorised over whole blocks of texts (numpy), so Python
   runs a few dozen operations per block rather than per text or per token.
The dedupe reads its input once, block by block (`greedy_dedupe_stream`), and keeps only what the
kept texts need to be compared with later ones: a million T0 instructions, most of them near-copies,
in ~7 min and ~650 MB (bench/bench_dedupe_1m.py). Nothing is approximated: the result is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np

from .rouge import f1_from_lcs_array
from .rouge_index import (
    _LEN_BITS,
    _MAX_LEN,
    _SEEN,
    BUCKETS,
    _Block,
    _elements,
    _Postings,
    _ranges,
    _token_keys,
    _TokenTable,
)


@dataclass(frozen=True)
class Dropped:
    index: int  # the dropped text's position in the input
    kept_index: int  # the earlier kept text it is most similar to (among those above the threshold)
    score: float  # their ROUGE-L F1 (above the threshold)


class _GreedyStream:
    """One greedy pass over a stream of texts, in blocks, every step vectorised over a block.

    For text x (m tokens) and an earlier kept text y (n tokens), these exact filters run before
    any LCS is computed, cheapest first:
    1. prefix: x and y must share one of the first `m - min_overlap(m) + 1` elements of x, and of
       the first `n - min_overlap(n) + 1` of y (elements in one fixed order, rarest first), so only
       the postings of the kept texts' prefixes are searched;
    2. length: F1 ≤ 2·min(m, n)/(m + n), so n lies in a window around m (a range of the postings);
    3. position: the LCS is at most the number of shared elements. None comes before the first
       shared element the prefixes reveal, and every one they do not reveal comes after the last
       one they do (in both texts), which bounds the count from the positions of those two;
    4. buckets: elements hashed into a few buckets; the shared count is at most the sum over
       buckets of the smaller of the two texts' counts there.
    The LCS of what remains is computed by rapidfuzz, many pairs per call on every core.

    A block is first joined with every text kept before it; its survivors then go through in small
    groups, each joined with the block's texts kept so far, and then decided pair by pair.

    Memory: only the kept texts stay (their token strings, bucket counts and prefix postings), with
    4 bytes of length per text; the input is read once, block by block. The element order comes
    from the first `sample` texts (read ahead): elements they never hold count as rarest.
    """

    BLOCK = 2048
    GROUP = 64
    BUCKETS = BUCKETS
    SAMPLE = 65536

    def __init__(self, threshold: float, block: int = BLOCK, group: int = GROUP, sample: int = SAMPLE):
        self.tau = threshold
        self.block, self.group, self.sample = block, group, sample
        self.table = _TokenTable()
        self.seen_keys = np.zeros(0, dtype=np.int64)  # the sample's elements, sorted
        self.seen_rank = np.zeros(0, dtype=np.int64)
        self.lengths = np.zeros(1024, dtype=np.int32)  # of every text so far (grows by doubling)
        self.slot = np.full(1024, -1, dtype=np.int32)  # text -> its row among the kept texts' data
        self.kept_strings: list = []
        self.kept_buckets = np.zeros((1024, self.BUCKETS), dtype=np.int32)  # first len(kept_strings) real
        self.kept = _Postings.empty()
        self.current: _Block | None = None
        self._pool: ThreadPoolExecutor | None = None

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="dedupe")
        return self._pool

    # -- per-text numbers, from lengths ---------------------------------------------------------

    def prefix_len(self, m: np.ndarray) -> np.ndarray:
        # Fewest shared tokens any partner of an m-token text needs: the best partner has just the
        # shared tokens (n = L), and 2L/(m+L) > τ <=> L > τm/(2-τ). The epsilon only lowers the
        # bound, so the prefix stays long enough under rounding and the filter stays exact.
        need_any = np.floor(self.tau * m / (2 - self.tau) - 1e-9).astype(np.int64) + 1
        return np.where(m > 0, m - need_any + 1, 0)

    def n_range(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Partner lengths that can reach the threshold: 2n/(m+n) > τ and 2m/(m+n) > τ."""
        lo = np.floor(self.tau * m / (2 - self.tau)).astype(np.int64) + 1
        hi = np.minimum(np.ceil((2 - self.tau) * m / self.tau), _MAX_LEN).astype(np.int64)
        return lo, hi

    # -- reading ----------------------------------------------------------------------------------

    def _tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        keys, ptr = _token_keys(texts, self.table.long_names)
        return self.table.ids_of(keys), ptr

    def learn_order(self, texts: Sequence[str]) -> None:
        """Rank the elements of these texts by how many of them hold each, rarest first."""
        keys, counts = [], []
        for at in range(0, len(texts), 8192):
            tokens, ptr = self._tokens(texts[at : at + 8192])
            k, c = np.unique(_elements(tokens, ptr)[1], return_counts=True)  # one per text each
            keys.append(k)
            counts.append(c)
        if not keys:
            return
        k, c = np.concatenate(keys), np.concatenate(counts)
        order = np.argsort(k, kind="stable")
        k, c = k[order], c[order]
        first = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        self.seen_keys, total = k[first], np.add.reduceat(c, first) if len(k) else c
        rank = np.empty(len(total), dtype=np.int64)
        rank[np.lexsort((self.seen_keys, total))] = np.arange(len(total))
        self.seen_rank = rank

    def _rank(self, element: np.ndarray) -> np.ndarray:
        if not len(self.seen_keys):
            return element
        at = np.minimum(np.searchsorted(self.seen_keys, element), len(self.seen_keys) - 1)
        return np.where(self.seen_keys[at] == element, _SEEN + self.seen_rank[at], element)

    def _open(self, texts: Sequence[str], start: int) -> _Block:
        tokens, ptr = self._tokens(texts)
        doc, element = _elements(tokens, ptr)
        lengths = np.diff(ptr)
        if len(lengths) and lengths.max() > _MAX_LEN:
            raise ValueError(f"a text of over {_MAX_LEN} tokens: too long to dedupe")
        end = start + len(lengths)
        while end > len(self.lengths):
            self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
            self.slot = np.concatenate([self.slot, np.full_like(self.slot, -1)])
        self.lengths[start:end] = lengths
        return _Block(start, tokens, ptr, self._rank(element), doc)

    # -- joins ------------------------------------------------------------------------------------

    def _strings(self, docs: np.ndarray) -> list:
        b = self.current
        assert b is not None
        return [
            b.strings[k - b.start] if k >= b.start else self.kept_strings[self.slot[k]] for k in docs.tolist()
        ]

    def _buckets(self, docs: np.ndarray) -> np.ndarray:
        b = self.current
        assert b is not None
        here = docs >= b.start
        out = np.empty((len(docs), self.BUCKETS), dtype=np.int32)
        out[here] = b.buckets[docs[here] - b.start]
        out[~here] = self.kept_buckets[self.slot[docs[~here]]]
        return out

    def postings(self, docs: np.ndarray) -> _Postings:
        """The prefix postings of these texts of the current block, sorted."""
        b = self.current
        assert b is not None
        local = docs - b.start
        plen = self.prefix_len(self.lengths[docs].astype(np.int64))
        doc = np.repeat(docs, plen)
        where = _ranges(b.ptr[local], plen)
        key = (b.flat[where] << _LEN_BITS) | self.lengths[doc].astype(np.int64)
        order = np.argsort(key, kind="stable")
        pos = (where - np.repeat(b.ptr[local], plen)).astype(np.int32)
        return _Postings(key[order], doc[order].astype(np.int64), pos[order])

    def join(self, queries: np.ndarray, index: _Postings, earlier_only: bool) -> tuple[np.ndarray, ...]:
        """Every (query, indexed text) pair with F1 above the threshold, as (query, text, F1) arrays;
        with `earlier_only`, only pairs whose indexed text comes first. Queries are of the current
        block."""
        b = self.current
        assert b is not None
        lengths = self.lengths
        plen = self.prefix_len(lengths[queries].astype(np.int64))
        local = np.repeat(np.arange(len(queries)), plen)
        starts = b.ptr[queries - b.start]
        where = _ranges(starts, plen)
        qi = where - np.repeat(starts, plen)  # each prefix element's position in its query
        probe = b.flat[where] << _LEN_BITS
        order = np.argsort(probe)  # sorted needles search faster
        probe, local, qi = probe[order], local[order], qi[order]
        n_lo, n_hi = self.n_range(lengths[queries[local]].astype(np.int64))
        lo = np.searchsorted(index.key, probe + n_lo)
        hi = np.searchsorted(index.key, probe + n_hi + 1)
        hit = _ranges(lo, hi - lo)
        d, j = index.doc[hit], index.pos[hit].astype(np.int64)
        local, qi = np.repeat(local, hi - lo), np.repeat(qi, hi - lo)
        # Every shared element bounds the pair's shared count: at most min(qi, j) are before it (in
        # both texts) and min(m - qi, n - j) - 1 after. A hit whose bound is short of what the pair
        # needs proves the pair below the threshold; a pair that can reach it keeps all its hits.
        m = lengths[queries[local]].astype(np.int64)
        n = index.key[hit] & ((1 << _LEN_BITS) - 1)
        need = np.floor(self.tau * (m + n) / 2 - 1e-9).astype(np.int64) + 1
        keep = np.minimum(qi, j) + np.minimum(m - qi, n - j) >= need
        if earlier_only:
            keep &= d < queries[local]
        local, qi, d, j = local[keep], qi[keep], d[keep], j[keep]
        if not len(d):
            return d, d, np.zeros(0)
        # Group the hits by pair, each group in element order. Both texts list elements in one
        # order, so a pair's first and last hits are its first and last shared prefix elements in
        # both texts. One sort of one integer key where it fits in 63 bits, else a lexsort.
        n_texts = b.start + len(b.ptr) - 1  # every text read so far
        w = int(max(qi.max(), j.max())) + 1
        pair = local * n_texts + d
        if len(queries) * n_texts * w * w < 2**62:
            pair, at = np.divmod(np.sort((pair * w + qi) * w + j), w * w)
            qi, j = np.divmod(at, w)
        else:
            order = np.lexsort((j, qi, pair))
            pair, qi, j = pair[order], qi[order], j[order]
        first = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        last = np.r_[first[1:], len(pair)] - 1
        q_local, d = np.divmod(pair[first], n_texts)
        q = queries[q_local]
        m, n = lengths[q].astype(np.int64), lengths[d].astype(np.int64)
        need = np.floor(self.tau * (m + n) / 2 - 1e-9).astype(np.int64) + 1
        ok = 1 + np.minimum(m - qi[first] - 1, n - j[first] - 1) >= need
        ok &= (last - first + 1) + np.minimum(m - qi[last] - 1, n - j[last] - 1) >= need
        q, d, need = q[ok], d[ok], need[ok]
        ok = np.minimum(self._buckets(q), self._buckets(d)).sum(axis=1, dtype=np.int64) >= need
        q, d = q[ok], d[ok]
        lcs = _pair_lcs(self._strings(q), self._strings(d))
        f1 = f1_from_lcs_array(lcs, lengths[q], lengths[d])
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

    def decide(self, texts: Sequence[str], start: int) -> list[Dropped | None]:
        """The next block of the stream (its first text is text `start`): each text's fate."""
        self.current = b = self._open(texts, start)
        best: dict[int, tuple[int, float]] = {}  # dropped text -> (kept text, F1)
        block = np.arange(start, start + len(texts))
        block = block[self.lengths[block] > 0]  # rouge-score scores an empty text 0: always kept
        # Against the texts kept before: the costly join, in halves on two threads (numpy's sorts
        # and searches release the interpreter's lock).
        halves = [block[: len(block) // 2], block[len(block) // 2 :]]
        for found in self.pool().map(lambda half: self._matches(half, self.kept), halves):
            best.update(found)
        survivors = np.array([k for k in block.tolist() if k not in best], dtype=np.int64)
        here = _Postings.empty()
        kept_here: list[int] = []
        for at in range(0, len(survivors), self.group):
            group = survivors[at : at + self.group]
            best.update(self._matches(group, here))
            group = np.array([k for k in group.tolist() if k not in best], dtype=np.int64)
            new = np.array(self._greedy_group(group, best), dtype=np.int64)
            here.merge(self.postings(new))
            kept_here += new.tolist()
        kept = np.array(kept_here, dtype=np.int64)
        self.kept.merge(self.postings(kept))
        rows = np.arange(len(self.kept_strings), len(self.kept_strings) + len(kept))
        while len(rows) and rows[-1] >= len(self.kept_buckets):
            self.kept_buckets = np.concatenate([self.kept_buckets, np.zeros_like(self.kept_buckets)])
        self.slot[kept] = rows
        self.kept_buckets[rows] = b.buckets[kept - start]
        self.kept_strings += [b.strings[k - start] for k in kept_here]
        self.current = None
        return [
            Dropped(k, *best[k]) if k in best else None for k in range(start, start + len(texts))
        ]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def run(
        self, texts: Iterable[str], progress: Callable[[int], None] | None = None
    ) -> Iterator[tuple[int, Dropped | None]]:
        it = iter(texts)
        ahead = list(islice(it, self.sample))
        self.learn_order(ahead)
        start = 0
        try:
            while True:
                if ahead:
                    texts_now, ahead = ahead[: self.block], ahead[self.block :]
                else:
                    texts_now = list(islice(it, self.block))
                if not texts_now:
                    return
                yield from enumerate(self.decide(texts_now, start), start)
                start += len(texts_now)
                if progress:
                    progress(len(texts_now))
        finally:  # also when the caller stops early
            self.close()


class _GreedyDeduper:
    """`greedy_dedupe` on a list, with the block and group sizes given (tests vary them)."""

    def __init__(self, texts: Sequence[str], threshold: float, block: int = _GreedyStream.BLOCK,
                 group: int = _GreedyStream.GROUP, sample: int = _GreedyStream.SAMPLE):  # fmt: skip
        self.texts, self.stream = texts, _GreedyStream(threshold, block, group, sample)

    def run(self, progress: Callable[[int], None] | None = None) -> tuple[list[int], list[Dropped]]:
        kept: list[int] = []
        dropped: list[Dropped] = []
        for k, fate in self.stream.run(self.texts, progress):
            if fate is None:
                kept.append(k)
            else:
                dropped.append(fate)
        return kept, dropped


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


def greedy_dedupe_stream(
    texts: Iterable[str], threshold: float = 0.7, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[int, Dropped | None]]:
    """`greedy_dedupe` over a stream, read once: each text's position and fate, in input order
    (None: kept; else its `Dropped`), yielded block by block. What stays in memory is the kept
    texts' token data, not the input: a caller writes kept and dropped records as they come (a
    dropped one names an earlier kept one by position)."""
    return _GreedyStream(threshold).run(texts, progress)
