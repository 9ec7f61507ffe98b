"""`alpaca-forge eval pairwise` and `eval leaderboard`.

Data flow: the set -> every system's answers (a predictions file, or a model answering the set
first, cached in OUTPUT/answers/) -> the judgements each pair needs (both orders, or one seeded
order per item), asked of the judge in batches unless the cache has them -> per-item outcomes ->
statistics -> report.json / report.md / charts (a leaderboard adds Bradley–Terry over all pairs).
Killing a run loses at most the batch in flight; running it again asks only what is missing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.files import (
    check_output,
    open_append,
    read_appended_jsonl,
    sync,
    write_json_atomic,
    write_text_atomic,
)
from ..engines import EngineConfig, open_engine
from ..judging.items import (
    Item,
    System,
    SystemSpec,
    check_names,
    parse_system,
    read_answers,
    read_set,
    text_key,
)
from ..judging.judge import JudgementCache, Task, judge_all, judge_identity, judge_name, open_judge
from . import stats
from .compare import SCORE, PairwiseResult, compare, identical
from .config import JudgingConfig, LeaderboardConfig, PairwiseConfig
from .report import leaderboard_chart, leaderboard_markdown, pairwise_data, write_pairwise_report

log = logging.getLogger("alpaca_forge")


@dataclass(frozen=True)
class PairwiseRun:
    result: PairwiseResult
    output: Path
    files: list[Path]
    asked: int  # judgements asked of the judge by this run (the rest came from the cache)
    elapsed_s: float
    cut_answers: int  # answers longer than --max-answer-chars, shown to the judge cut
    cache: Path  # the judgement cache read and appended to


# ---------------------------------------------------------------------------------------------
# Shared steps


def load_systems(
    specs: Sequence[SystemSpec], items: list[Item], cfg: JudgingConfig, output: Path, progress: bool
) -> list[System]:
    check_names(list(specs))
    systems = []
    for spec in specs:
        if spec.path is not None:
            systems.append(
                read_answers(spec, items, answer_field=cfg.answer_field, partial_set=cfg.limit is not None)
            )
        else:
            systems.append(
                answer_with_model(spec, items, cfg, output / "answers" / f"{spec.name}.jsonl", progress)
            )
    return systems


def answer_with_model(
    spec: SystemSpec, items: list[Item], cfg: JudgingConfig, path: Path, progress: bool
) -> System:
    """The set answered by an in-process model, greedy, cached in `path` (resumed like infer)."""
    from tqdm import tqdm

    settings = cfg.answer_generation
    expected = {"model": spec.model, "generation": settings.to_dict()}
    answers: dict[str, str] = {}
    if path.exists():
        fix = f"delete {path} to answer again"
        by_id = {it.id: it for it in items}
        for lineno, row in read_appended_jsonl(path, ("id", "output"), "eval pairwise", fix):
            for key, want in expected.items():
                if row.get(key) != want:
                    raise UserError(
                        f"{path}:{lineno}: answered with other settings ({key}: {row.get(key)!r}, now {want!r})",
                        f"delete {path} to answer again with these settings, or use the same ones",
                    )
            item = by_id.get(str(row["id"]))
            asked = text_key(str(row.get("instruction", "")), str(row.get("input", "")))
            if item is not None and asked != item.key:
                raise UserError(
                    f"{path}:{lineno}: answers another instruction than item {item.id!r} of this set",
                    f"delete {path} to answer this set (another set was answered into this --output)",
                )
            answers[str(row["id"])] = str(row["output"])
    todo = [it for it in items if it.id not in answers]
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = open_engine(EngineConfig(model=spec.model))
        bar = tqdm(
            total=len(items),
            initial=len(items) - len(todo),
            desc=f"answer ({spec.name})",
            unit="answer",
            disable=not progress,
            file=sys.stderr,
        )
        try:
            with open_append(path) as out:
                for start in range(0, len(todo), cfg.batch_size):
                    batch = todo[start : start + cfg.batch_size]
                    done = engine.chat([it.prompt() for it in batch], settings)
                    for it, c in zip(batch, done, strict=True):
                        answers[it.id] = c.text
                        row = {
                            "id": it.id,
                            "instruction": it.instruction,
                            "input": it.input,
                            "output": c.text,
                        }
                        out.write(json.dumps({**row, **expected}, ensure_ascii=False) + "\n")
                    sync(out)
                    bar.update(len(batch))
        finally:
            bar.close()
            engine.close()
    return System(spec.name, spec.source, {it.id: answers[it.id] for it in items})


def judgement_tasks(items: Sequence[Item], x: System, y: System, cfg: JudgingConfig) -> list[Task]:
    """Both orders of every item, or (--one-order) one seeded random order per item: the same
    order for the same seed, item and pair, whatever else the run holds."""
    tasks = []
    for it in items:
        if identical(x.answers[it.id], y.answers[it.id]):
            continue  # a tie without asking
        forward = Task(it, x.name, y.name, x.answers[it.id], y.answers[it.id])
        backward = Task(it, y.name, x.name, y.answers[it.id], x.answers[it.id])
        if cfg.one_order:
            flip = random.Random(f"{cfg.seed}|{it.id}|{x.name}|{y.name}").random() < 0.5
            tasks.append(backward if flip else forward)
        else:
            tasks += [forward, backward]
    return tasks


def _cut_count(systems: Sequence[System], cfg: JudgingConfig) -> int:
    if cfg.max_answer_chars is None:
        return 0
    return sum(1 for s in systems for a in s.answers.values() if len(a.strip()) > cfg.max_answer_chars)


def cache_path(cfg: JudgingConfig, output: Path) -> Path:
    return check_output(cfg.cache, flag="--cache") if cfg.cache else output / "judgements.jsonl"


def _judge(
    tasks: list[Task], cfg: JudgingConfig, cache: JudgementCache, progress: bool
) -> tuple[list, int, str]:
    judgements, asked = judge_all(
        tasks,
        lambda: open_judge(cfg.judge, seed=cfg.seed),
        judge_identity(cfg.judge),
        cfg.judge_generation,
        cache,
        batch_size=cfg.batch_size,
        max_answer_chars=cfg.max_answer_chars,
        progress=progress,
    )
    return judgements, asked, judge_name(cfg.judge)


def _notes(cfg: JudgingConfig, cut: int, unjudged: int, identical: int, unit: str = "items") -> list[str]:
    notes = [
        "Each item was judged in one seeded random order (--one-order)."
        if cfg.one_order
        else "Each item was judged in both orders; verdicts that disagree count as a tie."
    ]
    if identical:
        notes.append(f"{identical} {unit} had the same answer on both sides: ties, not asked of the judge.")
    if cut:
        notes.append(
            f"{cut} answers were longer than {cfg.max_answer_chars} characters and were shown to the judge cut."
        )
    if unjudged:
        notes.append(
            f"{unjudged} {unit} had a verdict the judge wrote in no form we could read: left out, not guessed."
        )
    return notes


# ---------------------------------------------------------------------------------------------
# Pairwise


def run_pairwise(config: PairwiseConfig, *, progress: bool = True) -> PairwiseRun:
    cfg = config.judging
    specs = [parse_system(config.a, "--a"), parse_system(config.b, "--b")]
    output = check_output(config.output, inputs=[config.set, *(s.path for s in specs if s.path)], folder=True)
    items = read_set(config.set, limit=cfg.limit)
    start = time.perf_counter()
    sys_a, sys_b = load_systems(specs, items, cfg, output, progress)
    tasks = judgement_tasks(items, sys_a, sys_b, cfg)
    cache = JudgementCache(cache_path(cfg, output))
    judgements, asked, judge = _judge(tasks, cfg, cache, progress)
    result = compare(
        items, sys_a, sys_b, judgements, judge=judge, samples=cfg.bootstrap_samples, seed=cfg.seed
    )
    cut = _cut_count([sys_a, sys_b], cfg)
    files = write_pairwise_report(
        result,
        output,
        title=f"{sys_a.name} vs {sys_b.name}",
        notes=_notes(cfg, cut, result.unjudged, result.identical),
    )
    return PairwiseRun(result, output, files, asked, time.perf_counter() - start, cut, cache.path)


# ---------------------------------------------------------------------------------------------
# Leaderboard


@dataclass(frozen=True)
class BoardRow:
    name: str
    strength: float  # Bradley-Terry log-strength, mean 0
    low: float
    high: float
    win_probability: float | None  # against the reference system
    rank_low: int  # the rank's 95% bootstrap interval
    rank_high: int


@dataclass(frozen=True)
class Leaderboard:
    judge: str
    items: int
    samples: int
    reference: str | None
    rows: tuple[BoardRow, ...]  # best first
    pairs: tuple[PairwiseResult, ...] = field(repr=False)
    output: Path | None = None
    asked: int = 0
    elapsed_s: float = 0.0
    notes: tuple[str, ...] = ()


RANK_TOLERANCE = 1e-6  # log-strengths closer than this are equal


def leaderboard_pairs(names: Sequence[str], baseline: str | None) -> list[tuple[str, str]]:
    if baseline is None:
        return list(itertools.combinations(names, 2))
    return [(n, baseline) for n in names if n != baseline]


def fit_board(
    names: Sequence[str],
    pairs: Sequence[PairwiseResult],
    *,
    reference: str | None,
    judge: str,
    items: int,
    samples: int = 1000,
    seed: int = 0,
) -> Leaderboard:
    """Bradley-Terry over every pair's item outcomes, with a bootstrap over items: the same items
    drawn for every pair, so a hard item counts in all its pairs together."""
    index = {n: k for k, n in enumerate(names)}
    item_ids = sorted({o.item_id for p in pairs for o in p.outcomes})
    pos = {i: k for k, i in enumerate(item_ids)}
    # (item, winner, loser-side) contributions, as arrays for the bootstrap
    contrib = []
    for p in pairs:
        i, j = index[p.a], index[p.b]
        for o in p.outcomes:
            if o.outcome != "unjudged":
                contrib.append((pos[o.item_id], i, j, SCORE[o.outcome]))
    c = np.array(contrib, dtype=float).reshape(-1, 4)

    def wins_matrix(weights: np.ndarray) -> np.ndarray:
        w = np.zeros((len(names), len(names)))
        rows = c[:, 0].astype(int)
        np.add.at(w, (c[:, 1].astype(int), c[:, 2].astype(int)), weights[rows] * c[:, 3])
        np.add.at(w, (c[:, 2].astype(int), c[:, 1].astype(int)), weights[rows] * (1 - c[:, 3]))
        return w

    theta = stats.bradley_terry(wins_matrix(np.ones(len(item_ids))))
    rng = np.random.default_rng(seed)
    draws, best, worst = [], [], []
    for _ in range(samples):
        drawn = rng.integers(0, len(item_ids), len(item_ids))
        t = stats.bradley_terry(wins_matrix(np.bincount(drawn, minlength=len(item_ids)).astype(float)))
        draws.append(t)
        # a system's rank, with equal strengths sharing it: best = 1 + those strictly stronger,
        # worst = those at least as strong (never broken by the order the systems were named in)
        best.append(1 + (t[None, :] > t[:, None] + RANK_TOLERANCE).sum(axis=1))
        worst.append((t[None, :] >= t[:, None] - RANK_TOLERANCE).sum(axis=1))
    draws_a, best_a, worst_a = np.array(draws), np.array(best), np.array(worst)
    ref = index.get(reference) if reference else None
    rows = []
    for n in names:
        k = index[n]
        lo, hi = np.percentile(draws_a[:, k], [2.5, 97.5])
        rlo, rhi = np.percentile(best_a[:, k], 2.5), np.percentile(worst_a[:, k], 97.5)
        rows.append(
            BoardRow(
                n,
                float(theta[k]),
                float(lo),
                float(hi),
                stats.bt_win_probability(theta[k], theta[ref]) if ref is not None else None,
                int(np.floor(rlo)),
                int(np.ceil(rhi)),
            )
        )
    rows.sort(key=lambda r: -r.strength)
    return Leaderboard(judge, items, samples, reference, tuple(rows), tuple(pairs))


def run_leaderboard(config: LeaderboardConfig, *, progress: bool = True) -> Leaderboard:
    cfg = config.judging
    specs = [parse_system(s, "SYSTEM") for s in config.systems]
    output = check_output(config.output, inputs=[config.set, *(s.path for s in specs if s.path)], folder=True)
    items = read_set(config.set, limit=cfg.limit)
    names = [s.name for s in specs]
    if config.baseline is not None and config.baseline not in names:
        raise UserError(
            f"--baseline {config.baseline!r} is none of the systems ({', '.join(names)})",
            "name one of them, as the leaderboard calls it (NAME=FILE sets a name)",
        )
    start = time.perf_counter()
    systems = {s.name: s for s in load_systems(specs, items, cfg, output, progress)}
    matchups = leaderboard_pairs(names, config.baseline)
    tasks = [t for x, y in matchups for t in judgement_tasks(items, systems[x], systems[y], cfg)]
    judgements, asked, judge = _judge(tasks, cfg, JudgementCache(cache_path(cfg, output)), progress)
    pairs = [
        compare(
            items,
            systems[x],
            systems[y],
            judgements,
            judge=judge,
            samples=cfg.bootstrap_samples,
            seed=cfg.seed,
        )
        for x, y in matchups
    ]
    reference = config.baseline or names[0]
    board = fit_board(
        names,
        pairs,
        reference=reference,
        judge=judge,
        items=len(items),
        samples=max(200, cfg.bootstrap_samples // 2),
        seed=cfg.seed,
    )
    notes = _notes(
        cfg,
        _cut_count(list(systems.values()), cfg),
        sum(p.unjudged for p in pairs),
        sum(p.identical for p in pairs),
        unit="item-pair comparisons",
    )
    unrated = [n for n in names if not any(p.judged for p in pairs if n in (p.a, p.b))]
    if unrated:
        notes.append(
            f"No comparison of {', '.join(unrated)} could be read: its strength is the prior's, not data."
        )
    board = dataclasses.replace(
        board, output=output, asked=asked, elapsed_s=time.perf_counter() - start, notes=tuple(notes)
    )
    write_json_atomic(
        output / "leaderboard.json",
        {
            "judge": judge,
            "items": len(items),
            "bootstrap_samples": board.samples,
            "reference": reference,
            "rows": [r.__dict__ for r in board.rows],
            "pairs": [pairwise_data(p, title=f"{p.a} vs {p.b}") for p in pairs],
            "notes": list(board.notes),
        },
    )
    write_text_atomic(output / "leaderboard.md", leaderboard_markdown(board))
    leaderboard_chart(board, output)
    return board
