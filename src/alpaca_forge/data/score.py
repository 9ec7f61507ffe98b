"""`data score`: a judge rates every record (accuracy and helpfulness, 1-5, judging/score.py), and
`data clean --min-score X` keeps the best (AlpaGasus's filter).

The output is every row as it was read (extra keys such as lineage kept) plus
`"score": {"accuracy", "helpfulness", "overall", "judge"}`, or `"score": null` where the judge's
reply could not be read after its retries. It is rewritten whole from the cache on every run, so a
run killed part-way and rerun writes the same bytes as one that was never stopped.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import Problem, UserError, ValidationError
from ..core.files import check_output, user_paths
from ..core.json_items import RECORD_EXAMPLE, iter_json_items
from ..core.records import Record, records_from_item, write_records
from ..judging.judge import judge_identity, judge_name, open_judge
from ..judging.score import RUBRIC_VERSION, Rating, ScoreCache, score_records
from .config import ScoreConfig
from .tools import pyplot


@dataclass(frozen=True)
class Row:
    """One record with the row it was read from and where."""

    where: str  # file:line
    row: dict[str, Any]
    record: Record


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Every record of a file with its raw row (a row that holds several records, as a seed task
    with several instances, gives each its own plain row). Every problem is reported at once."""
    problems: list[Problem] = []
    rows: list[Row] = []
    for where, value in iter_json_items(path, problems):
        records, found = records_from_item(value, where, require_output=False)
        problems.extend(found)
        for rec in records:
            raw = value if len(records) == 1 else rec.to_dict()
            rows.append(Row(where, dict(raw), rec))
    if problems:
        raise ValidationError(problems, what=str(path))
    if not rows:
        raise UserError(f"{path}: holds no records", f"add records, one JSON object per line: {RECORD_EXAMPLE}")
    return rows


def _beside(output: Path, suffix: str) -> Path:
    name = output.name
    for ext in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(ext)
    return output.with_name(name + suffix)


@dataclass(frozen=True)
class ScoreResult:
    records: int
    rated: int
    unreadable: int  # left with "score": null
    asked: int  # requests sent by this run (retries included); 0 on a rerun with everything cached
    cached: int  # records whose rating came from the cache
    prompt_tokens: int  # what all the ratings cost (cached ones included)
    completion_tokens: int
    mean_overall: float | None
    overall_counts: dict[float, int]  # overall score -> records
    judge: str
    output: Path
    cache: Path
    plot: Path | None  # None: not drawn (no matplotlib and no --plot asked for)
    elapsed_s: float

    def kept_at(self, min_score: float) -> int:
        """How many records `data clean --min-score min_score` would keep."""
        return sum(n for s, n in self.overall_counts.items() if s >= min_score)


@user_paths()
def run_score(config: ScoreConfig, *, progress: bool = True) -> ScoreResult:
    """Rate every record of config.file with the judge, write them with their scores."""
    output = check_output(config.output, inputs=[config.file])
    cache_path = check_output(
        config.cache or _beside(output, ".cache.jsonl"),
        flag="--cache" if config.cache else "--output",
        inputs=[config.file],
    )
    if cache_path.resolve() == output.resolve():
        raise UserError(
            f"--cache {cache_path}: is the --output file too",
            f"give --cache another file, or leave it out (then: {_beside(output, '.cache.jsonl')})",
        )
    plt = pyplot()
    plot: Path | None = None
    if config.plot or plt is not None:
        plot = check_output(
            config.plot or _beside(output, ".scores.png"),
            flag="--plot" if config.plot else "--output",
            inputs=[config.file],
        )
    rows = read_rows(config.file)[: config.limit]
    start = time.perf_counter()
    judge = judge_identity(config.judge)
    scored = score_records(
        [r.record for r in rows],
        lambda: open_judge(config.judge),
        judge,
        config.judge_generation,
        ScoreCache(cache_path),
        batch_size=config.judge_batch_size,
        retries=config.retries,
        max_output_chars=config.max_output_chars,
        progress=progress,
    )
    name = judge_name(config.judge)
    out_rows = []
    for row, rating in zip(rows, scored.ratings, strict=True):
        out_rows.append({**row.row, "score": rating.to_dict(name) if rating else None})
    write_records(output, out_rows)
    ratings = [r for r in scored.ratings if r is not None]
    counts = dict(sorted(Counter(r.overall for r in ratings).items()))
    if plot is not None and plt is None:
        raise UserError(
            f"--plot {plot}: drawing needs matplotlib, which is not installed (the scores are in {output})",
            "pip install 'alpaca-forge[plot]', or leave out --plot",
        )
    if plot is not None:
        plot_scores(plt, ratings, plot, f"{Path(config.file).name}: rated by {name} ({RUBRIC_VERSION})")
    return ScoreResult(
        records=len(rows),
        rated=len(ratings),
        unreadable=scored.unreadable,
        asked=scored.asked,
        cached=scored.cached,
        prompt_tokens=scored.prompt_tokens,
        completion_tokens=scored.completion_tokens,
        mean_overall=sum(r.overall for r in ratings) / len(ratings) if ratings else None,
        overall_counts=counts,
        judge=name,
        output=output,
        cache=cache_path,
        plot=plot,
        elapsed_s=time.perf_counter() - start,
    )


def plot_scores(plt: Any, ratings: list[Rating], path: str | os.PathLike, title: str) -> Path:
    """Two panels: accuracy and helpfulness side by side per rating 1-5; the overall score's
    distribution with the share kept at each --min-score."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    scale = [1, 2, 3, 4, 5]
    for shift, name, color in ((-0.2, "accuracy", "#4a7ebb"), (0.2, "helpfulness", "#e08a3c")):
        counts = Counter(getattr(r, name) for r in ratings)
        left.bar([s + shift for s in scale], [counts[s] for s in scale], width=0.4, color=color, label=name)
    left.set_xticks(scale)
    left.set_xlabel("rating")
    left.set_ylabel("records")
    left.set_title(f"{len(ratings)} records rated", fontsize=10)
    left.legend(frameon=False)
    overall = [x / 2 for x in range(2, 11)]
    counts = Counter(r.overall for r in ratings)
    right.bar(overall, [counts[s] for s in overall], width=0.4, color="#5a9e6f")
    for s in overall:
        kept = sum(counts[t] for t in overall if t >= s)
        if kept and ratings:
            right.annotate(
                f"{100 * kept / len(ratings):.0f}%", (s, counts[s]), ha="center", va="bottom", fontsize=7
            )
    right.set_xticks(overall)
    right.set_xlabel("overall (mean of the two)")
    right.set_ylabel("records")
    right.set_title("overall; above each bar: the share kept by --min-score at it", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# data clean --min-score

_NO_SCORE_FIX = (
    "run `alpaca-forge data score FILE --output SCORED.jsonl` first, and clean SCORED.jsonl with --min-score"
)


def score_problems(rows: list[Row]) -> list[Problem]:
    """Rows that `--min-score` cannot judge: no "score" (not scored), or one that is not ours."""
    unscored = [row for row in rows if "score" not in row.row]
    if unscored and len(unscored) == len(rows):  # a file never scored: said once, not per record
        where = unscored[0].where.rsplit(":", 1)[0]
        return [Problem(where, f"none of its {len(rows)} records has a 'score' field: it was never scored", _NO_SCORE_FIX)]
    problems = []
    for row in rows:
        if "score" not in row.row:
            problems.append(Problem(row.where, "no 'score' field: this record was never scored", _NO_SCORE_FIX))
            continue
        score = row.row["score"]
        if score is None:
            continue  # scored, but the judge's rating could not be read: removed as unrated
        overall = score.get("overall") if isinstance(score, dict) else None
        if not isinstance(overall, int | float) or isinstance(overall, bool):
            problems.append(
                Problem(
                    row.where,
                    "field 'score' is not a `data score` rating (no number in score.overall)",
                    _NO_SCORE_FIX,
                )
            )
    return problems


def below_min_score(row: Row, min_score: float) -> str | None:
    """Why `row` is removed by --min-score ("min_score" or "unrated"), or None when it is kept."""
    score = row.row["score"]
    if score is None:
        return "unrated"
    return "min_score" if score["overall"] < min_score else None
