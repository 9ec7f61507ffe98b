"""Settings of `alpaca-forge infer`."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import REQUIRED, setting
from ..core.shipped import or_shipped
from ..engines import EngineConfig, GenerationSettings
from ..engines.config import TextStageConfig, engine_setting, generation_setting, repetition_penalty_setting


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
