"""`alpaca-forge prefer`: preference pairs from a model's own sampled answers, judged pairwise.

Data flow: instructions -> K seeded answers each (`answers`, cached) -> every two distinct answers
of an item judged in both orders by the judge, under one or more prompt wordings (`judging.judge`,
cached) -> optional seeded label flips -> each pair decided or dropped (`decide`) -> the pairs kept
(best-worst or all) written whole, atomically, as TRL's prompt/chosen/rejected rows -> a summary
(OUTPUT.summary.json). Everything slow is cached in append-only files beside the output, so a
killed run, rerun, asks nothing twice and writes the same file an uninterrupted run would.

`--from-ratings` reads people's verdicts from an `eval rate` folder instead (no model, no judge);
`--expert-iteration` writes each item's best answer as an SFT record instead of pairs.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from pathlib import Path

from ..core.files import check_output
from ..core.models import DEFAULT_MODEL
from ..core.pairs import Pair, write_pairs
from ..judging.items import Item, read_set
from ..judging.judge import (
    JUDGE_PROMPTS,
    JudgementCache,
    Task,
    judge_all,
    judge_identity,
    judgement_key,
    open_judge,
)
from .answers import AnswerCache, derived_seed, sample_answers
from .config import PreferConfig
from .decide import DROPS, Decision, Vote, decide, flip, keep_pairs, vote_rows
from .output import PreferResult, beside, done

log = logging.getLogger("alpaca_forge")


def run(config: PreferConfig, *, progress: bool = True) -> PreferResult:
    """Make `config.output` (see the module's docstring); every check of the input comes first."""
    started = time.perf_counter()
    output = check_output(config.output, inputs=[config.input])
    if config.from_ratings is not None:
        return _from_ratings(config, output, started)
    # bad input fails before any model loads
    items = read_set(config.input, limit=config.limit, flag="--input")
    answers_path = check_output(beside(output, ".answers.jsonl"), inputs=[config.input])
    if config.expert_iteration:
        from .expert import check_reward_model, expert_iteration

        check_reward_model(config)  # tokenizer files only: before any weights load
        cache = AnswerCache(answers_path)
        sampled = sample_answers(config, items, cache, progress=progress)
        return expert_iteration(config, items, sampled, output, started, progress)
    judgements_path = (
        check_output(config.cache, flag="--cache", inputs=[config.input, output])
        if config.cache
        else beside(output, ".judgements.jsonl")
    )
    judgement_cache = JudgementCache(judgements_path, "prefer")  # a broken cache fails before sampling
    cache = AnswerCache(answers_path)
    sampled = sample_answers(config, items, cache, progress=progress)
    return _judged_pairs(config, items, sampled.answers, judgement_cache, output, started, progress, sampled)


def _prompts(config: PreferConfig) -> list[str]:
    return list(JUDGE_PROMPTS)[: config.annotators]


def _judged_pairs(config, items, answers, cache, output, started, progress, sampled) -> PreferResult:
    seed = config.generation.seed
    prompts = _prompts(config)
    tasks: list[Task] = []
    where: list[tuple[int, int, int, bool, str]] = []  # (item, x, y, x shown first, prompt)
    identical = empty = 0
    pairs_of: list[list[tuple[int, int]]] = []
    for n, (item, texts) in enumerate(zip(items, answers, strict=True)):
        empty += sum(1 for t in texts if not t.strip())
        mine = []
        for x, y in itertools.combinations(range(len(texts)), 2):
            if not texts[x].strip() or not texts[y].strip():
                continue  # an empty answer is no preference (nor a pair train reads)
            if texts[x].strip() == texts[y].strip():
                identical += 1
                continue
            mine.append((x, y))
            for x_first in (True, False):
                order = "xy" if x_first else "yx"
                chosen = (
                    prompts
                    if config.all_annotators
                    else [
                        random.Random(derived_seed(seed, "annotator", item.id, x, y, order)).choice(prompts)
                    ]
                )
                first, second = (x, y) if x_first else (y, x)
                for prompt in chosen:
                    tasks.append(
                        Task(item, f"answer-{first}", f"answer-{second}", texts[first], texts[second], prompt)
                    )
                    where.append((n, x, y, x_first, prompt))
        pairs_of.append(mine)
    judge = judge_identity(config.judge)
    judgements, asked = judge_all(
        tasks,
        lambda: open_judge(config.judge, seed=seed),
        judge,
        config.judge_generation,
        cache,
        batch_size=config.judge_batch_size,
        max_answer_chars=config.max_answer_chars,
        progress=progress,
    )
    votes: dict[tuple[int, int, int], list[Vote]] = {}
    flips = 0
    for (n, x, y, x_first, prompt), judgement in zip(where, judgements, strict=True):
        order = "xy" if x_first else "yx"
        verdict, flipped = flip(judgement.verdict, config.flip_rate, seed, items[n].id, x, y, order, prompt)
        flips += flipped
        votes.setdefault((n, x, y), []).append(Vote(x_first, verdict, flipped, {"prompt": prompt}))
    rows: list[Pair] = []
    dropped = dict.fromkeys(DROPS, 0)
    agreements: list[float] = []
    for n, item in enumerate(items):
        decisions = [decide(x, y, votes[(n, x, y)], config.min_agreement) for x, y in pairs_of[n]]
        for d in decisions:
            if d.dropped:
                dropped[d.dropped] += 1
        for d in keep_pairs(decisions, config.keep):
            agreements.append(d.agreement)
            rows.append(
                _pair(item, answers[n][d.winner], answers[n][d.loser], d, judge, f"{d.winner}>{d.loser}")
            )
    write_pairs(output, rows)
    keys = [
        judgement_key(judge, config.judge_generation, config.max_answer_chars, t.item, t.a, t.b, t.prompt)
        for t in tasks
    ]
    prompt_tokens, completion_tokens = cache.cost(keys)
    summary = {
        "output": str(output),
        "items": len(items),
        "samples": config.samples,
        "answers_sampled": sampled.sampled,
        "answers_cached": sampled.cached,
        "empty_answers": empty,
        "pairs_compared": sum(len(p) for p in pairs_of) + identical,
        "judgements": len(tasks),
        "judgements_asked": asked,
        "judgements_cached": len(tasks) - asked,
        "unreadable_verdicts": sum(1 for j in judgements if j.verdict is None),
        "judge": judge,
        "judge_prompts": prompts if config.all_annotators else {"choice_among": prompts},
        "flip_rate": config.flip_rate,
        "flips": flips,
        "dropped": {"identical": identical, **dropped},
        "keep": config.keep,
        "pairs": len(rows),
        "mean_agreement": sum(agreements) / len(agreements) if agreements else None,
        "judge_cost": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "policy": config.engine.model or DEFAULT_MODEL,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    return done(output, len(rows), summary)


def _pair(item: Item, chosen: str, rejected: str, d: Decision, judge: str, which: str) -> Pair:
    return Pair(
        f"{item.id}:{which}",
        item.instruction,
        item.input,
        chosen,
        rejected,
        {"verdicts": vote_rows(d), "agreement": round(d.agreement, 4), "judge": judge},
    )


def _from_ratings(config: PreferConfig, output: Path, started: float) -> PreferResult:
    from .ratings import rated_pairs

    rated = rated_pairs(config)
    a, b = rated.systems
    judge = "human:" + "+".join(rated.raters)
    rows: list[Pair] = []
    dropped = dict.fromkeys(DROPS, 0)
    identical = 0
    agreements = []
    for item in rated.items:
        d = rated.decisions.get(item.id)
        if d is None:
            continue
        texts = (a.answers[item.id], b.answers[item.id])
        if texts[0].strip() == texts[1].strip():
            identical += 1
            continue
        if d.dropped:
            dropped[d.dropped] += 1
            continue
        if not texts[d.winner].strip() or not texts[d.loser].strip():
            dropped["tie"] += 1  # an empty answer is no text to learn from
            continue
        agreements.append(d.agreement)
        names = (a.name, b.name)
        raters = "human:" + "+".join(sorted({str(v.source["rater"]) for v in d.votes}))
        rows.append(
            _pair(item, texts[d.winner], texts[d.loser], d, raters, f"{names[d.winner]}>{names[d.loser]}")
        )
    write_pairs(output, rows)
    summary = {
        "output": str(output),
        "from_ratings": config.from_ratings,
        "items": len(rated.items),
        "items_rated": len(rated.decisions),
        "ratings": rated.ratings,
        "ratings_left_out": rated.left_out,
        "raters": rated.raters,
        "judge": judge,
        "dropped": {"identical": identical, **dropped},
        "pairs": len(rows),
        "mean_agreement": sum(agreements) / len(agreements) if agreements else None,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    return done(output, len(rows), summary)
