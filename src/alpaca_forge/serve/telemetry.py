"""What the server tells its operators: Prometheus metrics at /metrics and a JSONL request log.

Each server has its own metrics registry (not prometheus-client's global one), so two servers in
one process (a gateway and the server behind it, or tests) count separately.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..core.files import open_append

log = logging.getLogger("alpaca_forge")

# Latency buckets, in seconds: a token on a CPU takes ~30 ms, a long answer a minute.
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "alpaca_forge_requests",
            "Requests answered, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("alpaca_forge_prompt_tokens", "Prompt tokens read", registry=r)
        self.completion_tokens = Counter("alpaca_forge_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "alpaca_forge_time_to_first_token_seconds",
            "From the request's arrival to its first answer token",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "alpaca_forge_inter_token_seconds",
            "Between two streamed pieces of one answer",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "alpaca_forge_request_seconds",
            "From arrival to the last byte",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "alpaca_forge_queue_seconds",
            "From admission until generation started",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "alpaca_forge_queue_depth", "Requests admitted and waiting for the engine", registry=r
        )
        self.running = Gauge("alpaca_forge_running_requests", "Requests being generated now", registry=r)
        self.filter_hits = Counter(
            "alpaca_forge_filter_hits",
            "Prompts and answers the content filter blocked, by category, where (input/output) and layer",
            ["category", "stage", "source"],
            registry=r,
        )
        self.model_info = Gauge(
            "alpaca_forge_model_info",
            "The model served (always 1)",
            ["model", "fingerprint", "prompt_format"],
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class RequestRecord:
    """One line of the request log (and the source of a request's metrics)."""

    endpoint: str
    key_id: str = ""
    model: str = ""
    status: int = 200
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float | None = None  # None: the engine does not queue (a server behind us queues itself)
    ttft_s: float | None = None  # from arrival
    latency_s: float = 0.0
    finish_reason: str | None = None
    filter_hits: list[dict[str, Any]] = field(default_factory=list)  # {stage, source, categories}
    error: str | None = None
    prompt: Any = None  # only with --log-text
    answer: Any = None
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds"))


class RequestLog:
    """Appends one JSON line per request, flushed at once (a killed server loses none it wrote)."""

    def __init__(self, path: Path | None, *, log_text: bool):
        self.log_text = log_text
        self._file = open_append(path, "--request-log", private=True) if path else None
        self._lock = threading.Lock()

    def write(self, record: RequestRecord) -> None:
        if self._file is None:
            return
        data = asdict(record)
        row = {"time": data.pop("time"), **data}  # every field on every line (null: not known)
        if not self.log_text:
            row.pop("prompt", None)
            row.pop("answer", None)
        for k in ("queue_s", "ttft_s", "latency_s"):
            if isinstance(row.get(k), float):
                row[k] = round(row[k], 4)
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            with self._lock:
                self._file.close()
