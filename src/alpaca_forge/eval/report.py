"""A comparison's report: report.json (every figure, per item too), report.md (the tables a
person reads) and PNG charts (matplotlib; skipped, saying so, where it is not installed)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import UserError
from ..core.files import write_json_atomic, write_text_atomic
from . import stats
from .compare import PairwiseResult

log = logging.getLogger("alpaca_forge")

REPORT_VERSION = 1
REPORT_FILE = "report.json"  # in a comparison's folder; read back by `read_pairwise_report`


def percent(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def interval(e: stats.Estimate) -> str:
    if e.value is None:
        return "n/a"
    return f"{percent(e.value)} [{percent(e.low)}, {percent(e.high)}]"


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def pairwise_data(r: PairwiseResult, *, title: str, notes: Sequence[str] = ()) -> dict[str, Any]:
    lc = r.length_controlled
    return {
        "report_version": REPORT_VERSION,
        "title": title,
        "a": r.a,
        "b": r.b,
        "judge": r.judge,
        "items": r.items,
        "judged": r.judged,
        "wins": r.wins,
        "ties": r.ties,
        "losses": r.losses,
        "unjudged": r.unjudged,
        "judgements": r.judgements,
        "unreadable_verdicts": r.unreadable,
        "win_rate": dataclasses.asdict(r.win_rate),
        "sign_test_p": r.sign_test_p,
        "position_consistency": r.position_consistency,
        "items_in_both_orders": r.both_orders,
        "consistent_items": r.consistent,
        "first_slot_rate": r.first_slot_rate,
        "decisive_verdicts": r.decisive,
        "length_controlled_win_rate": dataclasses.asdict(lc.win_rate),
        "length_coef": lc.length_coef,
        "slot_coef": lc.slot_coef,
        "detectable_points": r.detectable_points,
        "mean_chars": {"a": r.mean_chars_a, "b": r.mean_chars_b},
        "empty_answers": {"a": r.empty_a, "b": r.empty_b},
        "identical_answers": r.identical,
        "length_control_note": lc.note,
        "categories": [dataclasses.asdict(c) for c in r.categories],
        "disagreements": r.disagreements,
        "notes": list(notes),
        "per_item": [
            {
                "id": o.item_id,
                "category": o.category,
                "outcome": o.outcome,
                "winners": list(o.winners),
                "slots": list(o.slots),
            }
            for o in r.outcomes
        ],
    }


def power_line(r: PairwiseResult) -> str:
    ties = f" ({r.ties} of them ties)" if r.ties else ""
    if r.detectable_points is None:
        return f"With {r.judged} items judged{ties}, too few were decided for any difference to be told apart from a tie."
    return (
        f"With {r.judged} items{ties}, a win rate within {r.detectable_points:.1f} points of 50% cannot be told "
        "apart from a tie (exact sign test at 5%, 80% power)."
    )


def pairwise_markdown(r: PairwiseResult, *, title: str, notes: Sequence[str] = ()) -> str:
    lc = r.length_controlled
    lines = [
        f"# {title}",
        "",
        f"**{r.a}** (A) against **{r.b}** (B), judged by `{r.judge}` on {r.items} items.",
        "",
        "| | |",
        "| --- | --- |",
        f"| wins / ties / losses (A) | {r.wins} / {r.ties} / {r.losses} |",
        f"| unjudged items (an unreadable verdict) | {r.unjudged} |",
        f"| win rate of A (ties ½), 95% CI over items | {interval(r.win_rate)} |",
        f"| exact sign test (ties dropped) | p = {_p(r.sign_test_p)} |",
        f"| length-controlled win rate, 95% CI | {interval(lc.win_rate)} |",
        f"| position consistency (both orders agree) | {percent(r.position_consistency)} of {r.both_orders} items |",
        f"| first-slot preference (decisive verdicts for Response A) | {percent(r.first_slot_rate)} of {r.decisive} |",
        f"| unreadable verdicts | {r.unreadable} of {r.judgements} |",
        f"| mean answer length, characters (A / B) | {r.mean_chars_a:.0f} / {r.mean_chars_b:.0f} |",
        f"| empty answers (A / B) | {r.empty_a} / {r.empty_b} |",
        f"| items with the same answer on both sides (ties, not asked) | {r.identical} |",
        "",
        power_line(r),
    ]
    if lc.note:
        lines += ["", f"No length-controlled win rate: {lc.note}."]
    if lc.length_coef is not None:
        lines += [
            "",
            f"Length model: log-odds {lc.length_coef:+.2f} per unit of log length ratio"
            + (f", {lc.slot_coef:+.2f} for being shown first" if lc.slot_coef is not None else "")
            + " (positive: the judge prefers longer answers / the first slot).",
        ]
    if r.categories:
        significant = [c for c in r.categories if c.p_holm < 0.05]
        lines += [
            "",
            f"## By category ({len(r.categories)}; p adjusted by Holm over all of them)",
            "",
            f"{len(significant)} categor{'y differs' if len(significant) == 1 else 'ies differ'} from a tie after the adjustment.",
            "",
            "| category | items | W / T / L | win rate | p | p (Holm) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in sorted(r.categories, key=lambda c: (c.p_holm, c.name)):
            lines.append(
                f"| {c.name} | {c.judged} | {c.wins} / {c.ties} / {c.losses} | {percent(c.win_rate, 0)} | {_p(c.p_value)} | {_p(c.p_holm)} |"
            )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_pairwise_report(
    r: PairwiseResult, folder: str | Path, *, title: str, notes: Sequence[str] = ()
) -> list[Path]:
    """report.json, report.md and the charts in `folder`; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        write_json_atomic(folder / REPORT_FILE, pairwise_data(r, title=title, notes=notes)),
        write_text_atomic(folder / "report.md", pairwise_markdown(r, title=title, notes=notes)),
    ]
    written += _pairwise_charts(r, folder, title)
    return written


# ---------------------------------------------------------------------------------------------
# Reading report.json back: beside `pairwise_data`, the one place that knows its keys

REPORT_OUTCOMES = ("win", "loss", "tie", "unjudged")  # an item's outcome, from A's side


@dataclass(frozen=True)
class ReportedItem:
    id: str
    outcome: str  # one of REPORT_OUTCOMES, from A's side


@dataclass(frozen=True)
class PairwiseReport:
    """An `eval pairwise` report.json, read back: the two systems, the judge, each item's outcome,
    and the headline figures (each None where the report does not hold it)."""

    path: Path  # the report.json read
    a: str | None  # system A's name; None where the report does not say
    b: str | None
    judge: str | None
    per_item: tuple[ReportedItem, ...]
    items: int | None = None  # in the set
    judged: int | None = None  # items with a verdict
    wins: int | None = None  # of A
    ties: int | None = None
    losses: int | None = None
    judgements: int | None = None  # verdicts asked of the judge, both orders
    unreadable_verdicts: int | None = None
    win_rate: stats.Estimate = field(default_factory=lambda: stats.Estimate(None))  # A's, ties ½, 95% CI
    sign_test_p: float | None = None
    position_consistency: float | None = None  # share of items whose two orders agree
    identical_answers: int | None = None  # ties never asked
    empty_answers: tuple[int, int] | None = None  # (A, B)
    mean_chars: tuple[float, float] | None = None  # mean answer length in characters, (A, B)
    notes: tuple[str, ...] = ()


def read_pairwise_report(path: str | Path, *, flag: str, fix: str) -> PairwiseReport:
    """The report.json at `path`, or in the folder `path`. What cannot be read, or is not a
    pairwise report, is a UserError naming `flag`, the file and what is wrong, with `fix`."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / REPORT_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{flag} {p}: cannot be read ({e.strerror or e})", fix) from e
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} {p}:{e.lineno}: not JSON ({e.msg})", fix) from e
    rows = data.get("per_item") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{flag} {p}: not a pairwise report (no per-item outcomes)", fix)
    items = []
    for row in rows:
        item, outcome = str(row.get("id")), row.get("outcome")
        if outcome not in REPORT_OUTCOMES:
            raise UserError(f"{flag} {p}: item {item!r} has the outcome {outcome!r}", fix)
        items.append(ReportedItem(item, outcome))
    a, b, judge = (data.get(k) if isinstance(data.get(k), str) else None for k in ("a", "b", "judge"))
    counts = ("items", "judged", "wins", "ties", "losses", "judgements", "unreadable_verdicts")
    rate = data.get("win_rate") if isinstance(data.get("win_rate"), dict) else {}
    notes = data.get("notes") if isinstance(data.get("notes"), list) else []
    return PairwiseReport(
        p,
        a,
        b,
        judge,
        tuple(items),
        **{k: _count(data.get(k)) for k in (*counts, "identical_answers")},
        win_rate=stats.Estimate(*(_number(rate.get(k)) for k in ("value", "low", "high"))),
        sign_test_p=_number(data.get("sign_test_p")),
        position_consistency=_number(data.get("position_consistency")),
        empty_answers=_sides(data.get("empty_answers"), _count),
        mean_chars=_sides(data.get("mean_chars"), _number),
        notes=tuple(str(n) for n in notes),
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sides(value: Any, read: Any) -> tuple[Any, Any] | None:
    """An {"a": .., "b": ..} figure as (A, B); None unless both sides are there."""
    if not isinstance(value, dict):
        return None
    a, b = read(value.get("a")), read(value.get("b"))
    return None if a is None or b is None else (a, b)


# ---------------------------------------------------------------------------------------------
# Charts


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no charts (pip install 'alpaca-forge[plot]')")
        return None
    return plt


def _pairwise_charts(r: PairwiseResult, folder: Path, title: str) -> list[Path]:
    plt = _pyplot()
    if plt is None or not r.judged:
        return []
    out = []
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.2), height_ratios=[1, 1.4])
    left = 0.0
    for n, label, colour in (
        (r.wins, f"{r.a} wins", "#2e7d32"),
        (r.ties, "tie", "#9e9e9e"),
        (r.losses, f"{r.b} wins", "#c62828"),
    ):
        top.barh([0], [n / r.judged], left=left, color=colour, label=f"{label} ({n})")
        left += n / r.judged
    top.set_xlim(0, 1)
    top.set_yticks([])
    top.axvline(0.5, color="black", lw=0.8, ls=":")
    top.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, fontsize=8, frameon=False)
    top.set_title(title, fontsize=10)
    lc = r.length_controlled.win_rate
    rows = [("win rate", r.win_rate), ("length-controlled" + (" (n/a)" if lc.value is None else ""), lc)]
    for k, (_label, e) in enumerate(rows):
        if e.value is not None:
            bottom.errorbar(
                [e.value],
                [k],
                xerr=[[e.value - e.low], [e.high - e.value]],
                fmt="o",
                capsize=4,
                color="#1565c0",
            )
    bottom.set_yticks(range(len(rows)), [label for label, _ in rows])
    bottom.set_ylim(-0.6, len(rows) - 0.4)
    bottom.axvline(0.5, color="black", lw=0.8, ls=":")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel(f"share of items {r.a} wins (ties ½), 95% interval")
    fig.tight_layout()
    path = folder / "winrate.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    out.append(path)
    if r.categories:
        cats = sorted(r.categories, key=lambda c: (c.win_rate or 0, c.name))
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.18 * len(cats) + 1)))
        colours = [
            "#c62828"
            if c.p_holm < 0.05 and (c.win_rate or 0) < 0.5
            else "#2e7d32"
            if c.p_holm < 0.05
            else "#90a4ae"
            for c in cats
        ]
        ax.barh(range(len(cats)), [c.win_rate or 0 for c in cats], color=colours)
        ax.set_yticks(range(len(cats)), [f"{c.name} ({c.judged})" for c in cats], fontsize=6)
        ax.axvline(0.5, color="black", lw=0.8, ls=":")
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"{r.a}'s win rate per category (coloured: differs from a tie after Holm)")
        fig.tight_layout()
        path = folder / "categories.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    return out


# ---------------------------------------------------------------------------------------------
# The leaderboard


def leaderboard_markdown(board: Any) -> str:
    lines = [
        f"# Leaderboard on {board.items} items, judged by `{board.judge}`",
        "",
        "Bradley–Terry strengths from every pair compared (ties half a win to each side), with 95% "
        f"intervals from {board.samples} bootstrap resamples of the items; "
        + (f"the win probability is against **{board.reference}**." if board.reference else "."),
        "",
        "| rank | system | strength | 95% CI | win prob. vs reference | rank 95% CI |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for k, row in enumerate(board.rows, start=1):
        lines.append(
            f"| {k} | {row.name} | {row.strength:+.2f} | [{row.low:+.2f}, {row.high:+.2f}] | "
            f"{percent(row.win_probability)} | {row.rank_low}–{row.rank_high} |"
        )
    if board.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in board.notes]
    lines += [
        "",
        "## Pairs",
        "",
        "| A | B | W / T / L | win rate of A | sign test p | consistency |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for p in board.pairs:
        lines.append(
            f"| {p.a} | {p.b} | {p.wins} / {p.ties} / {p.losses} | {interval(p.win_rate)} | {_p(p.sign_test_p)} | {percent(p.position_consistency)} |"
        )
    return "\n".join(lines) + "\n"


def leaderboard_chart(board: Any, folder: Path) -> list[Path]:
    plt = _pyplot()
    if plt is None:
        return []
    rows = list(reversed(board.rows))
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    x = np.array([r.strength for r in rows])
    ax.errorbar(
        x,
        range(len(rows)),
        xerr=[x - [r.low for r in rows], [r.high for r in rows] - x],
        fmt="o",
        capsize=4,
        color="#1565c0",
    )
    ax.set_yticks(range(len(rows)), [r.name for r in rows])
    ax.axvline(0, color="black", lw=0.8, ls=":")
    ax.set_xlabel("Bradley–Terry log-strength (mean 0), 95% bootstrap interval")
    ax.set_title(f"{board.items} items, judge: {board.judge}", fontsize=9)
    fig.tight_layout()
    path = folder / "leaderboard.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
