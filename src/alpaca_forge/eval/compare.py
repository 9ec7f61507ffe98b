"""From judgements to a comparison's result: outcomes per item, then every statistic.

Pure: no engine, no files. The LLM judge's judgements and the human raters' (`eval rate`) go
through the same `compare`, so both give the same report.

An item's outcome, from system A's side: with both orders judged, the two verdicts must agree
to count as a win or a loss; verdicts that disagree are a tie (the judge's preference followed
the slot, not the answer). An item with an unreadable verdict in any order is *unjudged*: left
out of every rate and counted in the report, never guessed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..judging.items import Item, System
from ..judging.judge import Judgement
from . import stats

Outcome = Literal["win", "tie", "loss", "unjudged"]
SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


@dataclass(frozen=True)
class ItemOutcome:
    item_id: str
    category: str | None
    outcome: Outcome  # from A's side
    winners: tuple[str | None, ...]  # per order judged: "a", "b", "tie" or None (unreadable)
    slots: tuple[int, ...]  # per order judged: +1 where A was shown first, -1 second
    identical: bool = False  # both answers the same text: a tie, never asked of the judge

    @property
    def both_orders(self) -> bool:
        return len(self.winners) == 2 and None not in self.winners

    @property
    def consistent(self) -> bool:
        return self.both_orders and self.winners[0] == self.winners[1]


@dataclass(frozen=True)
class CategoryResult:
    name: str
    judged: int
    wins: int
    ties: int
    losses: int
    win_rate: float | None
    p_value: float  # the exact sign test in this category alone
    p_holm: float  # ... adjusted for testing every category (Holm)


@dataclass(frozen=True)
class PairwiseResult:
    a: str
    b: str
    judge: str
    items: int  # in the set
    judged: int  # items with a readable outcome
    wins: int
    ties: int
    losses: int
    unjudged: int
    judgements: int  # verdicts asked for (items x orders)
    unreadable: int  # ... of which held no verdict we could read
    win_rate: stats.Estimate  # ties count half; 95% bootstrap interval over items
    sign_test_p: float
    both_orders: int  # items judged in both orders, both readable
    consistent: int  # ... whose two verdicts agreed
    decisive: int  # readable verdicts that were not a tie
    first_slot: int  # ... that chose the answer shown first
    length_controlled: stats.LengthControlled
    detectable_points: float | None
    categories: tuple[CategoryResult, ...]
    mean_chars_a: float
    mean_chars_b: float
    empty_a: int
    empty_b: int
    identical: int  # items whose two answers are the same text: ties, not asked
    outcomes: tuple[ItemOutcome, ...] = field(repr=False)

    @property
    def position_consistency(self) -> float | None:
        return self.consistent / self.both_orders if self.both_orders else None

    @property
    def first_slot_rate(self) -> float | None:
        return self.first_slot / self.decisive if self.decisive else None

    @property
    def disagreements(self) -> list[str]:
        return [o.item_id for o in self.outcomes if o.both_orders and not o.consistent]


def identical(x: str, y: str) -> bool:
    """Two answers the judge need not see: the same text, surrounding whitespace aside."""
    return x.strip() == y.strip()


def item_outcomes(
    items: Sequence[Item], sys_a: System, sys_b: System, judgements: Sequence[Judgement]
) -> list[ItemOutcome]:
    """Every item's outcome from A's side; items neither judged nor identical are left out."""
    a, b = sys_a.name, sys_b.name
    by_item: dict[str, list[Judgement]] = defaultdict(list)
    for j in judgements:
        if {j.first, j.second} == {a, b}:
            by_item[j.item_id].append(j)
    out = []
    for it in items:
        if identical(sys_a.answers[it.id], sys_b.answers[it.id]):
            out.append(ItemOutcome(it.id, it.category, "tie", (), (), identical=True))
            continue
        js = by_item.get(it.id, [])
        if not js:
            continue
        winners = tuple(j.side(a) for j in js)
        slots = tuple(1 if j.first == a else -1 for j in js)
        if None in winners:
            outcome: Outcome = "unjudged"
        elif len(set(winners)) > 1:
            outcome = "tie"
        else:
            outcome = {"a": "win", "b": "loss", "tie": "tie"}[winners[0]]  # type: ignore[index]
        out.append(ItemOutcome(it.id, it.category, outcome, winners, slots))
    return out


def compare(
    items: Sequence[Item],
    sys_a: System,
    sys_b: System,
    judgements: Sequence[Judgement],
    *,
    judge: str,
    samples: int = 2000,
    seed: int = 0,
) -> PairwiseResult:
    a, b = sys_a.name, sys_b.name
    outcomes = item_outcomes(items, sys_a, sys_b, judgements)
    judged = [o for o in outcomes if o.outcome != "unjudged"]
    scores = [SCORE[o.outcome] for o in judged]
    count = {k: sum(o.outcome == k for o in outcomes) for k in ("win", "tie", "loss", "unjudged")}
    pair_js = [j for j in judgements if {j.first, j.second} == {a, b}]
    readable = [j for j in pair_js if j.verdict is not None]
    decisive = [j for j in readable if j.verdict != "tie"]

    # Length control, one row per readable judgement of a judged item.
    length = {it.id: (len(sys_a.answers[it.id]), len(sys_b.answers[it.id])) for it in items}
    index = {o.item_id: k for k, o in enumerate(judged)}
    y, dlen, slot, group = [], [], [], []
    for o in judged:
        la, lb = length[o.item_id]
        for w, s in zip(o.winners, o.slots, strict=True):
            y.append({"a": 1.0, "b": 0.0, "tie": 0.5}[w])  # type: ignore[index]
            dlen.append(float(stats.length_features(np.array([la]), np.array([lb]))[0]))
            slot.append(s)
            group.append(index[o.item_id])
    lc = stats.length_controlled(y, dlen, slot, group, samples=max(200, samples // 4), seed=seed)

    return PairwiseResult(
        a=a,
        b=b,
        judge=judge,
        items=len(items),
        judged=len(judged),
        wins=count["win"],
        ties=count["tie"],
        losses=count["loss"],
        unjudged=count["unjudged"],
        judgements=len(pair_js),
        unreadable=len(pair_js) - len(readable),
        win_rate=stats.bootstrap_mean(scores, samples=samples, seed=seed),
        sign_test_p=stats.sign_test(count["win"], count["loss"]),
        both_orders=sum(o.both_orders for o in outcomes),
        consistent=sum(o.consistent for o in outcomes),
        decisive=len(decisive),
        first_slot=sum(j.verdict == "A" for j in decisive),
        length_controlled=lc,
        detectable_points=stats.detectable_points(len(judged), count["tie"] / len(judged) if judged else 0.0),
        categories=_categories(judged),
        mean_chars_a=float(np.mean([length[it.id][0] for it in items])) if items else 0.0,
        mean_chars_b=float(np.mean([length[it.id][1] for it in items])) if items else 0.0,
        empty_a=sum(1 for it in items if not sys_a.answers[it.id].strip()),
        empty_b=sum(1 for it in items if not sys_b.answers[it.id].strip()),
        identical=sum(o.identical for o in outcomes),
        outcomes=tuple(outcomes),
    )


def _categories(judged: Sequence[ItemOutcome]) -> tuple[CategoryResult, ...]:
    groups: dict[str, list[ItemOutcome]] = defaultdict(list)
    for o in judged:
        if o.category is not None:
            groups[o.category].append(o)
    if len(groups) < 2:
        return ()
    names = sorted(groups)
    rows = []
    for name in names:
        g = groups[name]
        w, t, lo = (sum(o.outcome == k for o in g) for k in ("win", "tie", "loss"))
        rows.append(
            (name, len(g), w, t, lo, stats.win_rate([SCORE[o.outcome] for o in g]), stats.sign_test(w, lo))
        )
    adjusted = stats.holm([r[-1] for r in rows])
    return tuple(CategoryResult(*r, p_holm=p) for r, p in zip(rows, adjusted, strict=True))
