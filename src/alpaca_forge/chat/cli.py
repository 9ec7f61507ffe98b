"""`alpaca-forge chat` on the command line."""

from __future__ import annotations

from typing import Any

from ..core.cli import add_command
from .config import ChatConfig

DESCRIPTION = """\
Chat with a model, answers streamed token by token. Multi-turn with the chat and user-assistant
formats (and servers); the alpaca format answers each question on its own.
In the chat: /reset forgets the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer.
With stdin not a terminal, each input line is one question and only answers are printed.

examples:
  alpaca-forge chat --model smollm2-135m-instruct --temperature 0.7
  alpaca-forge chat --engine openai --base-url http://127.0.0.1:8000/v1 --model my-alpaca"""


def register(sub: Any) -> None:
    add_command(
        sub, "chat", "talk to a model in the terminal, answers streamed", DESCRIPTION, ChatConfig, _main
    )


def _main(config: ChatConfig, args: Any) -> int:
    from .runner import run

    run(config)
    return 0
