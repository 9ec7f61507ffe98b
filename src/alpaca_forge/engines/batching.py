"""Micro-batching for the in-process engine: concurrent requests share one `generate()`.

A server's threads each ask for one answer; run one after another, a model on one device answers
them no faster than it answers one. `BatchingEngine` queues every request, and one worker thread
runs the waiting ones that can share a decoding loop (same sampling settings) as ONE left-padded
`model.generate()`, the requests' rows demultiplexed step by step:

    submit -> pending (FIFO) -> worker: gather compatible requests for `wait_s` -> encode (padded)
           -> generate(stopping_criteria=[_BatchStep]) -> each step, per row: token -> text piece
           -> stop check -> the row's queue -> its consumer (`BatchedStream`)

Each row ends on its own (EOS, its own `max_new_tokens`, a stop string, or `cancel()`); the batch
ends when every row has. A request that arrives while a batch runs waits for that batch to end:
this is micro-batching, not continuous batching (rows cannot join a running loop).

Greedy and sampled requests share a batch whatever their temperature, top_p and seed: each row
samples with its own settings and its own seeded generator (`_RowSampler`), so a sampled answer
is the same for its seed alone or batched. Only the prompt encoding and the repetition penalty,
which transformers applies to a whole batch, split batches.
Greedy answers are the same batched or alone (up to the float noise of padding).

Rows never draw from torch's global generator (each has its own), so a batch neither disturbs
nor depends on the global RNG; the inner engine's lock still runs one generate() at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.prompts import Message
from .base import AnswerPieces, Completion, FinishReason, GenerationSettings
from .transformers_engine import TransformersEngine


class EngineClosedError(RuntimeError):
    """The engine was closed before (or while) this request ran."""


@dataclass(frozen=True)
class BatchStats:
    batches: int = 0  # generate() calls run
    rows: int = 0  # requests generated, over all batches
    largest_batch: int = 0  # most rows one generate() ran


def batch_key(settings: GenerationSettings, add_special_tokens: bool) -> tuple:
    """Requests with equal keys can share one generate(): `encode` tokenizes a batch with one
    add_special_tokens choice, and transformers applies one repetition penalty to the whole batch.
    Temperature, top_p and the seed do not split batches: each row samples on its own
    (`_RowSampler`), so greedy and sampled requests, a chat page's included, share a batch."""
    return (add_special_tokens, settings.repetition_penalty)


# Below this a temperature is greedy: logits / 1e-38 overflow float32 to inf, and sampling from
# the NaNs that follow would fail the whole batch.
MIN_TEMPERATURE = 1e-5


class _RowSampler:
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
                cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
                drop = cumulative - ordered.softmax(dim=-1) >= s.top_p  # the first token always stays
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
class _Request:
    prompt: str
    add_special_tokens: bool  # the prompt format's for a rendered conversation, True for a raw prompt
    stops: tuple[str, ...]
    settings: GenerationSettings
    key: tuple
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # str pieces, then _End | _Failed
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # its batch's generate() began
    first_piece_at: float | None = None
    ended: bool = False  # _End or _Failed sent (written by the worker, or by close() for pending ones)


@dataclass(frozen=True)
class _End:
    ids: list[int]  # the row's generated ids, EOS included, no padding
    prompt_tokens: int
    cancelled: bool
    ended_at: float


@dataclass(frozen=True)
class _Failed:
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


class _Row:
    """One request's row in the running batch: its tokens, text and stop check, in the worker."""

    def __init__(self, request: _Request, prompt_tokens: int, tokenizer: Any, end_ids: set[int]):
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
        self.request.out.put(_End(self.text.ids, self.prompt_tokens, cancelled, time.perf_counter()))


class _BatchStep:
    """generate()'s stopping criterion, which also streams: generate calls its criteria once per
    step, right after appending the new tokens (`input_ids[:, -1]`) and before any streamer sees
    them, so a row that ends on this token is marked done in this same step (a streamer would hear
    of it one step late, costing an extra forward pass of the whole batch). Rows already done
    receive padding, which is ignored; once every row is done, generate stops by itself."""

    def __init__(self, rows: list[_Row], closed: threading.Event):
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


# ---------------------------------------------------------------------------------------------
# The engine


class BatchingEngine:
    """The Engine interface over a `TransformersEngine`, whose concurrent requests are batched.

    `complete` and `chat` submit each prompt as its own request (so they batch with other callers'
    too) and wait for all; `stream` and `stream_prompt` give one answer piece by piece.
    """

    def __init__(self, engine: TransformersEngine, *, max_batch_size: int = 16, wait_s: float = 0.005):
        """`max_batch_size`: most rows in one generate() (more = more throughput, more memory);
        `wait_s`: how long the worker waits for one more compatible request before it starts (each
        arrival restarts the wait, so a burst batches whole; a lone request pays it once)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        self.inner = engine
        self.name = engine.name
        self.format_name = engine.format_name
        self.multi_turn = engine.multi_turn
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._cond = threading.Condition()  # guards _pending (and the worker's gather)
        self._pending: list[_Request] = []
        self._closed = threading.Event()
        self._rows: list[_Row] = []  # the running batch (replaced, never mutated, by the worker)
        self._stats = BatchStats()
        # What ends a row: EOS, and the pad id (see `_Row.take`).
        self._end_ids = {*engine._eos, engine._pad}
        self._worker = threading.Thread(target=self._work, name="alpaca-forge-batcher", daemon=True)
        self._worker.start()

    # -- the interface ----------------------------------------------------------------------

    def complete(self, prompts: Sequence[str], settings: GenerationSettings) -> list[Completion]:
        return _wait_all([self.stream_prompt(p, settings) for p in prompts])

    def chat(
        self, conversations: Sequence[Sequence[Message]], settings: GenerationSettings
    ) -> list[Completion]:
        return _wait_all([self.stream(c, settings) for c in conversations])

    def stream(self, conversation: Sequence[Message], settings: GenerationSettings) -> BatchedStream:
        """A conversation's answer, rendered and stopped as `TransformersEngine.chat` does."""
        prompt = self.inner.render(conversation, settings.max_new_tokens)
        special = self.inner.lm.prompt_format.add_special_tokens
        return self._submit(prompt, special, self.inner._stops(settings), settings)

    def stream_prompt(self, prompt: str, settings: GenerationSettings) -> BatchedStream:
        """A raw prompt continued, stopped only at `settings.stop` (as `complete`)."""
        return self._submit(prompt, True, settings.stop, settings)

    def count_tokens(self, text: str, *, chat: bool) -> int:
        """Tokens the model reads for a prompt: a rendered conversation (`chat`) or a raw one."""
        return self.inner.count_tokens(text, chat=chat)

    @property
    def running(self) -> int:
        """Rows in the batch generate() is running now (0: the worker is idle or gathering);
        a row that has ended keeps its place until the batch ends."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests queued for a later batch."""
        return len(self._pending)

    @property
    def stats(self) -> BatchStats:
        return self._stats

    def close(self) -> None:
        """Stop the worker: waiting requests fail with `EngineClosedError`, and so do the rows of
        a running batch, which ends at its next step. Idempotent."""
        with self._cond:
            if self._closed.is_set():
                return
            self._closed.set()
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for request in pending:
            _fail(request, EngineClosedError("the engine was closed before this request ran"))
        if threading.current_thread() is not self._worker:
            self._worker.join()

    # -- the queue --------------------------------------------------------------------------

    def _submit(
        self, prompt: str, add_special_tokens: bool, stops: Sequence[str], settings: GenerationSettings
    ) -> BatchedStream:
        key = batch_key(settings, add_special_tokens)
        request = _Request(prompt, add_special_tokens, tuple(stops), settings, key)
        with self._cond:
            if self._closed.is_set():
                raise EngineClosedError("the engine is closed")
            self._pending.append(request)
            self._cond.notify()
        return BatchedStream(self, request)

    def _withdraw(self, request: _Request) -> bool:
        """Take a request that has not started out of the queue; False if it has started."""
        with self._cond:
            if request in self._pending:
                self._pending.remove(request)
                return True
            return False

    def _next_batch(self) -> list[_Request] | None:
        """The oldest waiting request and up to `max_batch_size - 1` compatible ones after it,
        waiting `wait_s` after each arrival for more; None once closed. The oldest request always
        leads the next batch, so an incompatible one waits one batch at most, never forever."""
        with self._cond:
            while True:
                while not self._pending and not self._closed.is_set():
                    self._cond.wait()
                if self._closed.is_set():
                    return None
                key = self._pending[0].key
                batch = self._compatible(key)
                deadline = time.monotonic() + self.wait_s
                while len(batch) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                    if self._closed.is_set():
                        return None
                    grown = self._compatible(key)  # recounted: cancel() may have withdrawn some
                    if len(grown) > len(batch):
                        deadline = time.monotonic() + self.wait_s
                    batch = grown
                if batch:
                    taken = {id(r) for r in batch}
                    self._pending = [r for r in self._pending if id(r) not in taken]
                    started = time.perf_counter()
                    for r in batch:
                        r.started_at = started
                    return batch

    def _compatible(self, key: tuple) -> list[_Request]:
        return [r for r in self._pending if r.key == key][: self.max_batch_size]

    # -- the worker -------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                # Each batch generates in a thread of its own, as `TokenStream` does per answer:
                # on a CPU other processes were also using, generate() in a long-lived thread ran
                # 2-20x slower than in a fresh one (OpenMP's default waiting, measured with
                # SmolLM2 on 2 cores; OMP_WAIT_POLICY=PASSIVE evens them too). ~0.3 ms a batch.
                runner = threading.Thread(target=self._run, args=(batch,), name="alpaca-forge-batch")
                runner.start()
                runner.join()
        finally:  # only close() ends the loop, or a bug here: then fail what waits, never hang it
            self.close()

    def _run(self, batch: list[_Request]) -> None:
        """One generate() over the batch; every request ends with an _End or a _Failed."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        inner, first = self.inner, batch[0]
        rows: list[_Row] = []
        error: BaseException | None = None
        try:
            # (batch, width), left-padded
            enc = inner.encode([r.prompt for r in batch], first.add_special_tokens)
            prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
            tok = inner.lm.tokenizer
            rows = [_Row(r, p, tok, self._end_ids) for r, p in zip(batch, prompt_tokens, strict=True)]
            self._rows = rows
            s = self._stats
            self._stats = BatchStats(s.batches + 1, s.rows + len(rows), max(s.largest_batch, len(rows)))
            greedy = dataclasses.replace(first.settings, temperature=0.0)  # rows sample in _RowSampler
            kwargs = {
                **inner.generate_kwargs(greedy, stops=()),  # stop strings differ per row: _Row
                "max_new_tokens": max(r.settings.max_new_tokens for r in batch),
                "logits_processor": LogitsProcessorList(
                    [_RowSampler([r.settings for r in batch], inner.lm.device)]
                ),
                "stopping_criteria": StoppingCriteriaList([_BatchStep(rows, self._closed)]),
            }
            with inner.seeded(first.settings.seed):
                inner.lm.model.generate(**enc, **kwargs)
        except BaseException as e:  # re-raised in each consumer's thread
            error = e
        finally:
            self._rows = []
        if error is None and self._closed.is_set():
            error = EngineClosedError("the engine was closed while this request ran")
        if error is None:  # generate stopped early on its own (e.g. at the model's context length)
            for row in rows:
                if not row.done:
                    row.end(cancelled=False)
        for request in batch:
            if not request.ended:
                _fail(request, error or RuntimeError("generate() ended before this row began"))


def _wait_all(streams: list[BatchedStream]) -> list[Completion]:
    """Every stream's completion; if one fails (or Ctrl-C), the rest are cancelled, not left to
    generate answers nobody will read."""
    try:
        return [s.wait() for s in streams]
    except BaseException:
        for s in streams:
            with contextlib.suppress(Exception):  # the same failure, again
                s.cancel()
        raise


def _fail(request: _Request, error: BaseException) -> None:
    request.ended = True
    request.out.put(_Failed(error, time.perf_counter()))


# ---------------------------------------------------------------------------------------------
# The consumer's side


class BatchedStream:
    """One answer as its batch generates it (the `Stream` interface). Iterate for text pieces;
    after the loop (or `cancel()`), `completion` and `elapsed_s` hold the totals, `queue_s` how
    long it waited for its batch, and `first_token_s` when its first text arrived."""

    def __init__(self, engine: BatchingEngine, request: _Request):
        self._engine, self._request = engine, request
        self.completion: Completion | None = None
        self.elapsed_s = 0.0
        self.queue_s: float | None = None  # submit -> its batch's generate() began
        self.first_token_s: float | None = None  # submit -> its first non-empty piece
        self.cancelled = False
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for item in self._items():
                if isinstance(item, str):
                    yield item
                else:
                    self._end(item)
                    return
        finally:  # a consumer that stops reading without cancel() frees its row all the same
            if self.completion is None and self._error is None:
                self.cancel()

    def wait(self) -> Completion:
        """The completion, once the answer has ended (its pieces unread)."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion

    def cancel(self) -> None:
        """Stop this answer: its row ends at the batch's next step (or now, if its batch has not
        started), without waiting for the rest of the batch."""
        if self.completion is not None or self._error is not None:
            return
        self.cancelled = True
        self._request.cancel.set()
        if self._engine._withdraw(self._request):
            tokens = self._engine.inner.count(self._request.prompt, self._request.add_special_tokens)
            self._end(_End([], tokens, True, time.perf_counter()))
            return
        for item in self._items():
            if not isinstance(item, str):
                self._end(item)
                return

    def _items(self) -> Iterator[str | _End | _Failed]:
        """The worker's messages until the end, waiting in short slices: Python runs a pending
        Ctrl-C handler only when the main thread runs, never while it is blocked on a queue."""
        if self._error is not None:
            raise self._error
        if self.completion is not None:
            return
        while True:
            try:
                item = self._request.out.get(timeout=0.1)
            except queue.Empty:
                # cancel() from another thread may have taken the end while this one waited
                if self.completion is not None or self._error is not None:
                    return
                continue
            yield item
            if not isinstance(item, str):
                return

    def _end(self, item: _End | _Failed) -> None:
        r = self._request
        self.elapsed_s = item.ended_at - r.submitted_at
        if r.started_at is not None:
            self.queue_s = r.started_at - r.submitted_at
        if r.first_piece_at is not None:
            self.first_token_s = r.first_piece_at - r.submitted_at
        if isinstance(item, _Failed):
            self._error = item.error
            raise item.error
        done = self._engine.inner.finish(item.ids, r.settings.max_new_tokens, r.stops, item.prompt_tokens)
        if self.cancelled or item.cancelled:
            done = Completion(done.text, FinishReason.CANCELLED, done.prompt_tokens, done.completion_tokens)
        self.completion = done
