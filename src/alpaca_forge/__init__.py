"""alpaca-forge: make instruction-following language models the Stanford Alpaca way.

The public API is re-exported here; everything else is internal.
"""

__version__ = "0.1.0"

from .errors import Problem, UserError, ValidationError
from .generation import Completion, GenerationSettings, TokenStream, generate_batch, generate_text
from .models import DEFAULT_MODEL, LoadedModel, load_model, load_tokenizer, resolve_model, save_model
from .prompts import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    FORMATS,
    PromptFormat,
    Turn,
    get_format,
    read_saved_format,
    save_format,
)
from .records import Record, read_records, write_records

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "DEFAULT_MODEL",
    "FORMATS",
    "Completion",
    "GenerationSettings",
    "LoadedModel",
    "Problem",
    "PromptFormat",
    "Record",
    "TokenStream",
    "Turn",
    "UserError",
    "ValidationError",
    "__version__",
    "generate_batch",
    "generate_text",
    "get_format",
    "load_model",
    "load_tokenizer",
    "read_records",
    "read_saved_format",
    "resolve_model",
    "save_format",
    "save_model",
    "write_records",
]
