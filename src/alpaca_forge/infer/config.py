"""Settings of `alpaca-forge infer`."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import REQUIRED, nested, setting
from ..core.shipped import or_shipped
from ..engines import EngineConfig, GenerationSettings
from ..engines.config import TextStageConfig, engine_setting, generation_setting, repetition_penalty_setting
from ..judging.rules import judge_model_problem


def _judge_greedy() -> GenerationSettings:
    # As `eval pairwise` judges: the verdict first, one sentence of reason, greedy, no penalty.
    return GenerationSettings(max_new_tokens=32, temperature=0.0, repetition_penalty=1.0)


@dataclass(frozen=True)
class InferConfig(TextStageConfig):
    input: str = setting(
        REQUIRED,
        "instructions: a .json array or .jsonl (.gz too) of records, seed or evaluation tasks"
        + or_shipped("demo-eval.jsonl", "demo-seeds.jsonl"),
        metavar="FILE",
    )
    output: str = setting(REQUIRED, "predictions, JSONL; appended to and resumed from", metavar="FILE")
    batch_size: int = setting(8, "prompts generated together (a server: requests in flight)", ge=1)
    limit: int | None = setting(None, "answer only the first N records", ge=1)
    overwrite: bool = setting(False, "start over instead of resuming from --output")
    echo: bool = setting(False, "also print each instruction and its answer to stdout", flag="--print")
    engine: EngineConfig = engine_setting()
    repetition_penalty: float | None = repetition_penalty_setting()
    # Greedy by default, so reruns give the same answers.
    generation: GenerationSettings = generation_setting(temperature=0.0)

    best_of: int = setting(
        1,
        "sample N answers per instruction (sample i seeded --seed + i; needs --temperature above 0) "
        "and keep the best, by --reward-model or else by the pairwise judge (--judge-*); each row "
        "then holds all N as 'candidates'",
        ge=1,
        metavar="N",
    )
    reward_model: str | None = setting(
        None,
        "with --best-of: keep the answer this reward model scores highest (a folder from "
        "`alpaca-forge train --method reward`; its tokenizer must be the policy's)",
        metavar="DIR",
    )
    judge_cache: str | None = setting(
        None,
        "with --best-of and the judge: its verdicts, JSONL (default: OUTPUT.judgements.jsonl); "
        "a rerun asks nothing twice",
        metavar="FILE",
    )
    judge: EngineConfig = nested(EngineConfig, "best-of judge (without --reward-model)", prefix="judge")
    judge_generation: GenerationSettings = nested(
        GenerationSettings, "best-of judge sampling", _judge_greedy, exclude=("seed",), prefix="judge"
    )

    @property
    def by_judge(self) -> bool:
        """The best of N is chosen by the pairwise judge (no reward model named)."""
        return self.best_of > 1 and self.reward_model is None

    def check(self):
        bad_judge = judge_model_problem(self.judge.model)
        if bad_judge:
            yield "judge.model", *bad_judge
        if self.best_of > 1 and self.generation.temperature == 0:
            yield (
                "best_of",
                f"--best-of {self.best_of} at --temperature 0 (greedy): all {self.best_of} answers would be the same",
                "add --temperature=0.7 (or any value above 0), or drop --best-of",
            )
        if self.best_of == 1 and self.reward_model is not None:
            yield ("reward_model", "--reward-model chooses among samples, and there is one", "add --best-of=4 (or more)")
        judge_set = (
            self.judge != EngineConfig()
            or self.judge_generation != _judge_greedy()
            or self.judge_cache is not None
        )
        if judge_set and self.reward_model is not None:
            yield (
                "reward_model",
                "--reward-model and the judge settings both choose the best answer",
                "keep --reward-model or the --judge-* settings, not both",
            )
        if judge_set and self.best_of == 1:
            yield ("best_of", "the --judge-* settings choose among samples, and there is one", "add --best-of=4 (or more)")
