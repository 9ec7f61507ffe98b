"""Prompt formats: the one place where a record or a conversation becomes the text a model sees.

Three formats:

- `alpaca`: the Stanford Alpaca template, byte for byte as in its training code. Single-turn.
- `chat`: the model's own chat template (`tokenizer.apply_chat_template`). Multi-turn.
- `user-assistant`: `<|user|>\\n{message}\\n<|assistant|>`, the turn format that model cards of
  Alpaca-style chat models recommend. Multi-turn.

Whichever format a model is trained with is saved next to its weights (`prompt_format.json`) and
read back by every command that loads it, so training and inference cannot drift apart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .errors import UserError

# Byte-exact with the original Alpaca training code (tested byte for byte).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

FORMAT_FILE = "prompt_format.json"


@dataclass(frozen=True)
class Turn:
    """One exchange of a conversation; `assistant` is None for the turn being asked."""

    user: str
    assistant: str | None = None


def user_message(instruction: str, input: str = "") -> str:
    """How an Alpaca record reads as one chat message: the instruction, then the input if any."""
    return f"{instruction}\n\n{input}" if input else instruction


class PromptFormat:
    """Base of the formats. Subclasses set the class attributes and `conversation`."""

    name: ClassVar[str]
    help: ClassVar[str]
    multi_turn: ClassVar[bool]
    # Text after which generation stops; the model would otherwise run on into a new turn.
    stop_strings: ClassVar[tuple[str, ...]] = ()
    # Whether the tokenizer should add its own special tokens (e.g. BOS) when encoding the prompt.
    # A chat template writes every special token itself, so it must not.
    add_special_tokens: ClassVar[bool] = True

    def __init__(self, system: str | None = None):
        self.system = system

    def prompt(self, instruction: str, input: str = "", tokenizer: Any = None) -> str:
        """The prompt for one Alpaca record (instruction plus optional input)."""
        return self.conversation([Turn(user_message(instruction, input))], tokenizer)

    def conversation(self, turns: list[Turn], tokenizer: Any = None) -> str:
        """The prompt for a conversation whose last turn awaits the assistant's answer."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.name, "system": self.system}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PromptFormat) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.name, self.system))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(system={self.system!r})"


class AlpacaFormat(PromptFormat):
    name = "alpaca"
    help = "the Stanford Alpaca template (single-turn; the default for models this project trains)"
    multi_turn = False
    stop_strings = ("### Instruction:", "### Input:", "### Response:")

    def prompt(self, instruction: str, input: str = "", tokenizer: Any = None) -> str:
        if input:
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)

    def conversation(self, turns: list[Turn], tokenizer: Any = None) -> str:
        # Single-turn: earlier turns are not part of what an Alpaca model was trained to read.
        return self.prompt(turns[-1].user)


class ChatFormat(PromptFormat):
    name = "chat"
    help = "the model's own chat template (multi-turn; needs a model whose tokenizer has one)"
    multi_turn = True
    add_special_tokens = False

    def conversation(self, turns: list[Turn], tokenizer: Any = None) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "the 'chat' prompt format needs a chat template, and this model's tokenizer has no chat template",
                "use --format alpaca or --format user-assistant, or name a model that ships a chat template",
            )
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for turn in turns:
            messages.append({"role": "user", "content": turn.user})
            if turn.assistant is not None:
                messages.append({"role": "assistant", "content": turn.assistant})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class UserAssistantFormat(PromptFormat):
    name = "user-assistant"
    help = "<|user|> / <|assistant|> turns, as Alpaca-style chat model cards recommend (multi-turn)"
    multi_turn = True
    stop_strings = ("<|user|>",)

    def conversation(self, turns: list[Turn], tokenizer: Any = None) -> str:
        parts = [f"<|user|>\n{t.user}\n<|assistant|>\n{t.assistant}" for t in turns[:-1]]
        parts.append(f"<|user|>\n{turns[-1].user}\n<|assistant|>")
        return "\n".join(parts)


FORMATS: dict[str, type[PromptFormat]] = {f.name: f for f in (AlpacaFormat, ChatFormat, UserAssistantFormat)}


def get_format(name: str, system: str | None = None) -> PromptFormat:
    try:
        return FORMATS[name](system=system)
    except KeyError:
        raise UserError(f"unknown prompt format {name!r}", f"use one of: {', '.join(FORMATS)}") from None


def clean_response(text: str) -> str:
    """The answer as a user reads it: no whitespace the template put between prompt and answer."""
    return text.strip()


def save_format(model_dir: str | os.PathLike, fmt: PromptFormat) -> Path:
    """Record the prompt format next to a model's weights."""
    path = Path(model_dir) / FORMAT_FILE
    path.write_text(json.dumps(fmt.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def read_saved_format(model_dir: str | os.PathLike) -> PromptFormat | None:
    """The prompt format saved next to a model, or None when there is none."""
    path = Path(model_dir) / FORMAT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return get_format(data["format"], data.get("system"))
    except (json.JSONDecodeError, KeyError, TypeError, UserError) as e:
        raise UserError(
            f"{path}: not a valid prompt-format file ({e})",
            f'it should read {{"format": "alpaca", "system": null}}; formats: {", ".join(FORMATS)}',
        ) from e
