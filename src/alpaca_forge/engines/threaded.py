"""`ThreadStream`: one answer generated in a worker thread and read piece by piece, the `Stream`
of both in-process engines (transformers, llama.cpp).

    engine: work(put, stop) in a worker thread -> text pieces on a queue -> the reader's thread:
            stop strings cut (`AnswerPieces`) -> pieces out -> finish(work's result) -> completion

The reader waits on the queue in 0.1 s slices: Python runs a pending Ctrl-C handler only when the
main thread runs, never while it is blocked on a queue, and a server notices a client that went
away. The worker is told to stop (`stop` is set) when a stop string shows, when the reader
leaves early, or on `cancel()`; the engine's `work` checks it between tokens.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from .base import AnswerPieces, Completion, FinishReason

Result = TypeVar("Result")
Put = Callable[[str], None]  # hands one text piece to the reader


class ThreadStream(Generic[Result]):
    """One answer from `work(put, stop)`, run in a worker thread; `finish(result)` reads the
    engine's totals from what `work` returned. `show=False` reads to the end without giving
    pieces out (a whole answer, `complete`/`chat`, run the same way)."""

    def __init__(
        self,
        work: Callable[[Put, threading.Event], Result],
        finish: Callable[[Result], Completion],
        stops: Sequence[str],
        *,
        show: bool = True,
    ):
        self.completion: Completion | None = None
        self.elapsed_s = 0.0
        self.queue_s: float | None = None  # one answer, one worker: nothing to wait for
        self.cancelled = False
        self._finish_with = finish
        self._out = AnswerPieces(stops)
        self._show = show
        self._stop = threading.Event()
        self._pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # text, then None
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._done_reading = False
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[Put, threading.Event], Result]) -> None:
        try:
            self._result = work(self._pieces.put, self._stop)
        except BaseException as e:  # re-raised in the reader's thread
            self._error = e
        self._pieces.put(None)

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._shown()
        finally:  # left early (a break, Ctrl-C, a closed generator): stop the worker
            if self.completion is None and not self._done_reading:
                self._stop.set()
        self._finish()

    def _shown(self) -> Iterator[str]:
        while True:
            try:
                piece = self._pieces.get(timeout=0.1)  # wake now and then: Ctrl-C runs between
            except queue.Empty:
                continue
            if piece is None:
                break
            if not self._show:
                continue
            shown = self._out.push(piece)
            if shown:
                yield shown
            if self._out.stopped:
                self._stop.set()  # the worker may not have seen the stop string yet
                break
        self._done_reading = True
        if self._show:
            tail = self._out.end()
            if tail:
                yield tail

    def cancel(self) -> None:
        """Stop generating (from the reader's thread, e.g. on Ctrl-C) and wait for the worker."""
        self.cancelled = True
        self._stop.set()
        self._finish()

    def _finish(self) -> None:
        if self.completion is not None:
            return
        self._thread.join()
        self.elapsed_s = time.perf_counter() - self._start
        if self._error is not None:
            raise self._error
        done = self._finish_with(self._result)  # type: ignore[arg-type]  # set when no error
        if self.cancelled:
            done = Completion(done.text, FinishReason.CANCELLED, done.prompt_tokens, done.completion_tokens)
        elif self._out.stopped:
            done = Completion(done.text, FinishReason.STOP, done.prompt_tokens, done.completion_tokens)
        self.completion = done
