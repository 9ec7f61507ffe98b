"""Settings of `alpaca-forge chat`."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import Config, nested, setting
from ..engines import EngineConfig, GenerationSettings


def _sampled() -> GenerationSettings:
    return GenerationSettings(temperature=0.7, repetition_penalty=1.1)


@dataclass(frozen=True)
class ChatConfig(Config):
    stats: bool = setting(
        True, "print tokens, tokens/s and why the answer ended after each answer (--no-stats hides it)"
    )
    engine: EngineConfig = nested(EngineConfig, "engine")
    generation: GenerationSettings = nested(GenerationSettings, "generation", _sampled)
