"""Settings of `alpaca-forge prefer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.config import REQUIRED, nested, setting
from ..core.shipped import or_shipped
from ..engines import EngineConfig, GenerationSettings
from ..engines.config import TextStageConfig, engine_setting, generation_setting, repetition_penalty_setting
from ..judging.judge import JUDGE_PROMPTS
from ..judging.rules import judge_model_problem

Keep = Literal["best-worst", "all"]


def _judge_greedy() -> GenerationSettings:
    # As eval's judge: the verdict first, one sentence of reason, greedy, no penalty.
    return GenerationSettings(max_new_tokens=32, temperature=0.0, repetition_penalty=1.0)


@dataclass(frozen=True)
class PreferConfig(TextStageConfig):
    input: str = setting(
        REQUIRED,
        "instructions: Alpaca records, seed tasks or evaluation tasks (.json or .jsonl, .gz too)"
        + or_shipped("demo-eval.jsonl", "demo-seeds.jsonl"),
        metavar="FILE",
    )
    output: str = setting(
        REQUIRED,
        "preference pairs, JSONL ({prompt, chosen, rejected, instruction, input, verdicts, agreement, "
        "judge}, as `train --method dpo` reads them); with --expert-iteration, SFT records. Rewritten "
        "whole by every run from the caches beside it (OUTPUT.answers.jsonl, OUTPUT.judgements.jsonl)",
        metavar="FILE",
    )
    limit: int | None = setting(None, "use only the first N instructions", ge=1)
    samples: int = setting(
        2, "answers sampled per instruction (K): K(K-1)/2 pairs judged, each in both orders", ge=2
    )
    keep: Keep = setting(  # type: ignore[valid-type]
        "best-worst",
        "best-worst: one pair per instruction, the answer with the most wins against the one with the "
        "fewest (both decided); all: every decided pair",
    )
    min_agreement: float = setting(
        1.0,
        "keep a pair when at least this share of its verdicts (both orders, every annotator) names its "
        "winner; 1 = all of them (a tie or an order-inconsistent verdict drops the pair)",
        gt=0.5,
        le=1.0,
    )
    batch_size: int = setting(
        8, "answers generated at once (in-process: whole items, K answers each; a server: requests in flight)", ge=1
    )
    engine: EngineConfig = engine_setting("policy (the model that answers)")
    repetition_penalty: float | None = repetition_penalty_setting()
    # Sampled, seeded: answer j of an instruction is the same on every rerun.
    generation: GenerationSettings = generation_setting("policy sampling", temperature=0.7)

    judge: EngineConfig = nested(EngineConfig, "judge", prefix="judge")
    judge_generation: GenerationSettings = nested(
        GenerationSettings, "judge sampling", _judge_greedy, exclude=("seed",), prefix="judge"
    )
    judge_batch_size: int = setting(32, "judgements asked at once (a server judge: requests in flight)", ge=1)
    max_answer_chars: int | None = setting(
        6000, "show the judge at most this many characters of an answer (cut answers are marked)", ge=100
    )
    cache: str | None = setting(
        None,
        "judgement cache, JSONL (default: OUTPUT.judgements.jsonl); share one with `eval` to judge a pair once",
        metavar="FILE",
    )
    annotators: int = setting(
        1,
        f"judge prompt wordings used (the first N of {len(JUDGE_PROMPTS)}: {', '.join(JUDGE_PROMPTS)}), "
        "simulated annotators as in AlpacaFarm: each (pair, order) is judged by one of them, a seeded "
        "choice (all of them with --all-annotators)",
        ge=1,
        le=len(JUDGE_PROMPTS),
    )
    all_annotators: bool = setting(
        False, "judge every (pair, order) with each of the --annotators wordings (N times the judgements)"
    )
    flip_rate: float = setting(
        0.0,
        "flip each A/B verdict to the other answer with this probability (AlpacaFarm's label noise; "
        "seeded by --seed, counted and marked in the pairs' verdicts)",
        ge=0.0,
        le=0.5,
    )

    from_ratings: str | None = setting(
        None,
        "an `eval rate` output folder: its people's verdicts become the pairs (no model, no judge); "
        "give --input, --a and --b as given to `eval rate`",
        metavar="DIR",
    )
    a: str | None = setting(
        None, "with --from-ratings: system A as `eval rate` named it, [NAME=]FILE", metavar="SYSTEM"
    )
    b: str | None = setting(None, "with --from-ratings: system B, the same way", metavar="SYSTEM")
    answer_field: str | None = setting(
        None,
        "with --from-ratings: the predictions' answer field (default: 'output', else 'response')",
        metavar="FIELD",
    )

    expert_iteration: bool = setting(
        False,
        "write the best of the K answers per instruction as SFT records ({instruction, input, output}) "
        "instead of pairs, chosen by --reward-model, else by the judge (round-robin, both orders)",
    )
    reward_model: str | None = setting(
        None,
        "with --expert-iteration: a `train --method reward` folder that picks the best answer",
        metavar="DIR",
    )

    def check(self):
        bad_judge = judge_model_problem(self.judge.model)
        if bad_judge:
            yield "judge.model", *bad_judge
        if self.from_ratings is None:
            for name in ("a", "b", "answer_field"):
                if getattr(self, name) is not None:
                    flag = "--" + name.replace("_", "-")
                    yield (
                        name,
                        f"{flag} is read with --from-ratings only",
                        f"add --from-ratings DIR, or drop {flag}",
                    )
        else:
            for name in ("a", "b"):
                if getattr(self, name) is None:
                    yield (
                        name,
                        f"--from-ratings needs --{name}: the system the ratings call {name.upper()}",
                        f"give --{name} as given to `eval rate`, e.g. --{name} NAME=out/answers.jsonl",
                    )
            if self.expert_iteration:
                yield (
                    "expert_iteration",
                    "--expert-iteration chooses among a model's samples; --from-ratings has none",
                    "drop one of them",
                )
        if self.reward_model is not None and not self.expert_iteration:
            yield (
                "reward_model",
                "--reward-model picks the best answer for --expert-iteration only (pairs are judged)",
                "add --expert-iteration, or drop --reward-model",
            )
        if self.from_ratings is None and self.generation.temperature == 0:
            yield (
                "samples",
                f"--samples {self.samples} at --temperature 0 (greedy): all {self.samples} answers to an "
                "instruction would be the same",
                "sample: e.g. --temperature=0.7",
            )
