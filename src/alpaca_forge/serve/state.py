"""What the routes share, and the gate every route passes first.

`ServerState` holds the model (once loaded), the keys, limits and queue, the metrics and the
request log. `ServerState.admit(request, door)` is the one gate: every route declares a `Door`
saying which of its checks apply, in this order:

    API key (401) -> loopback Host and Origin when there are no keys (403) -> model loaded (503)
    -> rate limit (429)

The page, its files, /health and /metrics take no key (a browser opens the page before it knows
one; a supervisor and Prometheus probe without one) but still answer only loopback names on a
server without keys, so a DNS-rebinding page reads nothing.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .backend import Backend
from .config import ServeConfig
from .gate import OPEN, Admission, Keys, RateLimiter, check_loopback
from .protocol import ApiError
from .telemetry import Metrics, RequestLog, RequestRecord


@dataclass(frozen=True)
class Door:
    """Which of the gate's checks a route takes (the loopback rule applies to every route)."""

    key: bool = False  # the API key, when the server has keys
    ready: bool = False  # the model loaded (503 before)
    endpoint: str | None = None  # rate-limited, logged and counted under this name; None: neither


@dataclass
class Admitted:
    """A request the gate let in."""

    started: float  # time.perf_counter() at arrival: latency and time to first token count from it
    backend: Backend | None  # None where the door does not need the model
    rec: RequestRecord | None  # the request log's line, for a door with an endpoint


class ServerState:
    """Everything the routes share. `backend` is None until the model has loaded."""

    def __init__(
        self, config: ServeConfig, *, content_filter: Any = None, request_log: RequestLog | None = None
    ):
        self.config = config
        self.backend: Backend | None = None
        self.load_error: str | None = None
        self.keys = Keys.from_settings(config.api_key, config.api_keys_file)
        self.limiter = RateLimiter(config.rate_limit_rpm)
        self.admission = Admission(config.max_queue)
        self.metrics = Metrics()
        self.metrics.queue_depth.set_function(lambda: self.admission.waiting)
        self.metrics.running.set_function(lambda: self.admission.running)
        self.filter = content_filter
        self.log = request_log or RequestLog(None, log_text=False)
        self._count_pool = ThreadPoolExecutor(4, thread_name_prefix="serve-count")
        self._check_pool = ThreadPoolExecutor(config.max_queue + 4, thread_name_prefix="serve-check")

    async def counting(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Tokenizing, off the event loop, in a pool of its own: quick, and never stuck behind
        a slow moderation call."""
        return await asyncio.get_running_loop().run_in_executor(
            self._count_pool, functools.partial(fn, *args)
        )

    async def checking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A content-filter check (a moderation URL or a judge may take seconds), in its own pool,
        one thread per request the queue admits."""
        return await asyncio.get_running_loop().run_in_executor(
            self._check_pool, functools.partial(fn, *args, **kwargs)
        )

    def close(self) -> None:
        self._count_pool.shutdown(wait=False, cancel_futures=True)
        self._check_pool.shutdown(wait=False, cancel_futures=True)

    def loaded(self, backend: Backend) -> None:
        self.backend = backend
        self.metrics.model_info.labels(backend.name, backend.fingerprint, backend.prompt_format).set(1)

    def ready(self) -> Backend:
        if self.backend is None:
            if self.load_error:
                raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
            raise ApiError(503, "the model is still loading; retry shortly", code="loading", retry_after_s=5)
        return self.backend

    def admit(self, request: Any, door: Door) -> Admitted:
        """The gate: the checks `door` names, in the order of the module's docstring, or the
        ApiError of the first that fails (logged and counted when the door has an endpoint)."""
        started = time.perf_counter()
        rec = RequestRecord(door.endpoint) if door.endpoint else None
        try:
            key_id = self.keys.client_of(request.headers.get("authorization")) if door.key else OPEN
            if rec is not None:
                rec.key_id = key_id
            if not (self.keys.required or self.config.insecure_no_auth):
                check_loopback(request.headers.get("host"), request.headers.get("origin"))
            backend = self.ready() if door.ready else None
            if door.endpoint:
                self.limiter.take(key_id)
        except ApiError as e:
            if rec is not None:
                rec.status, rec.error = e.status, e.message
                self.finish(rec, started)
            raise
        return Admitted(started, backend, rec)

    def identity_headers(self) -> dict[str, str]:
        return {"x-model-id": self.backend.model_id} if self.backend else {}

    def finish(self, rec: RequestRecord, started: float) -> None:
        rec.latency_s = time.perf_counter() - started
        m = self.metrics
        m.requests.labels(rec.endpoint, str(rec.status)).inc()
        m.prompt_tokens.inc(rec.prompt_tokens)
        m.completion_tokens.inc(rec.completion_tokens)
        m.latency.observe(rec.latency_s)
        if rec.ttft_s is not None:
            m.ttft.observe(rec.ttft_s)
        if rec.queue_s is not None:
            m.queue_time.observe(rec.queue_s)
        for hit in rec.filter_hits:
            for category in hit["categories"] or ["unspecified"]:
                m.filter_hits.labels(category, hit["stage"], hit["source"]).inc()
        self.log.write(rec)
