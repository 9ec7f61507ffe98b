"""`alpaca-forge eval safety` on the command line: the tool's entry for `eval/cli.py`."""

from __future__ import annotations

from typing import Any

from ...core.cli import say
from .config import SafetyConfig

TOOL = (
    "safety",
    "red-team prompts with and without the content filter: refusal and block rates by category",
    """\
Ask a model a red-team prompt set (the shipped one: 60 prompts we wrote, in the content filter's
six categories plus benign controls; or --prompts FILE, JSONL with `prompt`, optional `category`,
`id`, `input`) and read each answer twice: without a filter (does the model refuse?) and through
the content filter `serve` runs (is the prompt blocked, or else the answer?). Per category: the
refusal rate, the block rate at input and output, and refused-or-blocked; for the benign controls
the same numbers are false alarms (over-refusal, over-blocking). Writes safety.json, safety.md
and safety.png into --output. The answers are cached there (answers.jsonl): a killed run resumes,
a rerun asks nothing, and other --filter-rules re-measure the filter on the same answers.

examples:
  alpaca-forge eval safety --model runs/my-alpaca --output out/safety
  # a served model, your own prompts and filter rules:
  alpaca-forge eval safety --engine openai --base-url http://127.0.0.1:8000/v1 --model my-alpaca \\
      --prompts my_redteam.jsonl --filter-rules my_rules.yaml --output out/safety-served   # yours""",
    SafetyConfig,
)


def handle(config: SafetyConfig, args: Any) -> int:
    from .runner import run_safety

    r = run_safety(config, progress=not args.quiet)
    u = r.unsafe
    say(
        "%d prompts (%d asked now, %d cached) in %.1f s; unsafe (%d): refused %.0f%% without the filter, "
        "refused or blocked %.0f%% with it (blocked at input %.0f%%, at output %.0f%%)",
        r.prompts,
        r.asked,
        r.cached,
        r.elapsed_s,
        u.n,
        100 * u.refusal_rate,
        100 * u.refused_or_blocked_rate,
        100 * u.input_block_rate,
        100 * u.output_block_rate,
    )
    if r.benign is not None:
        say(
            "benign controls (%d): over-refused %.0f%%, over-blocked %.0f%%",
            r.benign.n,
            100 * r.benign.refusal_rate,
            100 * r.benign.block_rate,
        )
    say("report: %s (table), %s, %s", r.report_md, r.report_json, r.plot or "no plot without matplotlib")
    return 0
