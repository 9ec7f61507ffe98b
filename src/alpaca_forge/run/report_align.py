"""The report's "Learning from preferences" section: the pairs `prefer` made (how many were kept,
why the others were dropped, how much the verdicts agreed, what the judge cost), the `align`
training (its method and settings, reward margins and preference accuracy, the curves), and the
aligned model against the fine-tuned one it started from, by the same judge in both orders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .report_html import fmt, pairwise_table, pct, png, stage_figures, table
from .state import RunState

if TYPE_CHECKING:
    from ..eval.report import PairwiseReport


def alignment(state: RunState, aligned: PairwiseReport | None) -> str:
    p, a = stage_figures(state, "prefer"), stage_figures(state, "align")
    if not p and not a:
        return '<p class="muted">no prefer or align stage in this recipe</p>'
    parts = []
    if p:
        parts.append("<h3>Preference pairs (prefer)</h3>" + _pairs(p["summary"], p["pairs"]))
    if a:
        parts.append("<h3>Training on them (align)</h3>" + _training(a["summary"]))
    e = stage_figures(state, "eval").get("aligned")
    if e and aligned is not None:
        parts.append(
            "<h3>Aligned against fine-tuned, by the same judge</h3>"
            + pairwise_table(aligned, e.get("files", []))
        )
    elif a:
        parts.append('<p class="muted">the aligned model is not judged yet (no eval stage has run)</p>')
    return "".join(parts)


def _pairs(s: dict[str, Any], kept: int) -> str:
    dropped = s.get("dropped") or {}
    cost = s.get("judge_cost") or {}
    rows = [
        ("judge", s.get("judge")),
        (
            "instructions / answers sampled per instruction",
            f"{fmt(s.get('items'))} / {fmt(s.get('samples'))}",
        ),
        (
            "judgements asked / from the cache",
            f"{fmt(s.get('judgements_asked'))} / {fmt(s.get('judgements_cached'))}",
        ),
        ("pairs kept", kept),
        ("pairs dropped", ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) or "none"),
        ("label flips (simulated annotator noise)", s.get("flips")),
        ("mean agreement of a kept pair's verdicts", pct(s.get("mean_agreement"))),
        ("unreadable verdicts", s.get("unreadable_verdicts")),
        (
            "judge tokens, prompt / completion",
            f"{fmt(cost.get('prompt_tokens'))} / {fmt(cost.get('completion_tokens'))}",
        ),
    ]
    return table(rows)


def _training(s: dict[str, Any]) -> str:
    config = s.get("config") or {}
    m = s.get("metrics") or {}
    settings = s.get("method_settings") or {}
    rows = [
        ("method", f"{s.get('method') or config.get('method')} ({config.get('tune') or 'lora'} weights)"),
        ("its settings", ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"),
        ("optimiser steps", s.get("steps")),
        ("first / last training loss", f"{fmt(s.get('first_loss'))} / {fmt(s.get('last_loss'))}"),
        ("reward margin, training / held-out", _two(m, "rewards/margins")),
        ("preference accuracy, training / held-out", _two(m, "rewards/accuracies", percent=True)),
        ("wall time, s", s.get("wall_time_s")),
    ]
    if m.get("pair_accuracy") is not None:
        rows.append(("held-out pair accuracy (reward model)", pct(m["pair_accuracy"])))
    return table(rows) + png(Path(s["loss_plot"]) if s.get("loss_plot") else None)


def _two(m: dict[str, Any], name: str, *, percent: bool = False) -> str:
    show = pct if percent else fmt
    return f"{show(m.get(name))} / {show(m.get('eval_' + name))}"
