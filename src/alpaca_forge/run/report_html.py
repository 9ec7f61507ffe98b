"""The run report's HTML pieces: escaping, inlined charts, tables and numbers as the report
writes them, and a stage's figures from the run state. Shared by every section of the report."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .state import RunState

if TYPE_CHECKING:
    from ..eval.report import PairwiseReport


def esc(value: Any) -> str:
    return html.escape(str(value))


def png(path: Path | None) -> str:
    if path is None or not Path(path).is_file():
        return '<p class="muted">(no chart: matplotlib not installed, or the stage did not draw one)</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{esc(Path(path).name)}" src="data:image/png;base64,{data}">'


def table(rows: Iterable[Sequence[Any]], head: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        cells = []
        for cell in row:
            is_num = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            cells.append(
                f'<td class="num">{fmt(cell)}</td>'
                if is_num
                else f"<td>{cell if is_html(cell) else esc(fmt(cell))}</td>"
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


class Html(str):
    """Text already escaped."""


def is_html(value: Any) -> bool:
    return isinstance(value, Html)


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{esc(title)}</h2>{body}</section>'


def stage_figures(state: RunState, stage: str) -> dict[str, Any]:
    rec = state.stages.get(stage)
    return rec.figures if rec else {}


def pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def pairwise_table(r: PairwiseReport, files: Sequence[str]) -> str:
    """An eval report's headline figures, its notes and its win-rate chart."""
    wr, pc = r.win_rate, r.position_consistency
    rows = [
        ("system A", r.a),
        ("system B", r.b),
        ("judge", r.judge),
        ("items judged / in the set", f"{r.judged} / {r.items}"),
        ("A wins / ties / B wins", f"{r.wins} / {r.ties} / {r.losses}"),
        ("A's win rate (ties ½), 95% bootstrap", f"{pct(wr.value)} [{pct(wr.low)}, {pct(wr.high)}]"),
        ("sign test p", r.sign_test_p),
        ("position consistency (both orders agree)", pct(pc) if pc is not None else "—"),
        ("unreadable verdicts", f"{r.unreadable_verdicts} of {r.judgements}"),
        ("identical answers (ties, not asked)", r.identical_answers),
        ("empty answers, A / B", "{} / {}".format(*(r.empty_answers or ("—", "—")))),
        (
            "mean answer length in characters, A / B",
            "{:.0f} / {:.0f}".format(*r.mean_chars) if r.mean_chars else "—",
        ),
    ]
    chart = next((Path(f) for f in files if f.endswith("winrate.png")), None)
    notes = "".join(f"<li>{esc(n)}</li>" for n in r.notes)
    return table(rows) + (f"<ul>{notes}</ul>" if notes else "") + png(chart)
