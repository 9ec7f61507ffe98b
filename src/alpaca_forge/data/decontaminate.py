"""`data decontaminate`: drop the training records that overlap an evaluation set.

Both sides are read as ROUGE-L reads text (rouge-score's tokens: lower-case runs of a-z and 0-9),
by default the instruction and the input together. A training record is dropped when, with some
evaluation item, it

- shares a run of `ngram` words (13 by default, GPT-3's contamination test; an item shorter than
  that is left to ROUGE-L), or
- has a ROUGE-L F1 above `threshold` (0.7 by default, self-instruct's near-duplicate line), computed
  exactly as rouge-score does.

Both tests are exact, and fast because most pairs are never compared:

- n-grams: every window of `ngram` tokens is hashed (vectorised over the whole corpus); a table of
  the evaluation side's hashes finds the windows that may match, and each of those is then compared
  token by token (a hash collision never drops a record).
- ROUGE-L: F1 > τ needs the two lengths m, n within τ·m/(2-τ) < n < (2-τ)·m/τ and an LCS of more
  than τ(m+n)/2 tokens, so at least `need` shared tokens (counted with repeats). By pigeonhole, a
  training text that shares `need` of an item's m tokens holds one of any m - need + 1 of them: an
  inverted index of the training texts by token gives, for each item, the texts holding one of its
  rarest m - need + 1 tokens, and only those within the length window get an LCS (rapidfuzz,
  on every core). Tokens the evaluation side never uses are all one symbol that matches nothing,
  which leaves every LCS as it is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import UserError
from ..core.files import check_output, user_paths
from ..core.records import Record, write_records
from ..core.rouge import f1_from_lcs_array
from ..judging.items import Item, read_set
from .config import DecontaminateConfig
from .score import Row, read_rows
from .tools import dropped_path_for

# rouge-score lower-cases, then treats every character other than a-z and 0-9 as a separator.
_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789")
_SEPARATE = bytes(c if c in _WORD else 0x20 for c in range(256))
_LONG = np.uint64(2**63)
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)  # a token's first k bytes


@dataclass
class _Tokens:
    """Many texts' tokens: text k's are `key[ptr[k]:ptr[k+1]]`. A token of up to 8 bytes is its
    bytes packed into a uint64 (exact; the top bit is clear); a longer one is a hash of its first
    and last 8 bytes and its length, with the top bit set (checked against the real bytes before
    any decision rests on it)."""

    key: np.ndarray
    ptr: np.ndarray
    blob: bytes
    start: np.ndarray  # each token's byte span in blob
    end: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ptr)

    def text(self, first: int, count: int) -> str:
        """Tokens first .. first+count-1, joined by spaces."""
        return " ".join(self.blob[a:b].decode("ascii") for a, b in zip(
            self.start[first : first + count].tolist(), self.end[first : first + count].tolist(), strict=True
        ))

    def fingerprint(self, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first 8 bytes, last 8 bytes, length) of tokens `at` (long ones): equal for two tokens
        of up to 16 bytes only when they are the same."""
        words = np.ndarray(shape=(len(self.blob) - 7,), dtype="<u8", buffer=self.blob, strides=(1,))
        start, end = self.start[at], self.end[at]
        return words[start], words[end - 8], end - start

    def word(self, at: int) -> bytes:
        return self.blob[int(self.start[at]) : int(self.end[at])]


def tokenize(texts: Sequence[str]) -> _Tokens:
    """rouge-score's tokens of every text, vectorised (no Python per token)."""
    parts = [t.lower().encode("utf-8") for t in texts]
    blob = b" ".join(parts).translate(_SEPARATE) + b" " * 16
    chars = np.frombuffer(blob, dtype=np.uint8) != 0x20
    edges = np.flatnonzero(chars[1:] != chars[:-1]) + 1
    if len(chars) and chars[0]:
        edges = np.r_[0, edges]
    start, end = edges[0::2], edges[1::2]
    text_start = np.cumsum([0] + [len(p) + 1 for p in parts])
    ptr = np.searchsorted(start, text_start)
    size = end - start
    words = np.ndarray(shape=(len(blob) - 7,), dtype="<u8", buffer=blob, strides=(1,))
    key = words[start] & _MASKS[np.minimum(size, 8)]
    long = size > 8
    if long.any():
        last = words[end[long] - 8]
        with np.errstate(over="ignore"):
            mixed = (
                words[start[long]] * np.uint64(0x9E3779B97F4A7C15)
                ^ last * np.uint64(0xC2B2AE3D27D4EB4F)
                ^ size[long].astype(np.uint64) * np.uint64(0x165667B19E3779F9)
            )
        key[long] = mixed | _LONG
    return _Tokens(key, ptr, blob, start, end)


def _window_hashes(tok: _Tokens, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash, first token) of every window of n tokens that lies inside one text."""
    total = len(tok.key)
    if total < n:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    count = total - n + 1
    h = tok.key[:count].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            h *= np.uint64(0x100000001B3)
            h += tok.key[k : k + count]
    # Windows that start in one text and end in the next are left out.
    ends = np.repeat(tok.ptr[1:], tok.lengths)[:count]  # each token's text end
    at = np.flatnonzero(np.arange(count) + n <= ends)
    return h[at], at


_BUCKETS = 64


def _lookup(vocab: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each key's place in the sorted `vocab` (-1: not there): a hash table of 2^20 slots answers
    most keys with one probe; keys in a slot two vocabulary keys share are searched."""
    slots = 1 << 20
    with np.errstate(over="ignore"):
        vslot = (vocab * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(44)
        kslot = (keys * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(44)
    table = np.full(slots, -1, dtype=np.int64)
    table[vslot] = np.arange(len(vocab))
    shared = np.zeros(slots, dtype=bool)
    shared[vslot[np.bincount(vslot.astype(np.int64), minlength=slots)[vslot] > 1]] = True
    found = table[kslot]
    code = np.where((found >= 0) & (vocab[np.maximum(found, 0)] == keys), found, -1)
    clash = np.flatnonzero(shared[kslot])
    if len(clash):
        pos = np.minimum(np.searchsorted(vocab, keys[clash]), len(vocab) - 1)
        code[clash] = np.where(vocab[pos] == keys[clash], pos, -1)
    return code


@dataclass(frozen=True)
class Hit:
    """A training text that overlaps an evaluation item."""

    index: int  # the training text
    against: int  # the evaluation item it overlaps most (the first found, for an n-gram)
    methods: tuple[str, ...]  # "ngram", "rouge_l" or both
    rouge_l: float  # their ROUGE-L F1
    ngram: str | None  # the shared words, for an n-gram hit


def _same_tokens(a: _Tokens, i: int, b: _Tokens, j: int, count: int) -> bool:
    """Whether a's tokens i.. and b's tokens j.. agree for `count` tokens, byte for byte."""
    if not np.array_equal(a.key[i : i + count], b.key[j : j + count]):
        return False
    return all(a.word(i + k) == b.word(j + k) for k in range(count) if a.key[i + k] & _LONG)


def ngram_hits(train: _Tokens, ev: _Tokens, n: int) -> dict[int, tuple[int, int]]:
    """Training text -> (evaluation item, first token of the shared n-gram in the training text),
    for each training text that shares a run of n tokens with an item (the earliest run)."""
    eh, eat = _window_hashes(ev, n)
    if not len(eh):
        return {}
    th, tat = _window_hashes(train, n)
    # A bit table over the hashes' top 24 bits passes few windows that do not match; those are
    # then looked up exactly, and each hash match compared token by token.
    table = np.zeros(1 << 24, dtype=bool)
    table[eh >> np.uint64(40)] = True
    maybe = np.flatnonzero(table[th >> np.uint64(40)])
    maybe = maybe[np.isin(th[maybe], eh)]
    ev_doc = np.searchsorted(ev.ptr, eat, side="right") - 1
    by_hash: dict[int, list[tuple[int, int]]] = {}
    for h, d, p in zip(eh.tolist(), ev_doc.tolist(), eat.tolist(), strict=True):
        by_hash.setdefault(h, []).append((d, p))
    tdoc = np.searchsorted(train.ptr, tat[maybe], side="right") - 1
    found: dict[int, tuple[int, int]] = {}
    for w, d in zip(maybe.tolist(), tdoc.tolist(), strict=True):
        if d in found:
            continue
        p = int(tat[w])
        for item, q in by_hash[int(th[w])]:
            if _same_tokens(train, p, ev, q, n):
                found[d] = (item, p)
                break
    return found


def rouge_hits(train: _Tokens, ev: _Tokens, threshold: float) -> dict[int, tuple[int, float]]:
    """Training text -> (evaluation item, F1) of its best item, for each training text whose
    ROUGE-L F1 with an item is above `threshold` (exact; ties go to the earlier item)."""
    from rapidfuzz import process
    from rapidfuzz.distance import LCSseq

    tau = threshold
    m_all = ev.lengths
    vocab, ev_code = np.unique(ev.key, return_inverse=True)
    if not len(vocab) or not len(train.key):
        return {}
    if len(vocab) + 0x900 >= 0x110000:
        raise UserError("the evaluation set uses too many distinct words for the ROUGE-L check", "split it")
    # Partner lengths that can pass, per item: 2·min(m, n)/(m + n) > τ; and the shared tokens the
    # shortest of them needs, LCS > τ(m + n)/2. Each bound is loosened by one against float
    # rounding: a looser filter only lets more pairs through to the exact F1.
    n_lo = np.maximum(1, np.floor(tau * m_all / (2 - tau)).astype(np.int64))
    n_hi = np.ceil((2 - tau) * m_all / tau).astype(np.int64) + 1
    need = np.maximum(1, np.floor(tau * (m_all + n_lo) / 2).astype(np.int64))
    # Only training texts short enough for some item take part.
    lengths = train.lengths
    docs = np.flatnonzero((lengths >= n_lo.min()) & (lengths <= n_hi.max()))
    n_docs = lengths[docs]
    take = np.repeat((lengths >= n_lo.min()) & (lengths <= n_hi.max()), lengths)
    keys = train.key[take]
    where = np.flatnonzero(take)  # each kept token's place in `train`
    ptr = np.r_[0, np.cumsum(n_docs)]
    code = _lookup(vocab, keys)
    # A long token's key is a hash: its match is confirmed on its bytes (no two tokens merge).
    ev_long = np.flatnonzero(ev.key & _LONG)
    rep = np.zeros(len(vocab), dtype=np.int64)
    rep[ev_code[ev_long]] = ev_long  # one occurrence of each long evaluation token
    tl = np.flatnonzero((code >= 0) & ((keys & _LONG) != 0))
    if len(tl):
        mine, theirs = train.fingerprint(where[tl]), ev.fingerprint(rep[code[tl]])
        same = np.all([a == b for a, b in zip(mine, theirs, strict=True)], axis=0)
        code[tl[~same]] = -1
        for at in tl[same & (mine[2] > 16)].tolist():  # bytes 8-16 from the end and start unseen
            if train.word(int(where[at])) != ev.word(int(rep[code[at]])):
                code[at] = -1
    # Each item's prefix: its tokens (with repeats), rarest in the training texts first; any
    # m - need + 1 of them meet every partner (a repeat stands for its token: a superset, exact).
    rarity = np.bincount(code[code >= 0], minlength=len(vocab))
    prefixes = []
    for j in range(len(m_all)):
        tokens = ev_code[ev.ptr[j] : ev.ptr[j + 1]]
        order = np.lexsort((tokens, rarity[tokens]))
        prefixes.append(np.unique(tokens[order][: max(int(m_all[j] - need[j]) + 1, 0)]))
    # Inverted index of the training texts by the tokens some prefix holds.
    wanted = np.zeros(len(vocab) + 1, dtype=bool)  # the last place answers code -1
    for p in prefixes:
        wanted[p] = True
    sel = np.flatnonzero(wanted[code])
    tok_doc = np.searchsorted(ptr, sel, side="right") - 1
    order = np.argsort(code[sel].astype(np.uint16 if len(vocab) < 2**16 else np.int64), kind="stable")
    post_doc, post_tok = tok_doc[order], code[sel][order]
    bounds = np.searchsorted(post_tok, np.arange(len(vocab) + 1))
    # One code point per token for rapidfuzz: evaluation token t is t + 1 (moved past the
    # surrogates), anything else 0, which no evaluation text holds.
    def text(c: np.ndarray) -> str:
        p = c.astype(np.int64) + 1
        return (p + (p >= 0xD800) * 0x800).astype("<u4").tobytes().decode("utf-32-le")

    # Tokens counted in buckets (token mod 64) per text: the shared tokens of two texts number
    # at most the sum over buckets of the smaller count, a bound checked before any LCS.
    tok_of = np.repeat(np.arange(len(docs)), n_docs)
    hit = code >= 0
    buckets = np.bincount(tok_of[hit] * _BUCKETS + code[hit] % _BUCKETS, minlength=len(docs) * _BUCKETS)
    buckets = buckets.astype(np.uint16 if n_hi.max() < 2**16 else np.int64).reshape(len(docs), _BUCKETS)
    ev_doc = np.repeat(np.arange(len(m_all)), m_all)
    ev_buckets = np.bincount(ev_doc * _BUCKETS + ev_code % _BUCKETS, minlength=len(m_all) * _BUCKETS)
    ev_buckets = ev_buckets.reshape(len(m_all), _BUCKETS)
    seen = np.zeros(len(docs), dtype=bool)
    best: dict[int, tuple[int, float]] = {}
    for j, prefix in enumerate(prefixes):
        m = int(m_all[j])
        if m == 0 or not len(prefix):
            continue
        for t in prefix.tolist():
            seen[post_doc[bounds[t] : bounds[t + 1]]] = True
        cand = np.flatnonzero(seen)
        seen[cand] = False
        n = n_docs[cand]
        cand = cand[(n >= n_lo[j]) & (n <= n_hi[j])]
        room = np.minimum(buckets[cand], ev_buckets[j].astype(buckets.dtype)).sum(axis=1, dtype=np.int64)
        cand = cand[room >= np.floor(tau * (m + n_docs[cand]) / 2)]  # loosened by one, as above
        if not len(cand):
            continue
        query = text(ev_code[ev.ptr[j] : ev.ptr[j + 1]])
        choices = [text(code[a:b]) for a, b in zip(ptr[cand].tolist(), ptr[cand + 1].tolist(), strict=True)]
        workers = -1 if len(cand) > 2000 else 1
        lcs = process.cdist([query], choices, scorer=LCSseq.similarity, dtype=np.int32, workers=workers)[0]
        f1 = f1_from_lcs_array(lcs, m, n_docs[cand])
        above = f1 > tau
        for d, f in zip(docs[cand[above]].tolist(), f1[above].tolist(), strict=True):
            if d not in best or f > best[d][1]:
                best[d] = (j, f)
    return best


def decontaminate(
    texts: Sequence[str], against: Sequence[str], *, ngram: int = 13, threshold: float | None = 0.7
) -> list[Hit]:
    """The training `texts` that overlap any of the `against` texts (see the module's notes), in
    order. `ngram=0` leaves out the n-gram test, `threshold=None` the ROUGE-L test."""
    from rapidfuzz.distance import LCSseq

    train, ev = tokenize(texts), tokenize(against)
    by_ngram = ngram_hits(train, ev, ngram) if ngram > 0 else {}
    by_rouge = rouge_hits(train, ev, threshold) if threshold is not None else {}
    hits = []
    for i in sorted(by_ngram.keys() | by_rouge.keys()):
        methods = tuple(m for m, found in (("ngram", by_ngram), ("rouge_l", by_rouge)) if i in found)
        if i in by_ngram:
            j, at = by_ngram[i]
            words = train.text(at, ngram)
            a, b = train.key[train.ptr[i] : train.ptr[i + 1]], ev.key[ev.ptr[j] : ev.ptr[j + 1]]
            lcs = LCSseq.similarity(a.tolist(), b.tolist())
            f1 = float(f1_from_lcs_array(np.array(lcs), len(a), len(b)))
        else:
            j, f1 = by_rouge[i]
            words = None
        hits.append(Hit(i, j, methods, f1, words))
    return hits


# ---------------------------------------------------------------------------------------------
# The tool


def compared_text(instruction: str, input: str, key: str) -> str:
    return instruction + ("\n" + input if key == "instruction+input" and input.strip() else "")


@dataclass(frozen=True)
class DecontaminateResult:
    records: int
    kept: int
    dropped: int
    by_method: dict[str, int]  # ngram, rouge_l, both: how many dropped records each caught
    against: dict[str, int]  # evaluation file -> its items
    matched_items: int  # evaluation items that some dropped record overlaps
    output: Path
    dropped_path: Path
    elapsed_s: float  # the check itself (tokenising, n-grams, ROUGE-L), not reading or writing


def check_records(
    records: Sequence[Record],
    items: Sequence[Item],
    *,
    ngram: int = 13,
    threshold: float | None = 0.7,
    key: str = "instruction+input",
) -> list[Hit]:
    """The pure step for a pipeline: the hits of `records` against evaluation `items`, one per
    overlapping record, in record order. A conversation is checked turn by turn: each of its user
    turns is compared on its own, and the record goes if any overlaps."""
    texts: list[str] = []
    owner: list[int] = []
    for i, r in enumerate(records):
        turns = [m.content for m in getattr(r, "messages", None) or () if m.role == "user"]
        for text in turns or [compared_text(r.instruction, r.input, key)]:
            texts.append(text)
            owner.append(i)
    hits = decontaminate(
        texts,
        [compared_text(it.instruction, it.input, key) for it in items],
        ngram=ngram,
        threshold=threshold,
    )
    best: dict[int, Hit] = {}
    for h in hits:
        i = owner[h.index]
        mine = Hit(i, h.against, h.methods, h.rouge_l, h.ngram)
        seen = best.get(i)
        if seen is None or (len(mine.methods), mine.rouge_l) > (len(seen.methods), seen.rouge_l):
            best[i] = mine
    return [best[i] for i in sorted(best)]


def dropped_row(hit: Hit, row: Row, item: Item, item_file: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": hit.index,
        "where": row.where,
        "method": "+".join(hit.methods),
        "rouge_l": round(hit.rouge_l, 4),
    }
    if hit.ngram is not None:
        out["ngram"] = hit.ngram
    out["against"] = {"file": item_file, "where": item.where, "id": item.id, "instruction": item.instruction}
    if item.input:
        out["against"]["input"] = item.input
    out["record"] = row.row
    return out


@user_paths()
def run_decontaminate(config: DecontaminateConfig) -> DecontaminateResult:
    output = check_output(config.output, inputs=[config.file, *config.against])
    dropped_path = check_output(
        config.dropped or dropped_path_for(output),
        flag="--dropped" if config.dropped else "--output",
        inputs=[config.file, *config.against],
    )
    if dropped_path.resolve() == output.resolve():
        raise UserError(
            f"--dropped {dropped_path}: is the --output file too; the dropped records would replace the kept ones",
            f"give --dropped another file, or leave it out (then: {dropped_path_for(output)})",
        )
    items: list[Item] = []
    files: list[str] = []
    counts: dict[str, int] = {}
    for path in config.against:
        found = read_set(path, flag="--against")
        counts[path] = len(found)
        items += found
        files += [path] * len(found)
    rows = read_rows(config.file)  # kept as read: scores, lineage and ids go through
    records = [r.record for r in rows]
    start = time.perf_counter()
    hits = check_records(
        records, items, ngram=config.ngram, threshold=config.threshold if config.rouge else None, key=config.key
    )
    elapsed = time.perf_counter() - start
    dropped = {h.index for h in hits}
    write_records(output, (r.row for i, r in enumerate(rows) if i not in dropped))
    write_records(
        dropped_path, (dropped_row(h, rows[h.index], items[h.against], files[h.against]) for h in hits)
    )
    by_method: dict[str, int] = {}
    for h in hits:
        name = "+".join(h.methods)
        by_method[name] = by_method.get(name, 0) + 1
    return DecontaminateResult(
        records=len(records),
        kept=len(records) - len(dropped),
        dropped=len(dropped),
        by_method=by_method,
        against=counts,
        matched_items=len({h.against for h in hits}),
        output=output,
        dropped_path=dropped_path,
        elapsed_s=elapsed,
    )
