"""The texts a stage exchanges with the filter: the text of a chat request it reads
(`request_text`), and the answer given instead of a blocked one (`refusal_text`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..core.prompts import Message
from .verdict import Verdict


def request_text(messages: Sequence[Message | Mapping[str, Any]], *, last_user_only: bool = False) -> str:
    """The text of a chat request the filter should read: every message the model will read,
    as `role: text`, a blank line apart. Not just the last user message: an API client sends the
    whole history and may write earlier turns itself (a made-up assistant turn included), so a
    request hidden in turn 1 would reach the model unchecked. `last_user_only=True` for an
    engine that answers the last user message alone (`engine.multi_turn` is False)."""
    turns = [_role_text(m) for m in messages]
    if last_user_only:
        turns = [t for t in turns if t[0] == "user"][-1:]
    return "\n\n".join(f"{role}: {text}" for role, text in turns if text.strip())


def _role_text(m: Message | Mapping[str, Any]) -> tuple[str, str]:
    if isinstance(m, Message):
        return m.role, m.text
    content = m.get("content") or ""
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(m.get("role", "user")), str(content)


def refusal_text(cfg_refusal: str, verdict: Verdict) -> str:
    """The answer given instead of a blocked one: "Sorry, I can't help with that. (content
    filter: weapons)"."""
    if not verdict.flagged:
        return cfg_refusal
    return f"{cfg_refusal} (content filter: {', '.join(verdict.categories) or verdict.source or 'unsafe'})"
