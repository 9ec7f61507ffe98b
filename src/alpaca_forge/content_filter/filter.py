"""The content filter, on what comes in (prompts) and what goes out (answers): `serve` runs it on
every request, `eval safety` measures what it blocks. It sits below the stages (it imports only
core and engines) so that both can use it. Three layers, checked in order; the first that flags
a text decides:

1. rules (`rules`, read from YAML by `rules_file`): categories of regular expressions
   (`default_rules.yaml`, extended or replaced by `--filter-rules FILE`). Well under a
   millisecond on a 4,000-character prompt; always on.
2. an external moderation service (`moderation`: `--moderation-url`, the OpenAI
   `/v1/moderations` shape).
3. an LLM judge (`judge`: `--judge-model`): any `Engine`, asked with a prompt that lists the
   categories.

Layers 2 and 3 fail closed: when the service is down, slow, answers non-200 or garbage, or the
judge's reply cannot be read, the text is flagged ("moderation_unavailable", "judge_unavailable")
and a warning is logged. A filter that lets text through whenever its checker is unreachable
stops nothing the day it is needed.

This module puts the layers in order (`ContentFilter`); `stream_check` checks a streamed answer,
`build` makes the filter from a stage's flags, and `texts` holds what a stage reads and answers:

    f = build_filter(cfg.content_filter, judge)      # None with --no-filter
    verdict = f.check(prompt, role="user")           # every layer
    checker = f.output_checker()                     # an answer, piece by piece as it streams
    for piece in stream:
        if (v := checker.push(piece)) is not None: ...   # blocked
    v = checker.end()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .judge import Judge
from .moderation import ModerationClient
from .rules import Rules, rules_verdict
from .stream_check import SLOW_EVERY_CHARS, OutputChecker
from .verdict import (
    JUDGE_UNAVAILABLE,
    JUDGE_UNSAFE,
    MODERATION_FLAGGED,
    MODERATION_UNAVAILABLE,
    PASS,
    ROLES,
    Verdict,
)

if TYPE_CHECKING:
    from ..engines import Engine


class ContentFilter:
    """Rules, then the moderation URL (if given), then the judge (if given); the first layer that
    flags a text decides. The moderation URL and the judge fail closed: when they cannot answer
    (down, timeout, non-200, garbage, an unreadable reply) the text is flagged as
    "moderation_unavailable" / "judge_unavailable", and a warning is logged.

    Thread-safe as far as its parts are: the rules and the HTTP client are; the judge engine is
    called from whichever thread calls `check`. `close()` closes the HTTP client; the judge stays
    open (it is the caller's)."""

    def __init__(
        self,
        rules: Rules,
        *,
        moderation_url: str | None = None,
        moderation_model: str | None = None,
        moderation_api_key: str | None = None,
        judge: Engine | None = None,
        timeout_s: float = 30.0,
    ):
        self.rules = rules
        self._moderation = (
            ModerationClient(
                moderation_url, model=moderation_model, api_key=moderation_api_key, timeout_s=timeout_s
            )
            if moderation_url
            else None
        )
        policy = [(c.name, c.description) for c in rules.categories]
        self._judge = Judge(judge, policy) if judge is not None else None
        names = list(rules.names)
        if moderation_url:
            names += [MODERATION_UNAVAILABLE, MODERATION_FLAGGED]
        if judge is not None:
            names += [JUDGE_UNSAFE, JUDGE_UNAVAILABLE]
        # Every category any layer can name (the moderation service may name more of its own).
        self.categories: list[str] = list(dict.fromkeys(names))

    @property
    def has_slow_layers(self) -> bool:
        return self._moderation is not None or self._judge is not None

    def check(self, text: str, *, role: str = "user", context: str = "") -> Verdict:
        """Every layer, in order. `role`: whose text it is ("user": a prompt, "assistant": an
        answer); `context`: for an answer, the prompt it replies to (the judge reads it)."""
        verdict = self.check_rules(text)
        if verdict.flagged:
            return verdict
        return self.check_slow(text, role=role, context=context)

    def check_rules(self, text: str) -> Verdict:
        """The rules alone: no I/O, well under a millisecond for a 4,000-character prompt."""
        return rules_verdict(self.rules.search(text))

    def check_slow(self, text: str, *, role: str = "user", context: str = "") -> Verdict:
        """The moderation URL, then the judge (each if configured); not the rules. A text with
        nothing but whitespace is not sent. A pass keeps the service's scores."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if not text.strip():
            return PASS
        scores: dict[str, float] = {}
        if self._moderation is not None:
            verdict = self._moderation.check(text)
            if verdict.flagged:
                return verdict
            scores = verdict.scores
        if self._judge is not None:
            verdict = self._judge.check(text, role, context)
            if verdict.flagged:
                return verdict
        return Verdict(False, scores=scores)

    def output_checker(
        self, *, slow_every_chars: int = SLOW_EVERY_CHARS, context: str = "", settle_chars: int = 0
    ) -> OutputChecker:
        """A checker for one streamed answer; `context`: the prompt it answers (for the judge)."""
        return OutputChecker(
            self, slow_every_chars=slow_every_chars, context=context, settle_chars=settle_chars
        )

    def moderations(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """OpenAI `/v1/moderations` `results` entries, one per text, from every layer: flagged,
        categories (a bool for every category: ours, and any the moderation service named) and
        category_scores (1.0 for a hit, the service's score where it gave one, else 0.0)."""
        out = []
        for text in texts:
            v = self.check(text, role="user")
            names = list(dict.fromkeys([*self.categories, *v.categories, *v.scores]))
            out.append(
                {
                    "flagged": v.flagged,
                    "categories": {c: c in v.categories for c in names},
                    "category_scores": {c: float(v.scores.get(c, 0.0)) for c in names},
                }
            )
        return out

    def close(self) -> None:
        if self._moderation is not None:
            self._moderation.close()
