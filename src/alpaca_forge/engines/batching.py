"""Micro-batching for the in-process engine: concurrent requests share one `generate()`.

A server's threads each ask for one answer; run one after another, a model on one device answers
them no faster than it answers one. `BatchingEngine` queues every request, and one worker thread
runs the waiting ones that can share a decoding loop (same sampling settings) as ONE left-padded
`model.generate()`, the requests' rows demultiplexed step by step:

    submit -> pending (FIFO) -> worker: gather compatible requests for `wait_s` -> encode (padded)
           -> generate(stopping_criteria=[BatchStep]) -> each step, per row: token -> text piece
           -> stop check -> the row's queue -> its consumer (`BatchedStream`)

Each row ends on its own (EOS, its own `max_new_tokens`, a stop string, or `cancel()`); the batch
ends when every row has. A request that arrives while a batch runs waits for that batch to end:
this is micro-batching, not continuous batching (rows cannot join a running loop).

Greedy and sampled requests share a batch whatever their temperature, top_p and seed: each row
samples with its own settings and its own seeded generator (`batch_rows.RowSampler`), so a sampled answer
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
from dataclasses import dataclass

from ..core.prompts import Message
from .base import Completion, FinishReason, GenerationSettings, ModelIdentity, SamplingDefaults
from .batch_rows import BatchStep, End, Failed, Request, Row, RowSampler
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
    (`RowSampler`), so greedy and sampled requests, a chat page's included, share a batch."""
    return (add_special_tokens, settings.repetition_penalty)


# ---------------------------------------------------------------------------------------------
# The engine


class BatchingEngine:
    """The Engine interface over a `TransformersEngine`, whose concurrent requests are batched.

    `complete` and `chat` submit each prompt as its own request (so they batch with other callers'
    too) and wait for all; `stream` and `stream_prompt` give one answer piece by piece.
    Rendering, counting and the model's identity are the wrapped engine's.
    """

    upstream = False
    last_retries = 0

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
        self._pending: list[Request] = []
        self._closed = threading.Event()
        self._rows: list[Row] = []  # the running batch (replaced, never mutated, by the worker)
        self._stats = BatchStats()
        self._end_ids = engine.end_token_ids  # see `Row.take`
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
        special = self.inner.prompt_format.add_special_tokens
        return self._submit(prompt, special, self.inner.stop_strings(settings), settings)

    def stream_prompt(self, prompt: str, settings: GenerationSettings) -> BatchedStream:
        """A raw prompt continued, stopped only at `settings.stop` (as `complete`)."""
        return self._submit(prompt, True, settings.stop, settings)

    def render(self, conversation: Sequence[Message], max_new_tokens: int) -> str:
        return self.inner.render(conversation, max_new_tokens)

    def count_tokens(self, text: str, *, chat: bool) -> int:
        """Tokens the model reads for a prompt: a rendered conversation (`chat`) or a raw one."""
        return self.inner.count_tokens(text, chat=chat)

    @property
    def context_tokens(self) -> int | None:
        return self.inner.context_tokens

    def identity(self) -> ModelIdentity:
        return self.inner.identity()

    def generation_defaults(self) -> SamplingDefaults:
        return self.inner.generation_defaults()

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
        request = Request(prompt, add_special_tokens, tuple(stops), settings, key)
        with self._cond:
            if self._closed.is_set():
                raise EngineClosedError("the engine is closed")
            self._pending.append(request)
            self._cond.notify()
        return BatchedStream(self, request)

    def withdraw(self, request: Request) -> bool:
        """Take a request that has not started out of the queue; False if it has started."""
        with self._cond:
            if request in self._pending:
                self._pending.remove(request)
                return True
            return False

    def _next_batch(self) -> list[Request] | None:
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

    def _compatible(self, key: tuple) -> list[Request]:
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

    def _run(self, batch: list[Request]) -> None:
        """One generate() over the batch; every request ends with an End or a Failed."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        inner, first = self.inner, batch[0]
        rows: list[Row] = []
        error: BaseException | None = None
        try:
            # (batch, width), left-padded
            enc = inner.encode([r.prompt for r in batch], first.add_special_tokens)
            prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
            tok = inner.lm.tokenizer
            rows = [Row(r, p, tok, self._end_ids) for r, p in zip(batch, prompt_tokens, strict=True)]
            self._rows = rows
            s = self._stats
            self._stats = BatchStats(s.batches + 1, s.rows + len(rows), max(s.largest_batch, len(rows)))
            greedy = dataclasses.replace(first.settings, temperature=0.0)  # rows sample in RowSampler
            kwargs = {
                **inner.generate_kwargs(greedy, stops=()),  # stop strings differ per row: Row
                "max_new_tokens": max(r.settings.max_new_tokens for r in batch),
                "logits_processor": LogitsProcessorList(
                    [RowSampler([r.settings for r in batch], inner.lm.device)]
                ),
                "stopping_criteria": StoppingCriteriaList([BatchStep(rows, self._closed)]),
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


def _fail(request: Request, error: BaseException) -> None:
    request.ended = True
    request.out.put(Failed(error, time.perf_counter()))


# ---------------------------------------------------------------------------------------------
# The consumer's side


class BatchedStream:
    """One answer as its batch generates it (the `Stream` interface). Iterate for text pieces;
    after the loop (or `cancel()`), `completion` and `elapsed_s` hold the totals, `queue_s` how
    long it waited for its batch, and `first_token_s` when its first text arrived."""

    def __init__(self, engine: BatchingEngine, request: Request):
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
        if self._engine.withdraw(self._request):
            tokens = self._engine.inner.count(self._request.prompt, self._request.add_special_tokens)
            self._end(End([], tokens, True, time.perf_counter()))
            return
        for item in self._items():
            if not isinstance(item, str):
                self._end(item)
                return

    def _items(self) -> Iterator[str | End | Failed]:
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

    def _end(self, item: End | Failed) -> None:
        r = self._request
        self.elapsed_s = item.ended_at - r.submitted_at
        if r.started_at is not None:
            self.queue_s = r.started_at - r.submitted_at
        if r.first_piece_at is not None:
            self.first_token_s = r.first_piece_at - r.submitted_at
        if isinstance(item, Failed):
            self._error = item.error
            raise item.error
        done = self._engine.inner.finish(item.ids, r.settings.max_new_tokens, r.stops, item.prompt_tokens)
        if self.cancelled or item.cancelled:
            done = Completion(done.text, FinishReason.CANCELLED, done.prompt_tokens, done.completion_tokens)
        self.completion = done
