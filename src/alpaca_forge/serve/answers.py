"""Engine streams, consumed from the event loop.

Engines are blocking (a model's generate(), an HTTP read), so each answer is pulled by a thread
of its own that hands pieces to the event loop through an asyncio queue. The loop never waits on
the engine: a deadline, a client that goes away, or a filter hit cancels the stream at once
(`Stream.cancel()`, which stops the engine generating for it) and frees the request's slot.

The output filter runs in those threads too, on each piece before it is handed over, so a slow
moderation layer never stalls the loop and a flagged piece is never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..engines import Completion, Stream

log = logging.getLogger("alpaca_forge")


@dataclass
class Event:
    index: int  # which answer (a request may ask for n of them)
    kind: str  # "piece" | "done" | "blocked" | "error"
    text: str = ""
    completion: Completion | None = None
    verdict: Any = None  # the filter's verdict, when blocked
    error: BaseException | None = None


class Answers:
    """Several answers (n choices, or several prompts) generated side by side; iterate for their
    events in the order they happen. `cancel()` stops all that are still going."""

    def __init__(
        self,
        starts: list[Callable[[], Stream]],
        *,
        checker: Callable[[], Any] | None = None,
        deadline: float,
    ):
        self.starts, self.checker, self.deadline = starts, checker, deadline
        self.streams: list[Stream | None] = [None] * len(starts)
        self.completions: list[Completion | None] = [None] * len(starts)  # as each answer ended
        self._running = 0  # pulling threads started and not yet finished
        self._settled: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # None in the queue: the answers were cancelled, so no more events will come
        self._queue: asyncio.Queue[Event | None] | None = None

    async def events(self) -> AsyncIterator[Event]:
        """Every answer's events; raises TimeoutError when the deadline passes (answers cancelled).
        Ends at once, without the answers' last events, once `cancel()` was called."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        if self._cancelled.is_set():  # cancelled before the queue existed, so no None will come
            return
        for i, start in enumerate(self.starts):
            with self._lock:
                self._running += 1
            threading.Thread(target=self._pull, args=(i, start), name=f"answer-{i}", daemon=True).start()
        left = len(self.starts)
        try:
            while left:
                remaining = self.deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError
                event = await asyncio.wait_for(self._queue.get(), remaining)
                if event is None:  # a cancelled answer's thread stops without an event of its own
                    return
                if event.kind != "piece":
                    left -= 1
                yield event
        finally:
            if left:
                self.cancel()

    def cancel(self) -> None:
        """Stop every answer still going (from any thread; returns at once). Once is enough: an
        answer whose stream starts later cancels itself on seeing the flag."""
        with self._lock:
            if self._cancelled.is_set():
                return
            self._cancelled.set()
        # wake the reader: else a client that dropped a non-streamed request would hold its
        # queue slot until the deadline, waiting for events that no thread will send
        self._emit(None)
        streams = [s for s in self.streams if s is not None]
        if streams:
            threading.Thread(target=lambda: [_quietly_cancel(s) for s in streams], daemon=True).start()

    @property
    def queue_s(self) -> float | None:
        """How long the first answer waited for the engine (engines that queue say; None otherwise)."""
        waits = [s.queue_s for s in self.streams if s is not None and s.queue_s is not None]
        return min(waits) if waits else None

    def when_settled(self, callback: Callable[[], None]) -> None:
        """Run `callback` once every answer has ended (now, if they have): a cancelled answer's
        token count is known only after the engine has stopped it."""
        with self._lock:
            if self._running:
                self._settled.append(callback)
                return
        callback()

    def _pull(self, index: int, start: Callable[[], Stream]) -> None:
        try:
            self._pull_one(index, start)
        finally:
            stream = self.streams[index]
            self.completions[index] = stream.completion if stream is not None else None
            with self._lock:
                self._running -= 1
                callbacks = self._settled if not self._running else []
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # a log that cannot be written must not take the answer with it
                    log.exception("logging a request failed")

    def _pull_one(self, index: int, start: Callable[[], Stream]) -> None:
        try:
            check = self.checker() if self.checker else None
            stream = start()
            self.streams[index] = stream
            if self._cancelled.is_set():
                stream.cancel()
            for piece in stream:
                verdict = check.push(piece) if check else None
                if verdict is not None:
                    stream.cancel()
                    self._emit(Event(index, "blocked", completion=stream.completion, verdict=verdict))
                    return
                self._emit(Event(index, "piece", piece))
                if self._cancelled.is_set():
                    break
            if self._cancelled.is_set():  # nobody reads this answer now: no last filter check
                stream.cancel()
                return
            verdict = check.end() if check else None
            if verdict is not None:
                self._emit(Event(index, "blocked", completion=stream.completion, verdict=verdict))
                return
            self._emit(Event(index, "done", completion=stream.completion))
        except BaseException as e:  # handed to the loop, which answers with an error
            if self._cancelled.is_set():
                log.warning("an answer failed after its request ended: %s: %s", type(e).__name__, e)
            self._emit(Event(index, "error", error=e))

    def _emit(self, event: Event | None) -> None:
        loop, queue = self._loop, self._queue
        if loop is None or queue is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
            loop.call_soon_threadsafe(queue.put_nowait, event)


def _quietly_cancel(stream: Stream) -> None:
    with contextlib.suppress(Exception):
        stream.cancel()
