"""Settings of `alpaca-forge chat`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.config import Config, nested, setting
from ..engines import REPETITION_PENALTY_HELP, EngineConfig, GenerationSettings, repetition_penalty_for


def _sampled() -> GenerationSettings:
    return GenerationSettings(temperature=0.7)


@dataclass(frozen=True)
class ChatConfig(Config):
    stats: bool = setting(
        True, "print tokens, tokens/s and why the answer ended after each answer (--no-stats hides it)"
    )
    engine: EngineConfig = nested(EngineConfig, "engine")
    repetition_penalty: float | None = setting(None, REPETITION_PENALTY_HELP, gt=0)
    # The repetition penalty's default depends on the engine: see `settings`.
    generation: GenerationSettings = nested(
        GenerationSettings, "generation", _sampled, exclude=("repetition_penalty",)
    )

    @property
    def settings(self) -> GenerationSettings:
        """The generation settings, the repetition penalty resolved for the engine."""
        penalty = repetition_penalty_for(self.engine, self.repetition_penalty)
        return dataclasses.replace(self.generation, repetition_penalty=penalty)
