"""The filter on a streamed answer, piece by piece as it arrives (`OutputChecker`): the rules on
every piece over a trailing window, the slow layers every so many characters, and the whole
answer once more at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .rules import rules_verdict
from .verdict import Verdict

if TYPE_CHECKING:
    from .filter import ContentFilter

# Mid-stream, a match may be made to count only once this much text follows it (settle_chars):
# the word may still grow ("a bomb" -> "a bombastic"), and a look-ahead ("bomb", not "bomb
# shelter") must see what comes next. Off by default: then the piece that completes a match is
# blocked before it is handed on, at the price of reading such an edge too early.
SETTLE_CHARS = 24
SLOW_EVERY_CHARS = 400  # mid-stream, the moderation URL and the judge run once per this much new text


class OutputChecker:
    """Streamed output is checked as it goes: `push(piece)` returns a Verdict when the text so
    far is flagged, else None; once flagged, every later call returns that same Verdict.

    Rules run on every piece, over a trailing window: a match that ends in the new text is looked
    for, which a pattern split across pieces is. Triggers are looked for from TRIGGER_AFTER_CHARS
    (100) before the new text (no match reaches further past its trigger), and their patterns run
    from TRIGGER_BEFORE_CHARS (200) before each; patterns without triggers search the last
    WINDOW_CHARS (1,000) characters. So a piece costs ~10-100 µs, not a search of the whole answer
    so far.

    By default a match counts as soon as it is in the text, so the piece that completes it is
    blocked before it is handed on; but the end of the text so far is read as an end: "build a
    bomb" is blocked before " shelter" arrives. `settle_chars=SETTLE_CHARS` (24) waits for that
    many characters after a match, so a word still growing ("bomb" -> "bombastic") or a
    look-ahead ("bomb shelter") is read right; a hit is then reported up to that late, and a
    caller that must not hand on any of it holds back the text after `checked_chars`.
    The slow layers (moderation URL, judge) read the whole answer so far each time
    `slow_every_chars` new characters have arrived, and once more in `end()` if any are new;
    each such check blocks `push` for up to the filter's timeout. `end()` also searches the whole
    answer with the rules, which catches a match longer than the window."""

    def __init__(
        self,
        content_filter: ContentFilter,
        *,
        slow_every_chars: int = SLOW_EVERY_CHARS,
        context: str = "",
        settle_chars: int = 0,
    ):
        self.filter = content_filter
        self.settle_chars = settle_chars
        self.slow_every_chars = slow_every_chars
        self.context = context
        self.text = ""
        self.verdict: Verdict | None = None
        self._rules_upto = 0  # every match ending at or before this index has been looked for
        self._slow_upto = 0  # the slow layers last read text[:this]

    @property
    def checked_chars(self) -> int:
        """How far into the text the rules have looked (the rest waits for `settle_chars` more)."""
        return self._rules_upto

    def push(self, piece: str) -> Verdict | None:
        if self.verdict is not None:
            return self.verdict
        self.text += piece
        settled = len(self.text) - self.settle_chars
        if settled > self._rules_upto:
            hits = self.filter.rules.search(self.text, self._rules_upto, settled)
            self._rules_upto = settled
            if hits:
                self.verdict = rules_verdict(hits)
                return self.verdict
        if self.filter.has_slow_layers and len(self.text) - self._slow_upto >= self.slow_every_chars:
            self._slow_upto = len(self.text)
            self.verdict = self._slow()
        return self.verdict

    def end(self) -> Verdict | None:
        if self.verdict is not None:
            return self.verdict
        verdict = self.filter.check_rules(self.text)
        self._rules_upto = len(self.text)
        if not verdict.flagged and self.filter.has_slow_layers and len(self.text) > self._slow_upto:
            self._slow_upto = len(self.text)
            self.verdict = self._slow()
            return self.verdict
        self.verdict = verdict if verdict.flagged else None
        return self.verdict

    def _slow(self) -> Verdict | None:
        v = self.filter.check_slow(self.text, role="assistant", context=self.context)
        return v if v.flagged else None
