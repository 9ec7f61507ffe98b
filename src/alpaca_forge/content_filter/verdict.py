"""What every layer of the filter answers: a `Verdict`, and the names of the categories a layer
gives when it flags a text without naming one of the rules' categories."""

from __future__ import annotations

from dataclasses import dataclass, field

MODERATION_UNAVAILABLE = "moderation_unavailable"  # fail closed: the moderation service failed
JUDGE_UNAVAILABLE = "judge_unavailable"  # fail closed: the judge failed or its reply was unreadable
JUDGE_UNSAFE = "unsafe"  # the judge said unsafe but named no category we know
MODERATION_FLAGGED = "moderation"  # the service flagged the text but named no category

ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    categories: tuple[str, ...] = ()
    source: str = ""  # "rules" | "moderation_url" | "judge" | "" when not flagged
    scores: dict[str, float] = field(default_factory=dict)  # per category, 1.0 for a rule hit


PASS = Verdict(False)


def unavailable(source: str, category: str) -> Verdict:
    """The verdict of a slow layer that could not answer: flagged (fail closed)."""
    return Verdict(True, (category,), source, {category: 1.0})
