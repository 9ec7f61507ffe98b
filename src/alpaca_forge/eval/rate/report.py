"""The report of `eval rate`: the ratings so far become judgements (`human:NAME`), compared as the
LLM judge's are: one `eval pairwise` report per rater in OUTPUT/raters/NAME/, one for all raters
pooled in OUTPUT/, and the agreement files beside it."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...core.errors import UserError
from ...core.files import check_output, write_json_atomic, write_text_atomic
from ...judging.judge import side_of
from ..compare import PairwiseResult, compare
from ..report import write_pairwise_report
from .agreement import (
    POOLED,
    JudgeOutcomes,
    Kappa,
    agreement_data,
    agreement_markdown,
    judge_kappa,
    kappa_between,
    read_judge_report,
)
from .comparison import Comparison, load_comparison
from .config import RateConfig
from .ratings import RATINGS_FILE, Rating, RatingStore


class NoRatings(UserError):
    pass


@dataclass(frozen=True)
class RateReport:
    output: Path
    pooled: PairwiseResult  # every rater's ratings as judgements of one comparison
    raters: dict[str, PairwiseResult]  # one comparison per rater
    between_raters: tuple[Kappa, ...]  # every pair of raters
    with_judge: tuple[Kappa, ...]  # each rater, then the pooled outcome, against the LLM judge
    judge_report: Path | None
    ratings: int  # ratings counted
    left_out: int  # ratings in the file of items or systems not in this comparison
    files: list[Path]


def write_rate_report(config: RateConfig) -> RateReport:
    """The report of the ratings in OUTPUT/ratings.jsonl so far (a server on OUTPUT must be stopped)."""
    comparison = load_comparison(config)
    judge = read_judge_report(config.judge_report, comparison) if config.judge_report else None
    output = check_output(config.output, flag="--output", folder=True)
    path = output / RATINGS_FILE
    if not path.exists():
        raise NoRatings(
            f"--output {output}: holds no {RATINGS_FILE}: nobody has rated anything there yet",
            "run `alpaca-forge eval rate` without --report-only and rate first (or check --output)",
        )
    with RatingStore(path) as store:  # locks it: a running server is refused, not raced
        ratings = store.ratings()
    return rate_report(
        comparison, ratings, output, judge=judge, seed=config.seed, samples=config.bootstrap_samples
    )


def rate_report(
    comparison: Comparison,
    ratings: Sequence[Rating],
    output: Path,
    *,
    judge: JudgeOutcomes | None = None,
    seed: int = 0,
    samples: int = 2000,
) -> RateReport:
    items, a, b = comparison.items, comparison.a, comparison.b
    in_set = {it.id for it in items}
    counted = [r for r in ratings if r.item in in_set and {r.first, r.second} == {a.name, b.name}]
    left_out = len(ratings) - len(counted)
    if not counted:
        raise NoRatings(
            f"{output / RATINGS_FILE}: no rating of these two systems on this set yet"
            + (f" ({left_out} of other items or systems)" if left_out else ""),
            "rate some items first (run `alpaca-forge eval rate` without --report-only)",
        )
    by_rater: dict[str, list[Rating]] = {}
    for r in counted:
        by_rater.setdefault(r.rater, []).append(r)
    names = sorted(by_rater)
    blind = (
        "Rated blind in `alpaca-forge eval rate`: people saw the instruction and the two answers as "
        "Response A and B without the systems' names; which system was A was seeded per rater, half "
        "of each rater's items each way."
    )

    def notes(rated: int) -> list[str]:
        out = [blind]
        if rated < len(items):
            out.append(
                f"{len(items) - rated} of the set's {len(items)} items are not rated yet: they are in no figure."
            )
        if left_out:
            out.append(
                f"{left_out} rating(s) in {RATINGS_FILE} are of other items or systems and are left out."
            )
        return out

    def judged(js: Sequence[Rating], judge_name: str) -> PairwiseResult:
        return compare(items, a, b, [r.judgement() for r in js], judge=judge_name, samples=samples, seed=seed)

    files: list[Path] = []
    per_rater = {}
    for name in names:
        result = per_rater[name] = judged(by_rater[name], f"human:{name}")
        files += write_pairwise_report(
            result,
            output / "raters" / name,
            title=f"{a.name} vs {b.name}: blind ratings by {name}",
            notes=notes(len({r.item for r in by_rater[name]})),
        )
    pooled = judged(counted, f"humans ({len(names)} rater{'s' if len(names) != 1 else ''})")
    pooled_notes = notes(len({r.item for r in counted}))
    if len(names) > 1:
        pooled_notes.append(
            f"Pooled over {len(names)} raters ({', '.join(names)}): each rating is one judgement, and an item "
            "the raters decided differently counts as a tie. 'Position consistency' here is the share of "
            "the items rated by exactly two raters on which they agreed."
        )
    files += write_pairwise_report(
        pooled, output, title=f"{a.name} vs {b.name}: blind ratings by people", notes=pooled_notes
    )

    labels = {
        n: {r.item: side_of(r.verdict, shown_first=r.first == a.name) for r in by_rater[n]} for n in names
    }
    between = tuple(
        kappa_between(x, y, labels[x], labels[y], {}) for x, y in itertools.combinations(names, 2)
    )
    with_judge: tuple[Kappa, ...] = ()
    if judge is not None:
        outcome_label = {"win": "a", "loss": "b", "tie": "tie"}
        pooled_labels = {
            o.item_id: outcome_label[o.outcome] for o in pooled.outcomes if o.outcome in outcome_label
        }
        with_judge = tuple(judge_kappa(n, labels[n], judge) for n in names)
        if len(names) > 1:
            with_judge += (judge_kappa(POOLED, pooled_labels, judge),)
    report = RateReport(
        output,
        pooled,
        per_rater,
        between,
        with_judge,
        judge.path if judge else None,
        len(counted),
        left_out,
        files,
    )
    rated = {name: r.judged for name, r in per_rater.items()}
    data = agreement_data(comparison, rated, between, with_judge, judge)
    files += [
        write_json_atomic(output / "agreement.json", data),
        write_text_atomic(output / "agreement.md", agreement_markdown(data)),
    ]
    return report
