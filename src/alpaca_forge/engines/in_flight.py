"""Many conversations to one engine at its full concurrency, replies handed back as they come.

    chat_in_flight(engine, keys, messages_of, settings, batch_size) -> groups of (key, Completion)

A server (`engine.upstream`) keeps `batch_size` requests in flight all the time: each finished
one is replaced at once, and what came back is yielded (for the caller to cache) while the rest
are still out. A model in this process answers `batch_size` conversations per batched call. A
request a batch engine wrote for later (`BatchPending`) yields nothing: the caller asks again on
its next run. The judge (`judging.judge`) and the record scorer (`judging.score`) both ask so.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from ..core.prompts import Message
from .base import Completion, Engine, GenerationSettings
from .batch import BatchPending

K = TypeVar("K", bound=Hashable)


def chat_in_flight(
    engine: Engine,
    keys: Sequence[K],
    messages_of: Callable[[K], list[Message]],
    settings: GenerationSettings,
    batch_size: int,
) -> Iterator[list[tuple[K, Completion]]]:
    if not engine.upstream:
        for start in range(0, len(keys), batch_size):
            batch = keys[start : start + batch_size]
            yield list(zip(batch, engine.chat([messages_of(k) for k in batch], settings), strict=True))
        return
    pool = ThreadPoolExecutor(max_workers=batch_size, thread_name_prefix="in-flight")
    try:
        out = {pool.submit(lambda k=k: engine.chat([messages_of(k)], settings)[0]): k for k in keys}
        waiting = set(out)
        while waiting:
            done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            yield [(out[f], c) for f in done for c in _answered(f)]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _answered(future: Future) -> list[Completion]:
    """A request's reply, or none where a batch engine wrote it to be answered later."""
    try:
        return [future.result()]
    except BatchPending:
        return []
