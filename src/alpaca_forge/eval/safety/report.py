"""The reports of `eval safety`: safety.json (every count, rate and verdict), safety.md (the
table a person reads, with the prompts that got through and the false alarms) and safety.png."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...core.files import atomic_writer
from .config import SafetyConfig
from .outcomes import REFUSAL_PATTERNS, BlockedAt, CategoryRates, PromptOutcome, SafetyResult
from .prompts import BENIGN

log = logging.getLogger("alpaca_forge")

# The output folder's files.
ANSWERS = "answers.jsonl"  # the cache, appended to and resumed from
REPORT_JSON, REPORT_MD, REPORT_PNG = "safety.json", "safety.md", "safety.png"


def report_data(result: SafetyResult, config: SafetyConfig, identity: dict[str, Any]) -> dict[str, Any]:
    """safety.json: the settings, the counts and rates, and every prompt's verdicts."""
    return {
        **identity,
        "prompts_file": config.prompts,  # null: the shipped set
        "filter_rules": config.filter_rules,  # null: the shipped rules
        "filter_categories": list(result.filter_categories),
        "refusal_patterns": list(REFUSAL_PATTERNS),
        "prompts": result.prompts,
        "asked": result.asked,
        "cached": result.cached,
        "unsafe": result.unsafe.to_dict(),
        "benign": result.benign.to_dict() if result.benign else None,
        "categories": [c.to_dict() for c in result.categories],
        "outcomes": [o.to_dict() for o in result.outcomes],
    }


def _cell(count: int, n: int) -> str:
    return f"{count} ({100 * count / n:.0f}%)" if n else "–"


def _row(label: str, c: CategoryRates) -> str:
    cells = [c.refused, c.blocked_input, c.blocked_output, c.refused_or_blocked]
    return f"| {label} | {c.n} | " + " | ".join(_cell(k, c.n) for k in cells) + " |"


def report_markdown(result: SafetyResult, config: SafetyConfig, identity: dict[str, Any]) -> str:
    gen = identity["generation"]
    sampling = "greedy" if gen.get("temperature") == 0 else f"temperature {gen.get('temperature')}"
    unsafe_names = [c.category for c in result.categories if c.category != BENIGN]
    lines = [
        f"# Safety: {result.model}",
        "",
        f"{result.prompts} red-team prompts ({result.unsafe.n} unsafe in {len(unsafe_names)} "
        f"categor{'y' if len(unsafe_names) == 1 else 'ies'}, {result.benign.n if result.benign else 0} benign "
        f"controls; {config.prompts or 'the shipped set'}), answered by `{result.model}` (prompt format "
        f"{identity['prompt_format']}, {sampling}, up to {gen.get('max_new_tokens')} new tokens), each read "
        f"without and with the content filter (rules: {config.filter_rules or 'the shipped defaults'}).",
        "",
        "| category | n | refused, no filter | blocked at input | blocked at output | refused or blocked, with the filter |",
        "| --- | --: | --: | --: | --: | --: |",
    ]
    lines += [_row(c.category, c) for c in result.categories if c.category != BENIGN]
    lines.append(_row("**all unsafe**", result.unsafe))
    if result.benign is not None:
        lines.append(_row(f"{BENIGN} (false alarms)", result.benign))
    lines += [
        "",
        '*Refused*: the answer opens with a refusal ("I can\'t", "I\'m sorry, but", "As an AI" ...: a '
        "heuristic, its patterns are in safety.json). *Blocked at input*: the filter flagged the prompt, so "
        "serve would not have asked the model. *Blocked at output*: the prompt passed and the filter flagged "
        "the answer. For the benign controls every refusal is over-refusal and every block over-blocking.",
    ]
    through = [o for o in result.outcomes if o.category != BENIGN and not o.refused_or_blocked]
    alarms = [o for o in result.outcomes if o.category == BENIGN and o.refused_or_blocked]
    for title, items in (
        ("Unsafe prompts neither refused nor blocked", through),
        ("Benign prompts refused or blocked", alarms),
    ):
        lines += ["", f"## {title} ({len(items)})", ""]
        lines += [f"- `{o.id}` ({o.category}{_how(o)}): {_short(o.prompt)}" for o in items] or ["none"]
    lines += ["", f"The answers: `{ANSWERS}`; every prompt's verdicts: `{REPORT_JSON}`.", ""]
    return "\n".join(lines)


def _how(o: PromptOutcome) -> str:
    parts = ["refused"] * o.refused
    if o.blocked_at is not BlockedAt.NONE:
        parts.append(f"blocked at {o.blocked_at.value} as {', '.join(o.filter_categories)}")
    return "".join(f"; {part}" for part in parts)


def _short(text: str, chars: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[: chars - 3] + "..."


def plot_rates(result: SafetyResult, path: Path) -> Path | None:
    """Grouped bars by category: refused without the filter, blocked by it, refused or blocked
    with it; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no safety plot (pip install 'alpaca-forge[plot]')")
        return None
    groups = [c for c in result.categories if c.category != BENIGN] + [result.unsafe]
    groups += [result.benign] if result.benign is not None else []
    labels = [c.category if c is not result.unsafe else "all unsafe" for c in groups]
    series = [
        ("refused, no filter", "refusal_rate", "#1f77b4"),
        ("blocked by the filter", "block_rate", "#ff7f0e"),
        ("refused or blocked, with the filter", "refused_or_blocked_rate", "#2ca02c"),
    ]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.2), dpi=110)
    for k, (name, rate, color) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [100 * getattr(c, rate) for c in groups], width, label=name, color=color)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{label}\n(n={c.n})" for label, c in zip(labels, groups, strict=True)], fontsize=8)
    ax.set_ylabel("% of the category's prompts")
    ax.set_ylim(0, 105)
    ax.set_title(f"Safety: {result.model} (benign: false alarms)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(series), frameon=False)
    fig.tight_layout()
    with atomic_writer(path, binary=True, gzip_gz=False) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
