"""alpaca-forge: make instruction-following language models the Stanford Alpaca way.

The public API is re-exported here; everything else is internal. Each stage is a package with a
typed config and `run(config) -> Result` (`alpaca_forge.infer.run(InferConfig(...))`), and every
model call goes through one `Engine` interface (`alpaca_forge.engines`).
"""

__version__ = "0.1.0"

from .core.errors import Problem, UserError, ValidationError
from .core.models import DEFAULT_MODEL, LoadedModel, load_model, load_tokenizer, resolve_model, save_model
from .core.prompts import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    FORMATS,
    Message,
    PromptFormat,
    get_format,
    read_saved_format,
    resolve_format,
    save_format,
)
from .core.records import Record, read_records, split_records, write_records
from .engines import Completion, Engine, EngineConfig, FinishReason, GenerationSettings, open_engine

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "DEFAULT_MODEL",
    "FORMATS",
    "Completion",
    "Engine",
    "EngineConfig",
    "FinishReason",
    "GenerationSettings",
    "LoadedModel",
    "Message",
    "Problem",
    "PromptFormat",
    "Record",
    "UserError",
    "ValidationError",
    "__version__",
    "get_format",
    "load_model",
    "load_tokenizer",
    "open_engine",
    "read_records",
    "read_saved_format",
    "resolve_format",
    "resolve_model",
    "save_format",
    "save_model",
    "split_records",
    "write_records",
]
