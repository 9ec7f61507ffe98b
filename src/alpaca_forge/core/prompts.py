"""Prompt formats: the one place where a record or a conversation becomes the text a model sees.

Three formats:

- `alpaca`: the Stanford Alpaca template, byte for byte as in its training code. Single-turn.
- `chat`: the model's own chat template (`tokenizer.apply_chat_template`). Multi-turn.
- `user-assistant`: `<|user|>\\n{message}\\n<|assistant|>`, the turn format that model cards of
  Alpaca-style chat models recommend. Multi-turn.

Whichever format a model is trained with is saved next to its weights (`prompt_format.json`) and
read back by every command that loads it, so training and inference cannot drift apart; it is
also saved as the tokenizer's chat template (`core.chat_template`), for other runtimes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
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


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One message of a conversation. A user message made from an Alpaca record keeps the
    record's `input` apart, so the Alpaca template can put it under `### Input:`; every other
    rendering (chat templates, servers) reads `text`: the instruction, then the input."""

    role: str  # "system" | "user" | "assistant"
    content: str
    input: str = ""

    @property
    def text(self) -> str:
        return user_message(self.content, self.input)

    @classmethod
    def from_record(cls, instruction: str, input: str = "") -> Message:
        return cls("user", instruction, input)


def user_message(instruction: str, input: str = "") -> str:
    """How an Alpaca record reads as one chat message: the instruction, then the input if any."""
    return f"{instruction}\n\n{input}" if input else instruction


def check_conversation(messages: Sequence[Message]) -> None:
    """A conversation ends in a user message; roles are system, user or assistant."""
    bad = [m.role for m in messages if m.role not in ROLES]
    if bad or not messages or messages[-1].role != "user":
        raise UserError(
            "a conversation must end in a user message, and roles are system, user or assistant"
            + (f" (got {bad[0]!r})" if bad else ""),
            'send e.g. [{"role": "user", "content": "Hi"}]',
        )


def render_to_fit(
    fmt: PromptFormat,
    conversation: Sequence[Message],
    tokenizer: Any,
    count_tokens: Any,
    room_tokens: int | None,
) -> str:
    """The prompt for a conversation, the oldest exchanges dropped until its tokens
    (`count_tokens(prompt)`) fit in `room_tokens` (the context less the answer's tokens; None: no
    limit). A single-turn format only ever reads the last user message."""
    check_conversation(conversation)
    system = [m for m in conversation if m.role == "system"]
    turns = [m for m in conversation if m.role != "system"]
    while True:
        prompt = fmt.render([*system, *turns], tokenizer)
        if room_tokens is None or len(turns) <= 1 or not fmt.multi_turn:
            return prompt
        if count_tokens(prompt) <= room_tokens:
            return prompt
        turns = turns[2:] if len(turns) > 2 else turns[-1:]  # drop one exchange, user and answer


class PromptFormat:
    """Base of the formats. Subclasses set the class attributes and `render`."""

    name: ClassVar[str]
    help: ClassVar[str]
    multi_turn: ClassVar[bool]
    # Text after which generation stops; the model would otherwise run on into a new turn.
    stop_strings: ClassVar[tuple[str, ...]] = ()
    # Whether the tokenizer should add its own special tokens (e.g. BOS) when encoding the prompt.
    # A chat template writes every special token itself, so it must not.
    add_special_tokens: ClassVar[bool] = True
    # Whether a system message reaches the model (a conversation's own, or --system).
    takes_system: ClassVar[bool] = False

    def __init__(self, system: str | None = None):
        self.system = system

    def prompt(self, instruction: str, input: str = "", tokenizer: Any = None) -> str:
        """The prompt for one Alpaca record (instruction plus optional input)."""
        return self.render([Message.from_record(instruction, input)], tokenizer)

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        """The prompt for a conversation whose last message, the user's, awaits the answer."""
        raise NotImplementedError

    def system_of(self, messages: Sequence[Message]) -> str | None:
        """A system message in the conversation wins over the format's own."""
        return next((m.content for m in messages if m.role == "system"), self.system)

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

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        # Single-turn: earlier turns are not part of what an Alpaca model was trained to read.
        last = messages[-1]
        if last.input:
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=last.content, input=last.input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=last.content)


class ChatFormat(PromptFormat):
    name = "chat"
    help = "the model's own chat template (multi-turn; needs a model whose tokenizer has one)"
    multi_turn = True
    add_special_tokens = False
    takes_system = True

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "the 'chat' prompt format needs a chat template, and this model's tokenizer has no chat template",
                "use --format alpaca or --format user-assistant, or name a model that ships a chat template",
            )
        system = self.system_of(messages)
        chat = [{"role": "system", "content": system}] if system else []
        chat += [{"role": m.role, "content": m.text} for m in messages if m.role != "system"]
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


class UserAssistantFormat(PromptFormat):
    name = "user-assistant"
    help = "<|user|> / <|assistant|> turns, as Alpaca-style chat model cards recommend (multi-turn)"
    multi_turn = True
    stop_strings = ("<|user|>",)

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        tags = {"user": "<|user|>", "assistant": "<|assistant|>"}
        parts = [f"{tags[m.role]}\n{m.text}" for m in messages if m.role in tags]
        return "\n".join([*parts, "<|assistant|>"])


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
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, UserError) as e:
        why = e.message if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        raise UserError(
            f"{path}: not a valid prompt-format file ({why})",
            f'it should read {{"format": "alpaca", "system": null}}; formats: {", ".join(FORMATS)}',
        ) from e


def resolve_format(
    name: str | None,
    system: str | None,
    *,
    saved: PromptFormat | None,
    tokenizer: Any = None,
    for_training: bool = False,
) -> PromptFormat:
    """The one rule for which prompt format a model gets, everywhere:

    1. the format asked for (`--format`), with a warning when the model was trained with another;
    2. else the one saved with the model (`prompt_format.json`), so inference reads what training wrote;
    3. else, for inference, the model's chat template if it has one and Alpaca if not; for
       training, Alpaca (the recipe), unless `--format chat` asks for the template.

    `system` (`--system`) replaces the format's system message whichever way it was chosen.
    """
    if name is not None:
        if saved is not None and saved.name != name:
            logging.getLogger("alpaca_forge").warning(
                "this model was trained with the %r prompt format, but %r was asked for; answers may suffer",
                saved.name,
                name,
            )
        return get_format(
            name, system if system is not None else (saved.system if saved and saved.name == name else None)
        )
    if saved is not None:
        return saved if system is None else get_format(saved.name, system)
    default = "alpaca" if for_training or not getattr(tokenizer, "chat_template", None) else "chat"
    return get_format(default, system)
