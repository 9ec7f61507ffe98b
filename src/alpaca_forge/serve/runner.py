"""`alpaca-forge serve`: start the server, load the model behind it, serve until stopped.

The socket is bound first and the model loaded after, in a thread, so /health answers 503
("loading") at once and 200 when the model is ready; a supervisor (or `start().wait_ready()`)
waits on that. Settings that are wrong (a keys file, a rules file, a busy port, a public address
without a key) fail before anything listens.

    with start(ServeConfig(port=0)) as server:       # in Python, e.g. in a test or a notebook
        server.wait_ready()
        openai.OpenAI(base_url=server.api_url, api_key="-").chat.completions.create(...)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import UserError
from ..core.files import check_output
from ..core.net import BackgroundServer, bind_listener, until_interrupted
from ..engines import Engine, EngineConfig, open_engine
from .backend import Backend, open_backend, serving_engine
from .config import LOOPBACK_HOSTS, ServeConfig
from .telemetry import RequestLog

log = logging.getLogger("alpaca_forge")


@dataclass(frozen=True)
class ServeResult:
    url: str
    model: str | None  # name@fingerprint, None if it never loaded
    requests: int  # requests answered (any status)
    elapsed_s: float


def _judge(cfg: ServeConfig) -> Engine | None:
    f = cfg.content_filter
    if not (f.filter and f.judge_model):
        return None
    engine = "openai" if f.judge_base_url else "transformers"
    judge_cfg = EngineConfig(
        engine=engine,
        model=f.judge_model,
        base_url=f.judge_base_url,
        api_key_env=f.judge_api_key_env,
        timeout_s=f.filter_timeout_s,
        max_retries=1,
        device=cfg.engine.device,
        dtype=cfg.engine.dtype,
    )
    return open_engine(judge_cfg)


class RunningServer:
    """A server started by `start()`: its address, its state, `wait_ready()` and `stop()`."""

    def __init__(self, config: ServeConfig, engine: Engine | Callable[[], Engine] | None):
        from .app import create_app
        from .state import ServerState

        self.config = config
        self.started = time.perf_counter()
        if config.content_filter.filter:
            from ..content_filter import load_rules

            load_rules(config.content_filter.filter_rules)  # a bad rules file fails now, not after loading
        log_path = check_output(config.request_log, flag="--request-log") if config.request_log else None
        self.state = ServerState(config, request_log=RequestLog(log_path, log_text=config.log_text))
        self._http = BackgroundServer(
            create_app(self.state),
            bind_listener(config.host, config.port),
            name="serve",
            keep_alive_s=30,
            graceful_shutdown_s=5,
        )  # --request-log is the access log, with tokens and timings: uvicorn's is off
        self.url = self._http.url
        self._loader = threading.Thread(target=self._load, args=(engine,), name="serve-load", daemon=True)
        self._owned: list[Any] = []
        self._ready = threading.Event()
        self._loader.start()

    @property
    def api_url(self) -> str:
        return self.url + "/v1"

    def _load(self, engine: Any) -> None:
        cfg = self.config
        try:
            if cfg.content_filter.filter:
                from ..content_filter import build_filter

                judge = _judge(cfg)
                if judge is not None:
                    self._owned.append(judge)
                self.state.filter = build_filter(cfg.content_filter, judge)
                if self.state.filter is not None:
                    self._owned.append(self.state.filter)
            if engine is None:
                backend = open_backend(
                    cfg.engine,
                    served_name=cfg.served_model_name,
                    max_batch_size=cfg.max_batch_size,
                    batch_wait_s=cfg.batch_wait_ms / 1000,
                    defaults=cfg.sampling_defaults,
                )
                self._owned.append(backend)
            else:
                if callable(engine):  # a factory (no engine is callable): load in this thread
                    engine = engine()
                    self._owned.append(engine)
                served = serving_engine(
                    engine, max_batch_size=cfg.max_batch_size, batch_wait_s=cfg.batch_wait_ms / 1000
                )
                backend = Backend(
                    served,
                    served_name=cfg.served_model_name,
                    defaults=cfg.sampling_defaults,
                )
                if backend.engine is not engine:
                    self._owned.append(backend)  # our batching wrapper, not the caller's engine
            self.state.loaded(backend)
        except Exception as e:
            self.state.load_error = str(e)
            log.error("the model failed to load: %s", e)
        finally:
            self._ready.set()

    def wait_ready(self, timeout_s: float | None = None) -> RunningServer:
        """Block until the model is loaded; a load failure raises it (as a UserError)."""
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the model did not load within {timeout_s} s")
        if self.state.load_error:
            raise UserError(
                f"the model failed to load: {self.state.load_error}", "check --model and --engine"
            )
        self._http.wait_started()
        return self

    @property
    def running(self) -> bool:
        return self._http.running

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C in the caller's thread raises KeyboardInterrupt)."""
        self._http.wait()

    def stop(self) -> ServeResult:
        self._http.stop()
        self._loader.join(60)
        for thing in reversed(self._owned):
            with contextlib.suppress(Exception):
                thing.close()
        self.state.log.close()
        self.state.close()
        backend = self.state.backend
        total = sum(
            s.value
            for m in self.state.metrics.requests.collect()
            for s in m.samples
            if s.name.endswith("_total")
        )
        return ServeResult(
            self.url, backend.model_id if backend else None, int(total), time.perf_counter() - self.started
        )

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start(config: ServeConfig, *, engine: Engine | Callable[[], Engine] | None = None) -> RunningServer:
    """Listen now and load the model in the background. `engine` serves an already open one
    (left open at stop: it is the caller's), or is called in the background to open one (closed
    at stop); None opens the one `config.engine` names."""
    return RunningServer(config, engine)


def run(config: ServeConfig, *, engine: Engine | None = None, progress: bool = True) -> ServeResult:
    """Serve until Ctrl-C (or SIGTERM); the result counts what was served."""
    server = start(config, engine=engine)
    try:  # whenever Ctrl-C comes, from here on the server is stopped (a live one keeps the process up)
        log.info("listening on %s (chat page: %s/, API: %s)", server.url, server.url, server.api_url)
        if config.host not in LOOPBACK_HOSTS:
            log.info(
                "reachable from other machines; %s",
                "API keys required" if server.state.keys.required else "NO API key",
            )

        def serve_when_ready() -> None:
            server.wait_ready()
            log.info("ready: %s", server.state.backend.model_id if server.state.backend else "?")
            server.wait()

        until_interrupted(serve_when_ready)
    finally:
        result = server.stop()
    return result
