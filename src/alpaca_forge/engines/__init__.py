"""Engines: everything that turns prompts into text, behind one interface (see `base`)."""

from .base import (
    Completion,
    Engine,
    EngineError,
    FinishReason,
    GenerationSettings,
    ModelIdentity,
    SamplingDefaults,
    StopStringFilter,
    Stream,
    cut_at_stop,
    tokens_per_s,
)
from .batching import BatchedStream, BatchingEngine, EngineClosedError
from .config import EngineConfig, open_engine, repetition_penalty_for, using_engine

__all__ = [
    "BatchedStream",
    "BatchingEngine",
    "Completion",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineError",
    "FinishReason",
    "GenerationSettings",
    "ModelIdentity",
    "SamplingDefaults",
    "StopStringFilter",
    "Stream",
    "cut_at_stop",
    "open_engine",
    "repetition_penalty_for",
    "tokens_per_s",
    "using_engine",
]
