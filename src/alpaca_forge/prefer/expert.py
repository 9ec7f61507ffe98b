"""`prefer --expert-iteration`: the best of each item's K answers as an SFT record, chosen by a
reward model or by the pairwise judge (a round-robin, both orders), through `judging.best_of`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from ..core.files import check_output
from ..core.models import DEFAULT_MODEL, load_tokenizer
from ..judging.best_of import Chooser, JudgeChooser, RewardChooser
from ..judging.items import Item
from ..judging.judge import JudgementCache, judge_identity, open_judge
from ..judging.reward import check_folder, check_tokenizer
from .answers import Sampled
from .config import PreferConfig
from .output import PreferResult, beside, done, write_records

log = logging.getLogger("alpaca_forge")


def check_reward_model(config: PreferConfig) -> None:
    """The reward model must read the policy's tokens (a server's tokenizer is not at hand)."""
    if config.reward_model is None:
        return
    check_folder(config.reward_model)
    if config.on_server:
        log.info("the policy is on a server: its tokenizer cannot be compared with the reward model's")
        return
    policy = config.engine.model or DEFAULT_MODEL
    check_tokenizer(config.reward_model, load_tokenizer(policy), policy)


def _chooser(config: PreferConfig, output: Path, progress: bool) -> Chooser:
    if config.reward_model is not None:
        return RewardChooser.beside(config.reward_model, config.engine, config.batch_size)
    cache = (
        check_output(config.cache, flag="--cache", inputs=[config.input, output])
        if config.cache
        else beside(output, ".judgements.jsonl")
    )
    return JudgeChooser(
        lambda: open_judge(config.judge, seed=config.generation.seed),
        judge_identity(config.judge),
        config.judge_generation,
        JudgementCache(cache, "prefer"),
        batch_size=config.judge_batch_size,
        max_answer_chars=config.max_answer_chars,
        progress=progress,
    )


def expert_iteration(
    config: PreferConfig,
    items: Sequence[Item],
    sampled: Sampled,
    output: Path,
    started: float,
    progress: bool,
) -> PreferResult:
    chooser = _chooser(config, output, progress)
    try:
        choices = chooser.choose(items, sampled.answers)
    finally:
        chooser.close()
    rows = []
    for item, answers, choice in zip(items, sampled.answers, choices, strict=True):
        row = {
            "id": item.id,
            "instruction": item.instruction,
            "input": item.input,
            "output": answers[choice.index],
            "chosen": choice.index,
            "chosen_by": chooser.name,
        }
        if choice.scores is not None:
            row["scores"] = [round(s, 4) for s in choice.scores]
        rows.append(row)
    write_records(output, rows)
    summary = {
        "output": str(output),
        "expert_iteration": True,
        "items": len(items),
        "samples": config.samples,
        "answers_sampled": sampled.sampled,
        "answers_cached": sampled.cached,
        "chosen_by": chooser.name,
        "judgements_asked": getattr(chooser, "asked", 0),
        "records": len(rows),
        "chosen_index_counts": [sum(1 for c in choices if c.index == j) for j in range(config.samples)],
        "policy": config.engine.model or DEFAULT_MODEL,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    return done(output, len(rows), summary)
