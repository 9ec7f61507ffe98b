"""Engines: everything that turns prompts into text, behind one interface (see `base`)."""

from .base import (
    Completion,
    Engine,
    FinishReason,
    GenerationSettings,
    StopStringFilter,
    Stream,
    cut_at_stop,
    tokens_per_s,
)
from .config import EngineConfig, open_engine, using_engine

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "FinishReason",
    "GenerationSettings",
    "StopStringFilter",
    "Stream",
    "cut_at_stop",
    "open_engine",
    "tokens_per_s",
    "using_engine",
]
