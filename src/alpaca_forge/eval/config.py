"""Settings of `alpaca-forge eval pairwise` and `eval leaderboard`."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import REQUIRED, Config, nested, setting
from ..core.shipped import or_shipped
from ..engines import EngineConfig, GenerationSettings
from ..judging.rules import judge_model_problem

SET_HELP = (
    "the evaluation set: Alpaca records, seed tasks, or evaluation tasks "
    "({id, motivation_app, instruction, instances})" + or_shipped("demo-eval.jsonl")
)
SYSTEM_HELP = (
    "[NAME=]FILE: a predictions file (JSONL or JSON: infer's output, or rows with 'response'); "
    "[NAME=]model:SPEC: a model (a built-in name, a folder, a .gguf) that answers the set first (cached)"
)


def _judge_greedy() -> GenerationSettings:
    # The verdict comes first and the reason is one sentence: a short budget, greedy, no penalty
    # (a penalty on repeated tokens can push a judge off the letters it was told to use).
    return GenerationSettings(max_new_tokens=32, temperature=0.0, repetition_penalty=1.0)


def _answer_greedy() -> GenerationSettings:
    return GenerationSettings(max_new_tokens=256, temperature=0.0, repetition_penalty=1.1)


@dataclass(frozen=True)
class JudgingConfig(Config):
    """How items are judged and counted (shared by pairwise and leaderboard)."""

    one_order: bool = setting(
        False,
        "judge each item in one order only (a seeded random one per item), at half the cost; the "
        "judge's position bias then adds noise instead of cancelling out",
    )
    seed: int = setting(0, "seeds the orders of --one-order and every bootstrap", ge=0)
    bootstrap_samples: int = setting(2000, "bootstrap resamples of the items, for every interval", ge=100)
    batch_size: int = setting(8, "judgements asked at once (a server: requests in flight)", ge=1)
    limit: int | None = setting(None, "use only the set's first N items", ge=1)
    answer_field: str | None = setting(
        None, "the predictions' answer field (default: 'output', else 'response')", metavar="FIELD"
    )
    max_answer_chars: int | None = setting(
        6000,
        "show the judge at most this many characters of an answer (cut answers are marked and counted); "
        "bounds the cost of a rambling system",
        ge=100,
    )
    cache: str | None = setting(
        None,
        "judgement cache, JSONL (default: OUTPUT/judgements.jsonl); share one between runs to judge a pair once",
        metavar="FILE",
    )
    judge: EngineConfig = nested(EngineConfig, "judge", prefix="judge")
    judge_generation: GenerationSettings = nested(
        GenerationSettings, "judge sampling", _judge_greedy, exclude=("seed",), prefix="judge"
    )
    answer_generation: GenerationSettings = nested(
        GenerationSettings,
        "answering (model: systems)",
        _answer_greedy,
        exclude=("seed", "stop"),
        prefix="answer",
    )

    def check(self):
        bad_judge = judge_model_problem(self.judge.model)
        if bad_judge:
            yield "judge.model", *bad_judge


@dataclass(frozen=True)
class PairwiseConfig(Config):
    set: str = setting(REQUIRED, SET_HELP, metavar="FILE")
    a: str = setting(REQUIRED, "system A: " + SYSTEM_HELP, metavar="SYSTEM")
    b: str = setting(REQUIRED, "system B, the same way", metavar="SYSTEM")
    output: str = setting(
        REQUIRED, "folder for the report (report.json, report.md, PNG charts)", metavar="DIR"
    )
    show_disagreements: bool = setting(
        False, "print the items whose two orders the judge decided differently"
    )
    judging: JudgingConfig = nested(JudgingConfig, "judging")


@dataclass(frozen=True)
class LeaderboardConfig(Config):
    set: str = setting(
        REQUIRED, "the evaluation set, as for pairwise" + or_shipped("demo-eval.jsonl"), metavar="FILE"
    )
    systems: tuple[str, ...] = setting(REQUIRED, "two or more systems: " + SYSTEM_HELP, positional=True)
    output: str = setting(REQUIRED, "folder for the leaderboard (leaderboard.json, .md, .png)", metavar="DIR")
    baseline: str | None = setting(
        None,
        "compare every system with this one (by name) instead of every pair with every other: "
        "K-1 pairs instead of K(K-1)/2",
        metavar="NAME",
    )
    judging: JudgingConfig = nested(JudgingConfig, "judging")

    def check(self):
        if len(self.systems) < 2:
            yield (
                "systems",
                "a leaderboard needs two or more systems",
                "name them all, e.g. a.jsonl b.jsonl c.jsonl",
            )
