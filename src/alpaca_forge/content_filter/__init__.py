"""The content filter, shared by the stages that need it (`serve` runs it on every request,
`eval safety` measures it): rules, then an optional moderation URL, then an optional LLM judge.
See `filter` for how the layers decide and what each costs; one module a concern: `verdict`,
`rules` (the runtime index), `rules_file` (the YAML parser), `moderation`, `judge`,
`stream_check`, `build` (from a stage's settings) and `texts`."""

from .build import FilterSettings, build_filter
from .filter import ContentFilter
from .judge import judge_prompt, parse_judge_reply
from .moderation import parse_moderation
from .rules import WINDOW_CHARS, Category, PatternGroup, Rules, rules_verdict
from .rules_file import DEFAULT_RULES, load_rules
from .stream_check import SETTLE_CHARS, SLOW_EVERY_CHARS, OutputChecker
from .texts import refusal_text, request_text
from .verdict import (
    JUDGE_UNAVAILABLE,
    JUDGE_UNSAFE,
    MODERATION_FLAGGED,
    MODERATION_UNAVAILABLE,
    PASS,
    ROLES,
    Verdict,
)

__all__ = [
    "DEFAULT_RULES",
    "JUDGE_UNAVAILABLE",
    "JUDGE_UNSAFE",
    "MODERATION_FLAGGED",
    "MODERATION_UNAVAILABLE",
    "PASS",
    "ROLES",
    "SETTLE_CHARS",
    "SLOW_EVERY_CHARS",
    "WINDOW_CHARS",
    "Category",
    "ContentFilter",
    "FilterSettings",
    "OutputChecker",
    "PatternGroup",
    "Rules",
    "Verdict",
    "build_filter",
    "judge_prompt",
    "load_rules",
    "parse_judge_reply",
    "parse_moderation",
    "refusal_text",
    "request_text",
    "rules_verdict",
]
