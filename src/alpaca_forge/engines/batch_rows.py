"""One batch's rows, inside `BatchingEngine`'s worker: what a request carries to the worker and
back, and how its row of a shared `generate()` becomes its own answer:

    Request -> Row: RowSampler picks its token with its own settings -> BatchStep hands the token
            to its Row -> TextPieces decodes it -> AnswerPieces cuts stop strings -> the request's
            queue -> End (or Failed) once the row is done

Apart from `batching` (the queue, the engine and the consumer's stream) because this is the
per-step half: everything here runs once per row per decoding step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import AnswerPieces, GenerationSettings

# Below this a temperature is greedy: logits / 1e-38 overflow float32 to inf, and sampling from
# the NaNs that follow would fail the whole batch.
MIN_TEMPERATURE = 1e-5


class RowSampler:
    """A logits processor that picks each row's next token with that row's own settings: argmax
    for a greedy row; for a sampled one temperature, then top_p, then a draw from the row's own
    `torch.Generator`, seeded with its request's seed. It returns scores that are -inf except at
    the chosen token, so generate(), run greedy, takes exactly that token.

    Why not generate()'s own sampling: it draws every row from torch's one global generator, so
    a row's answer would depend on its batch-mates and one seed would rule the batch. Here an
    answer is the same for its seed whether it runs alone or batched (up to the float noise of
    padding). Cost: one sort of the vocabulary per sampled row per step (~0.5 ms for 49K tokens,
    against a forward pass of 50-300 ms on a CPU)."""

    def __init__(self, settings: Sequence[GenerationSettings], device: Any):
        import torch

        self.settings = list(settings)
        self.generators = []
        for s in self.settings:
            g = None
            if s.temperature >= MIN_TEMPERATURE:
                g = torch.Generator(device=device)
                g.manual_seed(s.seed)
            self.generators.append(g)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        chosen = scores.argmax(dim=-1)  # (batch,)
        for i, (s, g) in enumerate(zip(self.settings, self.generators, strict=True)):
            if g is None:
                continue
            logits = scores[i].float() / s.temperature  # (vocab,)
            if s.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
                ordered, order = torch.sort(logits, descending=True)
                p = ordered.softmax(dim=-1)
                drop = p.cumsum(dim=-1) - p >= s.top_p  # the first token always stays
                logits = logits.scatter(0, order[drop], float("-inf"))
            probs = logits.softmax(dim=-1)
            if bool(torch.isfinite(probs).all()):  # else (overflowing logits) this row stays greedy
                chosen[i] = torch.multinomial(probs, 1, generator=g)[0]
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.unsqueeze(1), 0.0)
        return out


# ---------------------------------------------------------------------------------------------
# What travels between a consumer and the worker


@dataclass(eq=False)  # identity, not field equality: two identical prompts are two requests
class Request:
    prompt: str
    add_special_tokens: bool  # the prompt format's for a rendered conversation, True for a raw prompt
    stops: tuple[str, ...]
    settings: GenerationSettings
    key: tuple
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # str pieces, then End | Failed
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # its batch's generate() began
    first_piece_at: float | None = None
    ended: bool = False  # End or Failed sent (written by the worker, or by close() for pending ones)


@dataclass(frozen=True)
class End:
    ids: list[int]  # the row's generated ids, EOS included, no padding
    prompt_tokens: int
    cancelled: bool
    ended_at: float


@dataclass(frozen=True)
class Failed:
    error: BaseException
    ended_at: float


class TextPieces:
    """Text of a growing list of token ids, piece by piece, decoding a few recent ids per token
    (not the whole answer each step, which would cost O(n^2) over an answer).

    Two windows over the ids: `ids[prefix:read]` was decoded already and `ids[prefix:]` is decoded
    now; the new text is what the longer decode adds. Keeping a little context before the new ids
    decodes tokens whose text depends on their neighbours (leading spaces) as the full decode
    does. Text ending in U+FFFD (an incomplete UTF-8 character) is held until its bytes arrive.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]

    def flush(self) -> str:
        """What is still held at the end (an incomplete character decodes as U+FFFD, as the full
        decode does)."""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]


class Row:
    """One request's row in the running batch: its tokens, text and stop check, in the worker."""

    def __init__(self, request: Request, prompt_tokens: int, tokenizer: Any, end_ids: set[int]):
        self.request = request
        self.prompt_tokens = prompt_tokens
        self.end_ids = end_ids
        self.text = TextPieces(tokenizer)  # holds the row's ids
        self.pieces = AnswerPieces(request.stops)
        self.done = False

    def take(self, token: int) -> None:
        """One generated token: its text goes out at once, and the row ends on EOS (or padding:
        `TransformersEngine.finish` reads a pad id as the end, so the stream stops there too),
        its own `max_new_tokens`, a stop string, or the consumer's `cancel()`."""
        if self.request.cancel.is_set():  # this token is nobody's: the consumer has gone
            self.end(cancelled=True)
            return
        self._send(self.pieces.push(self.text.push(token)))
        if (
            self.pieces.stopped
            or token in self.end_ids
            or len(self.text.ids) >= self.request.settings.max_new_tokens
        ):
            self.end(cancelled=False)

    def _send(self, piece: str) -> None:
        if piece:
            if self.request.first_piece_at is None:
                self.request.first_piece_at = time.perf_counter()
            self.request.out.put(piece)

    def end(self, cancelled: bool) -> None:
        if not cancelled:
            self._send(self.pieces.push(self.text.flush()))
            self._send(self.pieces.end())
        self.done = True
        self.request.ended = True
        self.request.out.put(End(self.text.ids, self.prompt_tokens, cancelled, time.perf_counter()))


class BatchStep:
    """generate()'s stopping criterion, which also streams: generate calls its criteria once per
    step, right after appending the new tokens (`input_ids[:, -1]`) and before any streamer sees
    them, so a row that ends on this token is marked done in this same step (a streamer would hear
    of it one step late, costing an extra forward pass of the whole batch). Rows already done
    receive padding, which is ignored; once every row is done, generate stops by itself."""

    def __init__(self, rows: list[Row], closed: threading.Event):
        self.rows = rows
        self.closed = closed

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if self.closed.is_set():  # every row ends; the worker fails the unfinished ones
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        # (batch,) to the host: a sync per step, the same one generate's own stop check makes
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            if not row.done:
                row.take(token)
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)
