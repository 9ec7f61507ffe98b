"""`alpaca-forge eval safety`: how often a model refuses red-team prompts, and how often the
content filter `serve` runs would block them, by category.

Data flow: a prompt set (ours, shipped, or the user's JSONL; every problem reported with its
file:line and field) -> the answers already cached in the output folder -> the model answers the
rest, a batch at a time, each batch appended and fsynced (a kill loses at most the batch in
flight; the next run carries on, and a rerun asks nothing) -> for each prompt, two readings of the
same answer: without the filter (is it a refusal?) and with it (is the prompt blocked, as serve
would before asking the model; else is the answer?) -> counts by category -> safety.json,
safety.md and safety.png.

The filter is not cached: its verdicts are recomputed on every run (the rules take well under a
millisecond a text), so other `--filter-rules` re-measure the filter on the same answers for free.
The answer is checked whole, as serve's last check of a streamed answer does; mid-stream, serve
may cut an answer a little earlier (see `content_filter.OutputChecker`), never later.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...content_filter import ContentFilter, load_rules
from ...core.errors import UserError
from ...core.files import (
    check_output,
    open_append,
    read_appended_jsonl,
    sync,
    write_json_atomic,
    write_text_atomic,
)
from ...core.prompts import Message
from ...engines import Engine, using_engine
from .config import SafetyConfig
from .outcomes import SafetyResult, check_exchange, tally
from .prompts import BENIGN, RedTeamPrompt, load_prompts
from .report import ANSWERS, REPORT_JSON, REPORT_MD, REPORT_PNG, plot_rates, report_data, report_markdown


def run_safety(config: SafetyConfig, *, progress: bool = True, engine: Engine | None = None) -> SafetyResult:
    """Answer the prompts (those not cached in `config.output`), read each answer with and
    without the content filter, and write the reports. `engine` reuses an open one (else it is
    opened from `config.engine` and closed at the end)."""
    start = time.perf_counter()
    out = check_output(config.output, folder=True)
    # Bad prompts or rules fail here, before the model loads.
    prompts = load_prompts(config.prompts)[: config.limit]
    content_filter = ContentFilter(load_rules(config.filter_rules))
    try:
        with using_engine(config.engine, engine, seed=config.generation.seed) as engine:
            # What each cached answer must have been made with (and what the reports name).
            identity = {
                "model": engine.name,
                "prompt_format": engine.format_name,
                "generation": config.settings.to_dict(),
            }
            rows, asked = _answers(config, engine, identity, prompts, out / ANSWERS, progress)
            last_user_only = not engine.multi_turn
        outcomes = tuple(
            check_exchange(content_filter, p, rows[p.id], last_user_only=last_user_only) for p in prompts
        )
    finally:
        content_filter.close()
    names = list(dict.fromkeys(p.category for p in prompts if p.category != BENIGN))
    categories = [tally(n, [o for o in outcomes if o.category == n]) for n in names]
    controls = [o for o in outcomes if o.category == BENIGN]
    benign = tally(BENIGN, controls) if controls else None
    result = SafetyResult(
        output=out,
        model=identity["model"],
        prompts=len(prompts),
        asked=asked,
        cached=len(prompts) - asked,
        categories=tuple(categories if benign is None else [*categories, benign]),
        unsafe=tally("unsafe", [o for o in outcomes if o.category != BENIGN]),
        benign=benign,
        outcomes=outcomes,
        filter_categories=tuple(content_filter.rules.names),
        report_json=out / REPORT_JSON,
        report_md=out / REPORT_MD,
        plot=None,
        elapsed_s=0.0,
    )
    write_json_atomic(result.report_json, report_data(result, config, identity))
    write_text_atomic(result.report_md, report_markdown(result, config, identity))
    plot = plot_rates(result, out / REPORT_PNG)
    return dataclasses.replace(result, plot=plot, elapsed_s=time.perf_counter() - start)


def read_cached(path: Path, expected: dict[str, Any], prompts: Sequence[RedTeamPrompt]) -> dict[str, dict]:
    """The answers an earlier run cached, by prompt id. Rows written with other settings (model,
    prompt format, generation) stop the run: one folder measures one model one way. A row whose
    id now names another text stops it too, rather than score an answer to another question."""
    fix = "choose another --output, or add --overwrite to ask every prompt again"
    by_id = {p.id: p for p in prompts}
    cached: dict[str, dict] = {}
    for lineno, row in read_appended_jsonl(path, ("id", "prompt", "input", "answer"), "eval safety", fix):
        for field, want in expected.items():
            if row.get(field) != want:
                raise UserError(
                    f"{path}:{lineno}: was written with different settings ({field}: {row.get(field)!r}, now {want!r})",
                    "use the same settings to resume, another --output for a new run, or --overwrite to start over",
                )
        p = by_id.get(row["id"])
        if p is None:  # a prompt this run does not ask (another --limit or --prompts): kept, unused
            continue
        if (row["prompt"], row["input"]) != (p.prompt, p.input):
            raise UserError(
                f"{path}:{lineno}: the answer cached for id {p.id!r} answers another prompt "
                f"({row['prompt'][:60]!r}; {p.where} now says {p.prompt[:60]!r})",
                "give a changed prompt a new id, choose another --output, or add --overwrite to ask every prompt again",
            )
        cached.setdefault(p.id, row)
    return cached


def _answers(
    config: SafetyConfig,
    engine: Engine,
    expected: dict[str, Any],
    prompts: list[RedTeamPrompt],
    path: Path,
    progress: bool,
) -> tuple[dict[str, dict], int]:
    """Every prompt's answer row, by id (cached or asked now), and how many were asked now."""
    from tqdm import tqdm

    settings = config.settings
    if config.overwrite and path.exists():
        path.unlink()
    rows = read_cached(path, expected, prompts)
    todo = [p for p in prompts if p.id not in rows]
    bar = tqdm(
        total=len(prompts),
        initial=len(prompts) - len(todo),
        desc="eval safety",
        unit="prompt",
        disable=not progress,
        file=sys.stderr,
    )
    try:
        with open_append(path) as out:
            for i in range(0, len(todo), config.batch_size):
                batch = todo[i : i + config.batch_size]
                answers = engine.chat([[Message.from_record(p.prompt, p.input)] for p in batch], settings)
                for p, comp in zip(batch, answers, strict=True):
                    row = {
                        "id": p.id,
                        "category": p.category,
                        "prompt": p.prompt,
                        "input": p.input,
                        "answer": comp.text,
                        **expected,
                        "finish_reason": comp.finish_reason.value,
                        "num_tokens": comp.completion_tokens,
                    }
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    rows[p.id] = row
                sync(out)  # this batch survives a kill from here on
                bar.update(len(batch))
    finally:
        bar.close()
    return rows, len(todo)
