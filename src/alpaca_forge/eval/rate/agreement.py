"""Agreement in `eval rate`: Cohen's kappa between every pair of raters and between each rater
and the LLM judge (read from an `eval pairwise` report through `eval.report`'s typed reader), and
agreement.json / agreement.md."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.errors import UserError
from .. import stats
from ..report import read_pairwise_report
from .comparison import Comparison

LABELS = ("a", "b", "tie")  # a verdict in the systems' terms: A's system won, B's, or a tie
POOLED = "humans (pooled)"  # the pooled raters' row in the agreement tables


@dataclass(frozen=True)
class Kappa:
    """Two raters (or a rater and the judge) on the items both decided."""

    first: str
    second: str
    items: int
    agreement: float | None  # the share of those items they labelled alike
    kappa: float | None  # Cohen's kappa; None with no items, or one label only on one side
    table: dict[str, dict[str, int]]  # first's label -> second's label -> items
    left_out: dict[str, int]  # why items either decided were not counted -> how many


def kappa_between(
    first: str, second: str, x: dict[str, str], y: dict[str, str], left_out: dict[str, int]
) -> Kappa:
    """`x`, `y`: item -> label; counted on the items both have, in `x`'s order."""
    common = [item for item in x if item in y]
    lx, ly = [x[i] for i in common], [y[i] for i in common]
    table = {
        p: {q: sum(1 for u, v in zip(lx, ly, strict=True) if (u, v) == (p, q)) for q in LABELS}
        for p in LABELS
    }
    agreement = sum(u == v for u, v in zip(lx, ly, strict=True)) / len(common) if common else None
    return Kappa(first, second, len(common), agreement, stats.cohen_kappa(lx, ly), table, left_out)


@dataclass(frozen=True)
class JudgeOutcomes:
    path: Path
    judge: str
    labels: dict[str, str]  # item -> "a" | "b" | "tie", in this comparison's terms
    unjudged: set[str]  # items the judge left unjudged (an unreadable verdict)


def read_judge_report(path: str | Path, comparison: Comparison) -> JudgeOutcomes:
    """The LLM judge's outcome per item, from an `eval pairwise` report.json of the same two systems
    (in either order)."""
    fix = "give --judge-report the folder (or report.json) `alpaca-forge eval pairwise` wrote for these two systems"
    report = read_pairwise_report(path, flag="--judge-report", fix=fix)
    a, b = comparison.a.name, comparison.b.name
    if {report.a, report.b} != {a, b}:
        raise UserError(
            f"--judge-report {report.path}: compares {report.a!r} with {report.b!r}, not {a!r} with {b!r}",
            "name the systems as that report does (--a NAME=FILE --b NAME=FILE), or give the report of these two",
        )
    swapped = report.a != a
    outcome_label = {"win": "b" if swapped else "a", "loss": "a" if swapped else "b", "tie": "tie"}
    labels, unjudged = {}, set()
    for row in report.per_item:
        if row.outcome == "unjudged":
            unjudged.add(row.id)
        else:
            labels[row.id] = outcome_label[row.outcome]
    return JudgeOutcomes(report.path, report.judge or "the LLM judge", labels, unjudged)


def judge_kappa(name: str, labels: dict[str, str], judge: JudgeOutcomes) -> Kappa:
    left_out = {
        "unjudged_by_judge": sum(1 for i in labels if i in judge.unjudged),
        "not_in_judge_report": sum(1 for i in labels if i not in judge.unjudged and i not in judge.labels),
    }
    return kappa_between(name, judge.judge, labels, judge.labels, left_out)


def _kappa_data(k: Kappa) -> dict[str, Any]:
    return {
        "between": [k.first, k.second],
        "items": k.items,
        "agreement": k.agreement,
        "kappa": k.kappa,
        "table": k.table,
        "left_out": k.left_out,
    }


def agreement_data(
    comparison: Comparison,
    rated: Mapping[str, int],
    between_raters: Sequence[Kappa],
    with_judge: Sequence[Kappa],
    judge: JudgeOutcomes | None,
) -> dict[str, Any]:
    """agreement.json: `rated` is rater -> items they decided."""
    return {
        "a": comparison.a.name,
        "b": comparison.b.name,
        "labels": {"a": f"{comparison.a.name} better", "b": f"{comparison.b.name} better", "tie": "tie"},
        "items": len(comparison.items),
        "raters": dict(rated),
        "between_raters": [_kappa_data(k) for k in between_raters],
        "judge": None
        if judge is None
        else {
            "report": str(judge.path),
            "name": judge.judge,
            "unjudged_items": len(judge.unjudged),
            "with_raters": [_kappa_data(k) for k in with_judge],
        },
    }


def _num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def agreement_markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# Agreement on {data['a']} vs {data['b']}",
        "",
        f"Cohen's kappa on the items both sides decided, labels in the systems' terms ({data['a']} better, "
        f"{data['b']} better, tie), so the sides each rater saw do not matter. 1 is full agreement, "
        "0 what chance alone gives; n/a with no common item, or one label only on one side.",
        "",
        "Items rated: "
        + ", ".join(f"{name} {n}" for name, n in data["raters"].items())
        + f" (of {data['items']}).",
        "",
        "## Between raters",
        "",
    ]
    if data["between_raters"]:
        lines += ["| raters | items | agreement | kappa |", "| --- | ---: | ---: | ---: |"]
        for k in data["between_raters"]:
            lines.append(
                f"| {k['between'][0]} / {k['between'][1]} | {k['items']} | {_num(k['agreement'])} | {_num(k['kappa'])} |"
            )
    else:
        lines.append("One rater only: nothing to compare.")
    judge = data["judge"]
    if judge is not None:
        lines += [
            "",
            f"## With the LLM judge (`{judge['name']}`)",
            "",
            f"From {judge['report']}; the {judge['unjudged_items']} item(s) it left unjudged are not counted.",
            "",
            "| rater | items | agreement | kappa | left out: unjudged / not in its report |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for k in judge["with_raters"]:
            lo = k["left_out"]
            lines.append(
                f"| {k['between'][0]} | {k['items']} | {_num(k['agreement'])} | {_num(k['kappa'])} | "
                f"{lo['unjudged_by_judge']} / {lo['not_in_judge_report']} |"
            )
    return "\n".join(lines) + "\n"
