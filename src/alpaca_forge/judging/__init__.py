"""judging: what `eval` and `prefer` share to compare answers: the pairwise LLM judge and its cache, the items judged."""

from .items import Item, read_set, text_key
from .judge import (
    Judgement,
    JudgementCache,
    Task,
    Verdict,
    judge_all,
    judge_identity,
    judge_name,
    open_judge,
    parse_verdict,
    side_of,
)
from .rules import RuleJudge, rule_name

__all__ = [
    "Item",
    "Judgement",
    "JudgementCache",
    "RuleJudge",
    "Task",
    "Verdict",
    "judge_all",
    "judge_identity",
    "judge_name",
    "open_judge",
    "parse_verdict",
    "read_set",
    "rule_name",
    "side_of",
    "text_key",
]
