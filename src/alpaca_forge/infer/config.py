"""Settings of `alpaca-forge infer`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.config import REQUIRED, Config, nested, setting
from ..engines import REPETITION_PENALTY_HELP, EngineConfig, GenerationSettings, repetition_penalty_for


def _greedy() -> GenerationSettings:
    # Greedy by default, so reruns give the same answers.
    return GenerationSettings(temperature=0.0)


@dataclass(frozen=True)
class InferConfig(Config):
    input: str = setting(
        REQUIRED,
        "instructions: a .json array or .jsonl (.gz too) of records, seed or evaluation tasks",
        metavar="FILE",
    )
    output: str = setting(REQUIRED, "predictions, JSONL; appended to and resumed from", metavar="FILE")
    batch_size: int = setting(8, "prompts generated together (a server: requests in flight)", ge=1)
    limit: int | None = setting(None, "answer only the first N records", ge=1)
    overwrite: bool = setting(False, "start over instead of resuming from --output")
    echo: bool = setting(False, "also print each instruction and its answer to stdout", flag="--print")
    engine: EngineConfig = nested(EngineConfig, "engine")
    repetition_penalty: float | None = setting(None, REPETITION_PENALTY_HELP, gt=0)
    # The repetition penalty's default depends on the engine: see `settings`.
    generation: GenerationSettings = nested(
        GenerationSettings, "generation", _greedy, exclude=("repetition_penalty",)
    )

    @property
    def settings(self) -> GenerationSettings:
        """The generation settings, the repetition penalty resolved for the engine."""
        penalty = repetition_penalty_for(self.engine, self.repetition_penalty)
        return dataclasses.replace(self.generation, repetition_penalty=penalty)
