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
    parse_verdict,
    side_of,
)

__all__ = [
    "Item",
    "Judgement",
    "JudgementCache",
    "Task",
    "Verdict",
    "judge_all",
    "judge_identity",
    "judge_name",
    "parse_verdict",
    "read_set",
    "side_of",
    "text_key",
]
