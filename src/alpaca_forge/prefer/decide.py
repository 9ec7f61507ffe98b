"""From verdicts to pairs: which answer of two won, by how much agreement, and which pairs to keep.

A verdict is read from one answer's side ("x" won, "y" won, "tie", None: unreadable). A pair of
answers is decided when its winner is named by at least `min_agreement` of its verdicts (both
orders, every annotator; 1 = all of them); otherwise it is dropped as a tie (no answer named more
often than the other, ties among its verdicts), order-inconsistent (each answer named by some
verdict, as a judge that always says "A" does), or unreadable.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..judging.judge import Verdict
from .answers import derived_seed

DROPS = ("tie", "inconsistent", "unreadable")
FLIPPED: dict[Verdict | None, Verdict | None] = {"A": "B", "B": "A", "tie": "tie", None: None}


@dataclass(frozen=True)
class Vote:
    """One verdict on a pair (x, y) of answers, as the pair's row records it."""

    x_first: bool  # x was shown as Response A
    verdict: Verdict | None  # in slots, after any flip
    flipped: bool
    source: dict[str, Any] = field(default_factory=dict)  # {"prompt": id} or {"rater": name}

    @property
    def side(self) -> str | None:
        """ "x", "y", "tie" or None (unreadable)."""
        if self.verdict is None or self.verdict == "tie":
            return self.verdict
        return "x" if (self.verdict == "A") == self.x_first else "y"


@dataclass(frozen=True)
class Decision:
    x: int  # answer indices (of the item's answers), or 0/1 for two systems
    y: int
    votes: tuple[Vote, ...]
    winner: int | None  # x or y, None when dropped
    agreement: float  # share of the votes naming the winner (of the majority side when dropped)
    dropped: str | None  # one of DROPS, None when decided

    @property
    def loser(self) -> int | None:
        return None if self.winner is None else (self.y if self.winner == self.x else self.x)


def flip(verdict: Verdict | None, rate: float, seed: int, *key: Any) -> tuple[Verdict | None, bool]:
    """`verdict` flipped A<->B with probability `rate`, by a draw seeded from `key` alone (so the
    same verdict flips the same way on every run, whatever else was judged)."""
    if rate <= 0 or verdict not in ("A", "B"):
        return verdict, False
    if random.Random(derived_seed(seed, "flip", *key)).random() < rate:
        return FLIPPED[verdict], True
    return verdict, False


def decide(x: int, y: int, votes: Sequence[Vote], min_agreement: float) -> Decision:
    sides = Counter(v.side for v in votes)
    total = len(votes)
    wins_x, wins_y = sides["x"], sides["y"]
    top = max(wins_x, wins_y)
    agreement = top / total if total else 0.0
    if wins_x != wins_y and agreement >= min_agreement - 1e-9:
        return Decision(x, y, tuple(votes), x if wins_x > wins_y else y, agreement, None)
    if wins_x and wins_y:
        why = "inconsistent"
    elif sides["tie"] or not total:
        why = "tie"
    else:
        why = "unreadable"
    return Decision(x, y, tuple(votes), None, agreement, why)


def keep_pairs(decisions: Sequence[Decision], how: str) -> list[Decision]:
    """The decided pairs to write for one item: all of them, or (best-worst) the one between the
    answer with the most wins and the one with the fewest among the decided pairs, the widest
    gap in wins first, then the higher agreement, then the earlier answers."""
    decided = [d for d in decisions if d.winner is not None]
    if how == "all" or len(decided) <= 1:
        return decided
    wins: Counter = Counter(d.winner for d in decided)
    return [
        max(
            decided,
            key=lambda d: (wins[d.winner] - wins[d.loser], d.agreement, -min(d.x, d.y), -max(d.x, d.y)),
        )
    ]


def vote_rows(decision: Decision) -> list[dict[str, Any]]:
    """The votes as the pair's `verdicts`, from the chosen answer's side: which was shown first,
    the verdict in slots (after any flip), whether it was flipped, and who gave it."""
    chosen = decision.winner
    return [
        {
            "order": "chosen-first" if v.x_first == (chosen == decision.x) else "rejected-first",
            **v.source,
            "verdict": v.verdict,
            "flipped": v.flipped,
        }
        for v in decision.votes
    ]
