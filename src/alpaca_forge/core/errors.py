"""Errors a user can fix. The CLI prints them as a message and a fix, never as a traceback."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# How many problems are printed one by one before the rest are summarised by kind.
MAX_PROBLEMS_SHOWN = 200


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input, located as precisely as we can."""

    where: str  # "data.jsonl:12" or "data.json[41] (line 380)"
    message: str  # what is wrong, e.g. "field 'instruction' is empty"
    fix: str  # one line that says what to do about it

    def __str__(self) -> str:
        return f"{self.where}: {self.message}\n  fix: {self.fix}"


class UserError(Exception):
    """A mistake in the user's input or set-up: bad file, unknown model, missing weights."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"


class ValidationError(UserError):
    """Every problem found in one input, reported together so the user can fix them in one pass."""

    def __init__(self, problems: list[Problem], what: str = "input"):
        self.problems = problems
        count = len(problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the {what}")

    def __str__(self) -> str:
        lines = [str(p) for p in self.problems[:MAX_PROBLEMS_SHOWN]]
        rest = self.problems[MAX_PROBLEMS_SHOWN:]
        if rest:
            kinds = Counter(p.message for p in rest).most_common(5)
            summary = "; ".join(f"{n}× {msg}" for msg, n in kinds)
            lines.append(f"... and {len(rest)} more ({summary})")
        lines.append(self.message)
        return "\n".join(lines)
