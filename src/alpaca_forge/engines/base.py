"""The engine interface: everything that turns prompts into text speaks it.

An `Engine` has four calls:

- `complete(prompts, settings)`: raw prompts, continued as they are (a batch in one go);
- `chat(conversations, settings)`: conversations, rendered by the engine: in-process with the
  model's saved prompt format, by a server with its own template;
- `stream(conversation, settings)`: one answer piece by piece; `cancel()` stops it, and
  `completion` holds the totals once it ends;
- `close()`.

All take one `GenerationSettings` and give `Completion`s, whichever engine runs: chat, infer, the
generate teacher (and serve and the eval judge) never see which one it is.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..core.config import Config, setting
from ..core.prompts import Message


@dataclass(frozen=True)
class GenerationSettings(Config):
    """How to sample. `temperature=0` is greedy decoding (deterministic)."""

    max_new_tokens: int = setting(256, "longest answer, in tokens", ge=1)
    temperature: float = setting(0.7, "0 = greedy (deterministic); higher = more varied", ge=0)
    top_p: float = setting(
        0.9, "nucleus sampling: sample from the smallest set holding this probability", gt=0, le=1
    )
    repetition_penalty: float = setting(
        1.0, "above 1 discourages repeating earlier tokens (small models loop without it); 1 = off", gt=0
    )
    seed: int = setting(0, "random seed, so sampled answers repeat", ge=0)
    stop: tuple[str, ...] = setting(
        (),
        "stop the answer at TEXT (repeatable); added to the prompt format's own",
        repeat=True,
        metavar="TEXT",
    )


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # stopped by the caller (Ctrl-C, a client that went away)


@dataclass(frozen=True)
class Completion:
    text: str  # the answer, cut before the first stop string, surrounding whitespace removed
    finish_reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated tokens, EOS included


@runtime_checkable
class Stream(Protocol):
    """One answer as it is generated. Iterate for text pieces; after the loop (or `cancel()`),
    `completion` and `elapsed_s` hold the totals."""

    completion: Completion | None
    elapsed_s: float

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    name: str  # written into outputs (infer rows, reports)
    format_name: str  # how chat() renders: a prompt format's name (alpaca, chat, ...) or "server"
    multi_turn: bool  # False: chat() answers the last user message alone (the Alpaca format)

    def complete(self, prompts: Sequence[str], settings: GenerationSettings) -> list[Completion]: ...

    def chat(
        self, conversations: Sequence[Sequence[Message]], settings: GenerationSettings
    ) -> list[Completion]: ...

    def stream(self, conversation: Sequence[Message], settings: GenerationSettings) -> Stream: ...

    def close(self) -> None: ...


def tokens_per_s(stream: Stream) -> float:
    c = stream.completion
    return c.completion_tokens / stream.elapsed_s if c and stream.elapsed_s > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Stop strings, applied the same way by every engine


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class StopStringFilter:
    """Streams text through, cutting at the first stop string.

    Text that could be the start of a stop string (e.g. a trailing `###`) is held back until the
    next piece shows whether it is one; `flush()` releases what is held at the end.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        text, found = cut_at_stop(self.pending, self.stops)
        if found:
            self.stopped, self.pending = True, ""
            return text
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0
        )
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return "" if self.stopped else out


class AnswerPieces:
    """Turns raw pieces into what a reader sees: stop strings cut (via `StopStringFilter`), the
    template's space or newline before the answer dropped, trailing whitespace held back."""

    def __init__(self, stops: Sequence[str]):
        self.filter = StopStringFilter(stops)
        self.started = False
        self.held = ""

    def push(self, piece: str) -> str:
        text = self.filter.push(piece)
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text, self.held = self.held + text, ""
        body = text.rstrip()
        self.held = text[len(body) :]
        return body

    def end(self) -> str:
        return (self.held + self.filter.flush()).rstrip() if self.started else self.filter.flush().strip()

    @property
    def stopped(self) -> bool:
        return self.filter.stopped
