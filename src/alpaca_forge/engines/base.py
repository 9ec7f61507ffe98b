"""The engine interface: everything that turns prompts into text speaks it.

An `Engine` answers:

- `complete(prompts, settings)`: raw prompts, continued as they are (a batch in one go);
- `chat(conversations, settings)`: conversations, rendered by the engine: in-process with the
  model's saved prompt format, by a server with its own template;
- `stream(conversation, settings)` and `stream_prompt(prompt, settings)`: one answer piece by
  piece; `cancel()` stops it, and `completion` holds the totals once it ends (an engine that can
  only complete a raw prompt gives it as one piece, `WholeAnswer`);
- `render`, `count_tokens`, `context_tokens`: the prompt it will read and how long it is (serve
  refuses a prompt too long before it queues);
- `identity()`: which model answers (serve sends it with every response);
- `generation_defaults()`: the sampling the model's authors ship with it (serve fills the
  settings a request leaves out from it, as vLLM does);
- `close()`.

An engine whose server behind renders, counts and holds the weights says so with
`upstream = True`; its `render` and `count_tokens` give None and its identity has no digest.
Callers read these members and never probe an engine for others.

All take one `GenerationSettings` and give `Completion`s, whichever engine runs: chat, infer, the
generate teacher, serve and the eval judge never see which one it is.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..core.config import Config, setting
from ..core.errors import UserError
from ..core.prompts import Message, PromptFormat

log = logging.getLogger("alpaca_forge")


class EngineError(UserError):
    """The server cannot be used: wrong key, wrong URL or model, unreachable, or not speaking the API.
    `status` is the HTTP status the server answered with, when it answered (a gateway passes a
    400 on to its own client)."""

    def __init__(self, message: str, fix: str | None = None, *, status: int | None = None):
        super().__init__(message, fix)
        self.status = status


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
    # What a gateway's client left out (serve): a server behind is not sent these, so its own
    # model's defaults apply; an engine in this process uses the values above all the same.
    left_to_server: tuple[str, ...] = setting(
        (), "settings not sent to a server behind (--engine openai): its defaults apply", cli=False
    )

    def check(self):
        unknown = set(self.left_to_server) - LEAVABLE
        if unknown:
            yield "left_to_server", f"unknown settings {sorted(unknown)}", f"name some of {sorted(LEAVABLE)}"

    def to_dict(self) -> dict[str, Any]:
        """As before `left_to_server` existed when it is empty, so records and caches keyed on the
        settings stay valid."""
        out = super().to_dict()
        if not self.left_to_server:
            out.pop("left_to_server")
        return out


LEAVABLE = frozenset({"max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed"})


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings a request may leave out, each None where not set: a model's own (its
    generation_config.json, a GGUF's general.sampling.* keys) or a server's."""

    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None

    @classmethod
    def from_values(cls, values: Mapping[str, Any], where: str) -> SamplingDefaults:
        """The settings in `values` that are in range for `GenerationSettings`; one a model's file
        gets wrong (a top_p of 0, a string) is logged and left out, never a failed request."""
        valid = {
            "temperature": lambda v: v >= 0,
            "top_p": lambda v: 0 < v <= 1,
            "repetition_penalty": lambda v: v > 0,
            "max_new_tokens": lambda v: v >= 1 and float(v).is_integer(),
        }
        kept: dict[str, Any] = {}
        for name, ok in valid.items():
            value = values.get(name)
            if value is None:
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if number and ok(value):
                kept[name] = int(value) if name == "max_new_tokens" else float(value)
            else:
                log.warning("%s: ignoring its %s %r (out of range)", where, name, value)
        return cls(**kept)

    @classmethod
    def of_generation_config(cls, config: Any, where: str) -> SamplingDefaults:
        """What a transformers GenerationConfig sets (as vLLM reads it: `to_diff_dict`, so
        transformers' own defaults are not taken for the authors'); `do_sample: false` there is
        greedy decoding, as `model.generate()` would do."""
        values = config.to_diff_dict() if config is not None else {}
        if values.get("do_sample") is False:
            values["temperature"] = 0.0
        return cls.from_values(values, where)

    def over(self, fallback: SamplingDefaults) -> SamplingDefaults:
        """These settings, and `fallback`'s where these are not set."""
        mine = self.as_dict()
        return SamplingDefaults(**{**fallback.as_dict(), **mine})

    def as_dict(self) -> dict[str, Any]:
        """The settings that are set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


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
    queue_s: float | None  # seconds it waited in a batch queue; None where the engine has no queue

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answers, as serve tells every client (`system_fingerprint`, `x-model-id`)."""

    model: str  # as named: a model folder, a .gguf file, a built-in name, or the name a server serves
    digest: bytes | None  # sha256 over the prompt format and every weight; None: a server behind holds them


def local_identity(model: str, prompt_format: PromptFormat, weights_digest: bytes) -> ModelIdentity:
    """The identity of a model run here: the same weights under another template differ."""
    h = hashlib.sha256()
    h.update(json.dumps(prompt_format.to_dict(), sort_keys=True).encode())
    h.update(weights_digest)
    return ModelIdentity(model, h.digest())


@runtime_checkable
class Engine(Protocol):
    name: str  # written into outputs (infer rows, reports)
    format_name: str  # how chat() renders: a prompt format's name (alpaca, chat, ...) or "server"
    multi_turn: bool  # False: chat() answers the last user message alone (the Alpaca format)
    upstream: bool  # True: a server behind renders prompts, counts tokens and holds the weights
    context_tokens: int | None  # prompt + answer tokens the model takes; None: unknown (upstream)
    last_retries: int  # failed attempts before this thread's last call succeeded (0: never retried)

    def complete(self, prompts: Sequence[str], settings: GenerationSettings) -> list[Completion]: ...

    def chat(
        self, conversations: Sequence[Sequence[Message]], settings: GenerationSettings
    ) -> list[Completion]: ...

    def stream(self, conversation: Sequence[Message], settings: GenerationSettings) -> Stream: ...

    def stream_prompt(self, prompt: str, settings: GenerationSettings) -> Stream:
        """A raw prompt continued piece by piece, stopped only at `settings.stop` (as `complete`)."""
        ...

    def render(self, conversation: Sequence[Message], max_new_tokens: int) -> str | None:
        """The prompt `chat` reads for a conversation, the oldest turns dropped until the answer
        fits the context; None: the server renders."""
        ...

    def count_tokens(self, text: str, *, chat: bool) -> int | None:
        """Tokens the model reads for a prompt: a rendered conversation (`chat`) or a raw one;
        None: only the server can count."""
        ...

    def identity(self) -> ModelIdentity: ...

    def generation_defaults(self) -> SamplingDefaults:
        """The sampling the model's authors set (not a library's defaults); nothing where a
        server behind holds the model and applies its own."""
        ...

    def close(self) -> None: ...


class WholeAnswer:
    """A raw-prompt answer from an engine that can only complete (a server's /v1/completions
    through the HTTP engine), given as a stream of one piece."""

    def __init__(self, engine: Engine, prompt: str, settings: GenerationSettings):
        self.engine, self.prompt, self.settings = engine, prompt, settings
        self.completion: Completion | None = None
        self.elapsed_s = 0.0
        self.queue_s: float | None = None
        self.cancelled = False

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        done = self.engine.complete([self.prompt], self.settings)[0]
        self.elapsed_s = time.perf_counter() - start
        if self.cancelled:
            done = Completion(done.text, FinishReason.CANCELLED, done.prompt_tokens, done.completion_tokens)
        self.completion = done
        if done.text and not self.cancelled:
            yield done.text

    def cancel(self) -> None:
        self.cancelled = True


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
