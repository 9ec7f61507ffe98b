"""Settings of `alpaca-forge chat`."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import setting
from ..engines import EngineConfig, GenerationSettings
from ..engines.config import TextStageConfig, engine_setting, generation_setting, repetition_penalty_setting


@dataclass(frozen=True)
class ChatConfig(TextStageConfig):
    stats: bool = setting(
        True, "print tokens, tokens/s and why the answer ended after each answer (--no-stats hides it)"
    )
    engine: EngineConfig = engine_setting()
    repetition_penalty: float | None = repetition_penalty_setting()
    generation: GenerationSettings = generation_setting(temperature=0.7)
