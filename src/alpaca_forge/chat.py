"""`alpaca-forge chat`: talk to a model in the terminal, answers streamed as they are generated.

Each line typed is one user turn. With a multi-turn prompt format (`chat`, `user-assistant`) the
conversation so far goes into every prompt, oldest turns dropped when it outgrows the model's
context; the `alpaca` format is single-turn, so each question stands alone. Ctrl-C stops the
answer being generated and returns to the prompt; Ctrl-D or `/exit` quits.
"""

from __future__ import annotations

import select
import sys
from typing import TextIO

from .generation import GenerationSettings, TokenStream
from .models import LoadedModel
from .prompts import Turn

HELP = "commands: /reset forgets the conversation, /exit quits (or Ctrl-D); Ctrl-C stops an answer"


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


def _context_limit(lm: LoadedModel) -> int | None:
    return getattr(lm.model.config, "max_position_embeddings", None)


def build_prompt(lm: LoadedModel, turns: list[Turn], max_new_tokens: int) -> tuple[str, list[Turn]]:
    """The prompt for the conversation, dropping the oldest turns until the answer fits."""
    fmt = lm.prompt_format
    if not fmt.multi_turn:
        turns = turns[-1:]
    limit = _context_limit(lm)
    while True:
        prompt = fmt.conversation(turns, lm.tokenizer)
        if limit is None or len(turns) == 1:
            return prompt, turns
        if (
            len(lm.tokenizer(prompt, add_special_tokens=fmt.add_special_tokens)["input_ids"]) + max_new_tokens
            <= limit
        ):
            return prompt, turns
        turns = turns[1:]


def run_chat(
    lm: LoadedModel,
    settings: GenerationSettings,
    *,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
    show_stats: bool = True,
) -> None:
    interactive = stdin.isatty()
    mode = "multi-turn" if lm.prompt_format.multi_turn else "single-turn: each question stands alone"
    if interactive:
        print(f"Chatting with {lm.name} ({lm.prompt_format.name} format, {mode}). {HELP}.", file=stderr)
    turns: list[Turn] = []
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
            turns = []
            print("(conversation forgotten)", file=stderr)
            continue
        if line == "/help":
            print(HELP, file=stderr)
            continue

        prompt, turns = build_prompt(lm, [*turns, Turn(line)], settings.max_new_tokens)
        if interactive:
            stdout.write("bot> ")
        stream = TokenStream(lm, prompt, settings)
        try:
            for piece in stream:
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stream.cancel()
            stdout.write(" [stopped]")
        stdout.write("\n")
        stdout.flush()
        answer = stream.completion.text if stream.completion else ""
        turns[-1] = Turn(line, answer)
        if show_stats and stream.completion:
            c = stream.completion
            print(f"[{c.num_tokens} tokens, {stream.tokens_per_s:.1f} tok/s, {c.finish_reason}]", file=stderr)
