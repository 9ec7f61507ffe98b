"""One self-contained HTML report of a run, `RUN/report.html`: no external assets (charts are
inlined PNGs, the style is inline, no script), so it opens offline and can be mailed as one file.

Sections, in the order the data flowed: the run (stages, times), data, preflight, training,
evaluation, samples before and after fine-tuning side by side, export, cost (forecast vs actual)
and provenance.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.files import write_text_atomic
from ..core.hardware import flops_per_token_factor
from .forecast import Forecast
from .recipe import Recipe
from .report_align import alignment
from .report_html import Html, esc, fmt, pairwise_table, pct, png, section, stage_figures, table
from .state import RunState
from .wiring import run_file

if TYPE_CHECKING:
    from ..eval.report import PairwiseReport

REPORT_FILE = "report.html"
SECTIONS = (
    "run",
    "data",
    "preflight",
    "training",
    "evaluation",
    "samples",
    "alignment",
    "export",
    "cost",
    "provenance",
)
SAMPLES_SHOWN = 12

STYLE = """
body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:0 0 12px;border-bottom:1px solid #dde1e7;padding-bottom:6px}
section{background:#fff;border:1px solid #e3e6eb;border-radius:8px;padding:18px 22px;margin:18px 0}
table{border-collapse:collapse;margin:8px 0;font-size:14px}td,th{border-bottom:1px solid #eceff3;padding:4px 12px 4px 0;text-align:left;vertical-align:top}
th{color:#58607a;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eceff3;border-radius:4px}
.muted{color:#6b7386}.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}
pre{white-space:pre-wrap;background:#f3f4f7;border-radius:6px;padding:10px;font-size:13px}
.masked{color:#8a91a5;background:#eceef3}.trained{color:#0b5a2a;background:#e6f4ea}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}.pair div{background:#f7f8fa;border-radius:6px;padding:8px 10px;white-space:pre-wrap;font-size:14px}
.tag{display:inline-block;font-size:12px;border-radius:10px;padding:0 8px;background:#eef0f4;margin-left:6px}
nav a{margin-right:12px;color:#2a55c9;text-decoration:none}
"""


# ---------------------------------------------------------------------------------------------


def _run(recipe: Recipe, state: RunState) -> str:
    rows = []
    for name in recipe.stages:
        rec = state.stages.get(name)
        rows.append((name, rec.status if rec else "not run", rec.wall_s if rec else None))
    total = sum(r[2] or 0 for r in rows)
    rows.append((Html("<b>all stages</b>"), "", round(total, 1)))
    return (
        f"<p>{esc(recipe.top.description)}</p>"
        f'<p class="muted">recipe {esc(recipe.path)} · run directory {esc(recipe.run_dir)}</p>'
        + table(rows, ("stage", "status", "wall time, s"))
    )


def _data(state: RunState) -> str:
    d = stage_figures(state, "data")
    if not d:
        return '<p class="muted">no data stage in this recipe</p>'
    g = stage_figures(state, "generate")
    quality = d.get("quality", {})
    rows = [
        ("records from the teacher", d.get("from_teacher_in")),
        ("records from the seed tasks", d.get("from_seeds_in")),
        ("removed by cleaning (" + ", ".join(d.get("clean_checks", [])) + ")", d.get("cleaned_out")),
        ("removed as near duplicates (ROUGE-L)", d.get("deduped_out")),
        *_decontamination_row(d),
        *_score_rows(d),
        (Html("<b>training records</b>"), d.get("records")),
        ("… of which from the teacher", d.get("from_teacher")),
        ("… of which seed tasks", d.get("from_seeds")),
    ]
    parts = [table(rows)]
    if g:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(g.get("dropped", {}).items())) or "none"
        parts.append(
            f"<p>The teacher ({esc(g.get('teacher'))}) accepted {esc(g.get('accepted'))} of the {esc(g.get('target'))} "
            f"records asked for, from {esc(g.get('requests'))} requests ({esc(g.get('accepted_per_request'))} per request); "
            f"stopped: {esc(g.get('stop_reason'))}. Candidates dropped: {esc(dropped)}.</p>"
        )
    if quality:
        parts.append("<h3>Quality checks on the records before cleaning</h3>")
        parts.append(table(quality.items(), ("check", "records flagged")))
    stats = d.get("stats") or {}
    if stats:
        flat = [(k, v) for k, v in stats.items() if isinstance(v, (int, float, str))]
        if flat:
            parts.append(table(flat, ("statistic", "value")))
    parts.append(png(Path(d["lengths_plot"]) if d.get("lengths_plot") else None))
    score = d.get("score") or {}
    if score.get("plot"):
        parts.append(f"<h3>The judge's ratings ({esc(score.get('judge'))})</h3>")
        parts.append(png(Path(score["plot"])))
    return "".join(parts)


def _decontamination_row(d: dict[str, Any]) -> list[tuple[Any, Any]]:
    """What the check against the recipe's own evaluation set found (or that it did not run)."""
    found = d.get("decontamination")
    if not found:
        return [("checked against the evaluation set", "no (decontaminate off, or no infer stage)")]
    methods = ", ".join(f"{k} {v}" for k, v in sorted((found.get("by_method") or {}).items())) or "none"
    sets = ", ".join(Path(f).name for f in found.get("against", {}))
    return [
        (
            f"removed as overlapping the evaluation set ({sets}; {methods}; "
            f"{found.get('matched_items', 0)} evaluation items matched; listed in {Path(found.get('dropped_file', '')).name})",
            found.get("dropped"),
        )
    ]


def _score_rows(d: dict[str, Any]) -> list[tuple[Any, Any]]:
    score = d.get("score")
    if not score:
        return []
    return [
        (
            f"rated by the judge {score.get('judge')} (mean overall {score.get('mean_overall')}, "
            f"{score.get('unreadable', 0)} unreadable)",
            score.get("rated"),
        ),
        (f"removed as rated below {score.get('min_score')}", score.get("scored_out")),
    ]


_MASK = re.compile(r"⟦(.*?)⟧", re.DOTALL)


def _example(text: str) -> str:
    """⟦masked⟧ prompt spans and the trained answer, told apart by colour."""
    head, _, body = text.partition("\n")
    out, last = [], 0
    for m in _MASK.finditer(body):
        if m.start() > last:
            out.append(f'<span class="trained">{esc(body[last : m.start()])}</span>')
        out.append(f'<span class="masked">{esc(m.group(1))}</span>')
        last = m.end()
    if last < len(body):
        out.append(f'<span class="trained">{esc(body[last:])}</span>')
    return f'<p class="muted">{esc(head)}</p><pre>{"".join(out)}</pre>'


def _preflight(state: RunState) -> str:
    pre = stage_figures(state, "train").get("preflight")
    if not pre:
        return '<p class="muted">no train stage in this recipe</p>'
    verdict = '<span class="ok">passed</span>' if pre["ok"] else '<span class="bad">failed</span>'
    head = (
        f"<p>EOS check {verdict}: the EOS token {esc(pre['eos_token'])} carries loss in {pre['eos_trained']} of "
        f"{pre['examples']} examples after batching ({pre['format']} format, {pre['tokens']:,} tokens, "
        f"{pre['trained_tokens']:,} trained). Grey: the prompt, masked (no loss); green: the answer the model learns, "
        "ending in EOS.</p>"
    )
    return head + "".join(_example(t) for t in pre["shown"])


def _training(recipe: Recipe, state: RunState, forecast: Forecast) -> str:
    t = stage_figures(state, "train")
    if not t:
        return '<p class="muted">no train stage in this recipe</p>'
    s = t["summary"]
    config = recipe.stages["train"]
    tps = s.get("steady_tokens_per_s") or s.get("tokens_per_s")
    rows = [
        ("method", config.method),
        ("base model", config.model),
        ("optimiser steps", s.get("steps")),
        ("first / last training loss", f"{fmt(s.get('first_loss'))} / {fmt(s.get('last_loss'))}"),
        ("validation loss", s.get("last_eval_loss")),
        (
            "tokens seen / trained on",
            f"{fmt(s.get('tokens_seen_this_run'))} / {fmt(s.get('trained_tokens_this_run'))}",
        ),
        ("padding share", s.get("padding_share")),
        ("steady throughput, tokens/s", tps),
        ("wall time, s", s.get("wall_time_s")),
        ("processes", t.get("processes")),
    ]
    if s.get("mfu") is not None:  # train measures it on a CUDA device it knows the peak of
        rows.append(("MFU", f"{s['mfu']:.1%} ({s['mfu_basis']})"))
    elif tps and forecast.train:  # all processes' tokens/s already
        achieved = flops_per_token_factor(config.weights) * forecast.train.parameters * tps
        rows.append(("achieved FLOP/s (train reports MFU on CUDA)", f"{achieved:.3g}"))
    return table(rows) + png(Path(s["loss_plot"]) if s.get("loss_plot") else None)


def _eval_report(recipe: Recipe, output: str = "report") -> PairwiseReport | None:
    """The eval stage's report.json (or its `aligned report`), read through eval's typed reader;
    None before it exists."""
    from ..eval.report import read_pairwise_report

    path = run_file(recipe.run_dir, "eval", output)
    if not path.is_file():
        return None
    return read_pairwise_report(
        path, flag=f"the eval stage's {output}", fix="run the recipe with --from eval"
    )


def _evaluation(state: RunState, r: PairwiseReport | None) -> str:
    e = stage_figures(state, "eval")
    if not e:
        return '<p class="muted">no eval stage in this recipe</p>'
    if r is None:
        return '<p class="muted">the eval stage\'s report.json is gone: run the recipe with --from eval</p>'
    return pairwise_table(r, e.get("files", []))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _samples(recipe: Recipe, state: RunState, report: PairwiseReport | None) -> str:
    before = _read_jsonl(run_file(recipe.run_dir, "infer", "base answers"))
    after = {
        (r["instruction"], r.get("input", "")): r
        for r in _read_jsonl(run_file(recipe.run_dir, "infer", "tuned answers"))
    }
    if not before:
        return '<p class="muted">no infer stage in this recipe</p>'
    outcomes = {o.id: o.outcome for o in report.per_item} if report is not None else {}
    parts = [
        "<p>The same instructions, answered by the base model (left) and the fine-tuned one (right), "
        "greedy, in the prompt format of the training.</p>"
    ]
    for i, b in enumerate(before[:SAMPLES_SHOWN]):
        a = after.get((b["instruction"], b.get("input", "")), {})
        inp = f"<br><span class='muted'>{esc(b['input'])}</span>" if b.get("input") else ""
        outcome = outcomes.get(str(b.get("id")))  # the reader holds every id as text
        tag = f'<span class="tag">judge: {esc(outcome)}</span>' if outcome else ""
        parts.append(
            f"<h3>{i + 1}. {esc(b['instruction'])}{tag}</h3>{inp}"
            f'<div class="pair"><div><b>before</b>\n{_answer(b)}</div><div><b>after</b>\n{_answer(a)}</div></div>'
        )
    return "".join(parts)


def _answer(row: dict[str, Any]) -> str:
    if not row:
        return '<span class="muted">(no answer in the file)</span>'
    text = row.get("output", "")
    return (
        esc(text)
        if text.strip()
        else '<span class="muted">(empty: the model ended its answer at once)</span>'
    )


def _export(state: RunState) -> str:
    x = stage_figures(state, "export")
    if not x:
        return '<p class="muted">no export stage in this recipe</p>'
    g = x["gguf"]
    p = g.get("parity") or {}
    speed = x.get("speed") or {}
    after = stage_figures(state, "infer").get("after", {})
    rows = [
        ("file", g["output"]),
        ("quantisation", g["quant"]),
        ("size, MB (safetensors → GGUF)", f"{x.get('source_bytes', 0) / 1e6:,.1f} → {g['bytes'] / 1e6:,.1f}"),
        ("export time, s", g.get("export_s")),
        (
            "parity: next token agrees after the prompt / at every position",
            f"{pct(p.get('top1_last'))} / {pct(p.get('top1_all'))}" if p else "not checked",
        ),
        ("parity: largest logit difference", p.get("max_logit_diff") if p else None),
        ("parity: tokenisation agrees", pct(p.get("tokenization_agree")) if p else None),
        ("llama.cpp greedy decode, tokens/s", speed.get("tokens_per_s")),
        ("transformers (the infer stage, batched), tokens/s", after.get("tokens_per_s")),
    ]
    return table(rows)


def _cost(recipe: Recipe, state: RunState, forecast: Forecast, report: PairwiseReport | None) -> str:
    g = stage_figures(state, "generate")
    t = stage_figures(state, "train").get("summary", {})
    e = stage_figures(state, "eval")
    rows = []
    if forecast.teacher:
        f = forecast.teacher
        rows += [
            ("teacher requests", f.requests, g.get("requests")),
            ("teacher prompt tokens", f.prompt_tokens, g.get("prompt_tokens")),
            ("teacher completion tokens", f.completion_tokens, g.get("completion_tokens")),
            ("teacher USD" + (f" (batch: {f.price_factor:g} x the list price)" if f.price_factor != 1 else ""),
             round(f.cost_usd, 4), g.get("cost_usd")),
        ]  # fmt: skip
    if forecast.train:
        f2 = forecast.train
        actual_hours = (
            (state.stages["train"].wall_s * stage_figures(state, "train").get("processes", 1) / 3600)
            if "train" in state.stages
            else None
        )
        kind = "CPU" if f2.gpu == "cpu" else "GPU"
        rows += [
            ("training tokens", f2.tokens, t.get("tokens_seen_this_run")),
            (
                f"training {kind}-hours",
                round(f2.accelerator_hours, 4),
                round(actual_hours, 4) if actual_hours else None,
            ),
            (
                "training USD",
                round(f2.cost_usd, 4),
                round((actual_hours or 0) * recipe.forecast.gpu_usd_per_hour, 4),
            ),
        ]
    if forecast.judge:
        f3, prices = forecast.judge, recipe.forecast
        rows += [
            ("judgements", f3.judgements, report.judgements if report is not None else None),
            ("judge prompt tokens", f3.prompt_tokens, e.get("prompt_tokens")),
            ("judge completion tokens", f3.completion_tokens, e.get("completion_tokens")),
            (
                "judge USD" + (f" (batch: {f3.price_factor:g} x the list price)" if f3.price_factor != 1 else ""),
                round(f3.cost_usd, 4),
                round(
                    f3.price_factor
                    * (e.get("prompt_tokens", 0) * prices.judge_price_prompt_per_1m
                       + e.get("completion_tokens", 0) * prices.judge_price_completion_per_1m) / 1e6,
                    4,
                ) if e else None,
            ),
        ]  # fmt: skip
    rows += _alignment_cost(state)
    head = ("", "forecast", "actual")
    lines = "".join(f"<li>{esc(line)}</li>" for line in forecast.lines())
    return (
        table(rows, head) + f'<p class="muted">How the forecast was made:</p><ul class="muted">{lines}</ul>'
    )


def _alignment_cost(state: RunState) -> list[tuple[str, Any, Any]]:
    """What learning from preferences cost: not forecast, counted."""
    rows: list[tuple[str, Any, Any]] = []
    score = stage_figures(state, "data").get("score") or {}
    if score:
        rows.append(
            (
                "data score: judge prompt / completion tokens",
                "—",
                f"{fmt(score['prompt_tokens'])} / {fmt(score['completion_tokens'])}",
            )
        )
    p = stage_figures(state, "prefer").get("summary") or {}
    if p.get("judge_cost"):
        c = p["judge_cost"]
        rows.append(
            (
                "prefer: judge prompt / completion tokens",
                "—",
                f"{fmt(c['prompt_tokens'])} / {fmt(c['completion_tokens'])}",
            )
        )
    if "align" in state.stages:
        rows.append(("align: training wall time, s", "—", round(state.stages["align"].wall_s, 1)))
    e = stage_figures(state, "eval").get("aligned")
    if e:
        rows.append(
            (
                "eval (aligned): judge prompt / completion tokens",
                "—",
                f"{fmt(e['prompt_tokens'])} / {fmt(e['completion_tokens'])}",
            )
        )
    return rows


def _provenance(manifest: dict[str, Any]) -> str:
    versions = table(((k, v) for k, v in manifest["versions"].items()), ("package", "version"))
    licences = table(
        ((k, ", ".join(f"{a}: {b}" for a, b in v.items())) for k, v in manifest["licences"].items()),
        ("what", "licence or terms"),
    )
    hashes = table(((k, v) for k, v in manifest["hashes"].items()), ("file", "sha256"))
    return (
        "<h3>Licences and terms</h3>"
        + licences
        + "<h3>Versions</h3>"
        + versions
        + f"<details><summary>Content hashes ({len(manifest['hashes'])})</summary>{hashes}</details>"
        + '<p class="muted">Everything here, with every stage\'s resolved settings, is in manifest.json.</p>'
    )


def render(recipe: Recipe, state: RunState, forecast: Forecast, manifest: dict[str, Any]) -> str:
    judged = _eval_report(recipe) if "eval" in state.stages else None
    aligned = (
        _eval_report(recipe, "aligned report") if recipe.has("align") and "eval" in state.stages else None
    )
    bodies = {
        "run": ("The run", _run(recipe, state)),
        "data": ("Data", _data(state)),
        "preflight": ("Preflight", _preflight(state)),
        "training": ("Training", _training(recipe, state, forecast)),
        "evaluation": ("Evaluation", _evaluation(state, judged)),
        "samples": ("Before and after fine-tuning", _samples(recipe, state, judged)),
        "alignment": ("Learning from preferences", alignment(state, aligned)),
        "export": ("Export", _export(state)),
        "cost": ("Cost: forecast and actual", _cost(recipe, state, forecast, judged)),
        "provenance": ("Provenance", _provenance(manifest)),
    }
    nav = "".join(f'<a href="#{k}">{esc(bodies[k][0])}</a>' for k in SECTIONS)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = "".join(section(k, *bodies[k]) for k in SECTIONS)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>alpaca-forge: {esc(recipe.name)}</title><style>{STYLE}</style></head><body><main>"
        f'<h1>alpaca-forge run: {esc(recipe.name)}</h1><p class="muted">{when}</p><nav>{nav}</nav>'
        f"{sections}</main></body></html>"
    )


def write_report(recipe: Recipe, state: RunState, forecast: Forecast, manifest_path: Path) -> Path:
    manifest = json.loads(Path(manifest_path).read_text())
    path = recipe.run_dir / REPORT_FILE
    write_text_atomic(path, render(recipe, state, forecast, manifest))
    return path
