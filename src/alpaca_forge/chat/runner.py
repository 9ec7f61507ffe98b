"""`alpaca-forge chat`: talk to a model in the terminal, answers streamed as they are generated.

Each line typed is one user turn. The whole conversation goes to the engine, which renders it
(in-process: the model's prompt format, oldest turns dropped when it outgrows the context; the
`alpaca` format is single-turn, so each question stands alone). Ctrl-C stops the answer being
generated and returns to the prompt; Ctrl-D or `/exit` quits.
"""

from __future__ import annotations

import select
import sys
from dataclasses import dataclass
from typing import TextIO

from ..core.prompts import Message
from ..engines import Engine, tokens_per_s, using_engine
from .config import ChatConfig

HELP = "commands: /reset forgets the conversation, /exit quits (or Ctrl-D); Ctrl-C stops an answer"


@dataclass(frozen=True)
class ChatResult:
    answers: int  # answers given (stopped ones included)
    tokens: int  # tokens generated in all


def _read_line(prompt: str, stdin: TextIO, stdout: TextIO) -> str:
    """Like `input()`, but Ctrl-C is never lost.

    A Ctrl-C from the terminal may be delivered to any thread of the process (torch's workers
    included); Python then only notices it when the main thread next runs. A read blocked in the
    kernel would not return until Enter, so the wait is done in short slices instead.
    """
    stdout.write(prompt)
    stdout.flush()
    while not select.select([stdin], [], [], 0.1)[0]:
        pass  # each slice lets a pending Ctrl-C raise KeyboardInterrupt here
    line = stdin.readline()
    if not line:
        raise EOFError
    return line


def run(
    config: ChatConfig,
    *,
    engine: Engine | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> ChatResult:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    with using_engine(config.engine, engine, seed=config.generation.seed) as engine:
        return _converse(config, engine, stdin, stdout, stderr)


def _converse(
    config: ChatConfig, engine: Engine, stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> ChatResult:
    interactive = stdin.isatty()
    mode = "multi-turn" if engine.multi_turn else "single-turn: each question stands alone"
    if interactive:
        print(f"Chatting with {engine.name} ({engine.format_name} format, {mode}). {HELP}.", file=stderr)
    history: list[Message] = []
    answers = tokens = 0
    while True:
        try:
            if interactive:
                line = _read_line("you> ", stdin, stdout)
            else:
                line = stdin.readline()
                if not line:
                    break
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)", file=stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            print("(conversation forgotten)", file=stderr)
            continue
        if line == "/help":
            print(HELP, file=stderr)
            continue

        question = Message("user", line)
        if interactive:
            stdout.write("bot> ")
        stream = engine.stream([*history, question] if engine.multi_turn else [question], config.settings)
        try:
            for piece in stream:
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stream.cancel()
            stdout.write(" [stopped]")
        stdout.write("\n")
        stdout.flush()
        c = stream.completion
        history += [question, Message("assistant", c.text if c else "")]
        answers += 1
        tokens += c.completion_tokens if c else 0
        if config.stats and c:
            print(
                f"[{c.completion_tokens} tokens, {tokens_per_s(stream):.1f} tok/s, {c.finish_reason.value}]",
                file=stderr,
            )
    return ChatResult(answers, tokens)
