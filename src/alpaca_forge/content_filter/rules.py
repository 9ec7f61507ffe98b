"""The rules at run time: categories of compiled patterns, and the index of their triggers that
lets a search skip the patterns whose trigger words are not in the text. Layer 1 of the filter,
always on: well under a millisecond on a 4,000-character prompt, and ~10-100 µs a streamed
piece, because a stream is searched over a trailing window (`Rules.search(since=...)`).
Reading a rules file into `Rules` is `rules_file`'s job."""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .verdict import PASS, Verdict

# A streamed answer is searched over a trailing window on each piece, not from its start: any
# match of at most WINDOW_CHARS characters that ends in the new text is still found, and a piece
# does not cost a search of the whole answer so far (a quadratic total). Patterns with triggers
# need less: only triggers up to TRIGGER_AFTER_CHARS before the new text can be in a new match.
WINDOW_CHARS = 1000

# A section's patterns run only near one of its triggers: from this many characters before it
# to this many after (the shipped patterns end with their trigger, or shortly after it).
TRIGGER_BEFORE_CHARS = 200
TRIGGER_AFTER_CHARS = 100
# Bytes that end a word when looking for triggers: every ASCII byte but a-z and 0-9 (the text is
# casefolded first); UTF-8 bytes of other letters stay inside words.
_SEPARATORS = bytes(b if (97 <= b <= 122 or 48 <= b <= 57 or b >= 128) else 32 for b in range(256))
_WORD_TRIGGER = re.compile(r"[a-z0-9]+")
MAX_KEY_CHARS = 4  # a trigger is a candidate when a word of the text begins with its first 4 letters


@dataclass(frozen=True)
class PatternGroup:
    """The patterns one rules file gives a category, with that section's triggers (casefolded):
    text of which every match contains one, at the start of a word. No triggers: the patterns run
    on all the text."""

    patterns: tuple[re.Pattern[str], ...]
    triggers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Category:
    name: str
    description: str  # one line; the judge reads it as the policy
    groups: tuple[PatternGroup, ...]

    @property
    def patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(p for g in self.groups for p in g.patterns)


@dataclass(frozen=True)
class Rules:
    categories: tuple[Category, ...] = ()
    _index: _TriggerIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        groups = [g for c in self.categories for g in c.groups]
        object.__setattr__(self, "_index", _TriggerIndex(groups))  # built once: frozen otherwise

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    def search(self, text: str, since: int = 0, settled: int | None = None) -> tuple[str, ...]:
        """The categories with a pattern matching in `text`. A stream passes `since`: the text up
        to there was searched before, so only a match that ends after it is new; the triggers
        that could be part of one are those at most TRIGGER_AFTER_CHARS before it (patterns
        without triggers search the last WINDOW_CHARS). With `settled`, only matches that end
        by that index count."""
        near = self._index.spans(text, max(0, since - TRIGGER_AFTER_CHARS - self._index.longest))
        everywhere = ((max(0, since - WINDOW_CHARS), len(text)),)
        hits, k = [], 0
        for c in self.categories:
            hit = False
            for g in c.groups:
                spans = near.get(k, ()) if g.triggers else everywhere
                hit = hit or any(_matches(g.patterns, text, lo, hi, settled) for lo, hi in spans)
                k += 1
            if hit:
                hits.append(c.name)
        return tuple(hits)


class _TriggerIndex:
    """Where each group's triggers are in a text. Python's `re` costs ~60 ns a position for a
    pattern that starts with \\b, and one `str.find` per trigger (~150 of them) ~1 ms on 4,000
    characters. Instead the text is split into words in a few C calls and cut to their first 2, 3
    and 4 letters; a trigger is a candidate when its own first letters are among them (a set
    intersection), and only candidates are then located with `str.find`, to place the windows."""

    def __init__(self, groups: Sequence[PatternGroup]):
        # (group, trigger, must start a word) by how many first letters are compared, and which
        self.buckets: dict[int, dict[bytes, list[tuple[int, str, bool]]]] = {}
        self.always: list[tuple[int, str, bool]] = []  # phrases without a word of 2 letters ("c-4")
        for k, g in enumerate(groups):
            for t in g.triggers:
                one_word = bool(_WORD_TRIGGER.fullmatch(t))
                # A phrase is found through its longest word ("take over" -> "take").
                key = t if one_word else max(_WORD_TRIGGER.findall(t), key=len, default="")
                if len(key) < 2:
                    self.always.append((k, t, False))
                    continue
                n = min(len(key), MAX_KEY_CHARS)
                self.buckets.setdefault(n, {}).setdefault(key[:n].encode(), []).append((k, t, one_word))
        self.cuts = {n: operator.itemgetter(slice(0, n)) for n in range(2, MAX_KEY_CHARS + 1)}
        self.longest = max((len(t) for g in groups for t in g.triggers), default=0)

    def spans(self, text: str, start: int) -> dict[int, list[tuple[int, int]]]:
        """group index -> merged (lo, hi) windows of `text` around its triggers found from
        `start` on (a window may begin before `start`)."""
        if not self.buckets and not self.always:
            return {}
        tail = text[start:]
        folded = tail.lower() if tail.isascii() else tail.casefold()  # the same on ASCII, 10x faster
        # casefold may lengthen the text ("ß" -> "ss"): a place in `folded` is at most `shift`
        # characters after the same place in `text`, so windows start that much earlier.
        shift = len(folded) - len(tail)
        words = folded.encode("utf-8", "surrogatepass").translate(_SEPARATORS).split()
        todo = list(self.always)
        heads: Any = words
        for n in range(MAX_KEY_CHARS, 1, -1):  # 4 letters from the words, 3 from those, ...: smaller sets
            heads = set(map(self.cuts[n], heads))
            for prefix in self.buckets.get(n, {}).keys() & heads:
                todo += self.buckets[n][prefix]
        found: dict[int, list[tuple[int, int]]] = {}
        for k, t, word_start in todo:
            i = folded.find(t)
            while i >= 0:
                if not word_start or i == 0 or not (folded[i - 1] < "\x80" and folded[i - 1].isalnum()):
                    lo = max(0, start + i - shift - TRIGGER_BEFORE_CHARS)
                    found.setdefault(k, []).append(
                        (lo, min(len(text), start + i + len(t) + TRIGGER_AFTER_CHARS))
                    )
                i = folded.find(t, i + 1)
        return {k: _merge(spans) for k, spans in found.items()}


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans.sort()
    merged = [spans[0]]
    for lo, hi in spans[1:]:
        if lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _matches(patterns: tuple[re.Pattern[str], ...], text: str, lo: int, hi: int, settled: int | None) -> bool:
    for p in patterns:
        m = p.search(text, lo, hi)
        if m and (settled is None or m.end() <= settled):
            return True
    return False


def rules_verdict(categories: tuple[str, ...]) -> Verdict:
    return Verdict(True, categories, "rules", dict.fromkeys(categories, 1.0)) if categories else PASS
