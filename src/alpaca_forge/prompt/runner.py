"""`alpaca-forge prompt`: the exact prompt string a model sees, by the same rule inference uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.config import REQUIRED, Config, setting
from ..core.models import BUILTIN_MODELS, DEFAULT_MODEL, load_tokenizer, saved_format_of
from ..core.prompts import FORMATS, resolve_format


@dataclass(frozen=True)
class PromptConfig(Config):
    instruction: str = setting(REQUIRED, "the task, as in a record's 'instruction'", metavar="TEXT")
    input: str = setting("", "optional context, as in a record's 'input'", metavar="TEXT")
    model: str = setting(
        DEFAULT_MODEL,
        f"a built-in model ({', '.join(BUILTIN_MODELS)}), a model folder, a .gguf file or a cached Hugging Face id",
    )
    format: Literal[tuple(FORMATS)] | None = setting(  # type: ignore[valid-type]
        None, "prompt format; default: the one saved with the model, else its chat template, else alpaca"
    )
    system: str | None = setting(
        None, "system message for the chat format (default: the template's own)", metavar="TEXT"
    )

    def check(self):
        if not self.instruction.strip():
            yield (
                "instruction",
                "--instruction is empty",
                "give the task to perform, e.g. --instruction 'Name three colours.'",
            )


@dataclass(frozen=True)
class PromptResult:
    text: str
    format: str


def run(config: PromptConfig) -> PromptResult:
    saved = saved_format_of(config.model)
    # Only the chat format, or a model with no saved format, needs the model's tokenizer.
    needs_tokenizer = config.format == "chat" or (
        config.format is None and (saved is None or saved.name == "chat")
    )
    tokenizer = load_tokenizer(config.model) if needs_tokenizer else None
    fmt = resolve_format(config.format, config.system, saved=saved, tokenizer=tokenizer)
    return PromptResult(fmt.prompt(config.instruction, config.input, tokenizer), fmt.name)
