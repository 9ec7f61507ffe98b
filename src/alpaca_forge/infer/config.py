"""Settings of `alpaca-forge infer`."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import REQUIRED, Config, nested, setting
from ..engines import EngineConfig, GenerationSettings


def _greedy() -> GenerationSettings:
    # Greedy by default, so reruns give the same answers; 1.1 keeps small models from looping.
    return GenerationSettings(temperature=0.0, repetition_penalty=1.1)


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
    generation: GenerationSettings = nested(GenerationSettings, "generation", _greedy)
