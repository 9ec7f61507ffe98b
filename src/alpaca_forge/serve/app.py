"""The HTTP routes of `alpaca-forge serve`, in the order a request meets them.

    key (401) -> model loaded (503) -> rate limit (429) -> body: size (413), time (408), UTF-8 JSON (400)
    -> fields (400) -> model name (404) -> token limits (400) -> input filter (refusal)
    -> queue (429) -> engine, with the output filter on each piece -> answer or SSE stream
    -> request log and metrics

Every refusal is OpenAI's error shape with the right status, and nothing a client sends reaches
the engine before all of it was checked: one client's bad request costs the others nothing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..content_filter import refusal_text, request_text
from ..core.errors import UserError
from ..engines import Completion, GenerationSettings
from .answers import Answers, Event
from .backend import Backend
from .config import ServeConfig
from .gate import Admission, Keys, RateLimiter, Ticket
from .protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    ModerationRequest,
    envelope,
    finish_reason,
    new_id,
    parse,
    usage,
)
from .telemetry import Metrics, RequestLog, RequestRecord

log = logging.getLogger("alpaca_forge")
LOOPBACK_NAMES = {"127.0.0.1", "::1", "localhost"}
STATIC = resources.files("alpaca_forge.serve") / "static"


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

    def check_origin(self, request: Any) -> None:
        """Without keys, only this machine may ask, and not through a web page of another site:
        a request must be addressed to a loopback name (a DNS-rebinding page sends its own
        `Host`), and a browser's `Origin`, when sent, must be loopback too (cross-site `fetch`)."""
        if self.keys.required or self.config.insecure_no_auth:
            return
        host = (request.headers.get("host") or "").rpartition(":")[0] or request.headers.get("host", "")
        if host.strip("[]") not in LOOPBACK_NAMES:
            raise ApiError(
                403,
                f"this server has no API key, so it answers only requests to a loopback address, not Host {host[:80]!r}; "
                "start it with --api-key to serve other names",
                code="host_not_allowed",
            )
        origin = request.headers.get("origin")
        if origin and origin != "null" and (urlsplit(origin).hostname or "") not in LOOPBACK_NAMES:
            raise ApiError(
                403,
                f"cross-site request from {origin[:80]!r} refused: this server has no API key",
                code="origin_not_allowed",
            )

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


# ---------------------------------------------------------------------------------------------
# Reading a request


async def read_json(request: Any, max_bytes: int, timeout_s: float) -> Any:
    """The body as JSON: at most `max_bytes` (413), all of it within `timeout_s` (408, so a
    client that sends half a request and hangs holds nothing but its own connection)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > max_bytes:
            raise ApiError(
                413, f"the request body is {int(declared):,} bytes; this server takes at most {max_bytes:,}"
            )
    chunks: list[bytes] = []
    size = 0

    async def gather() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(
                    413, f"the request body is over {max_bytes:,} bytes, the most this server takes"
                )
            chunks.append(chunk)

    try:
        await asyncio.wait_for(gather(), timeout_s)
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {timeout_s:g} s", code="body_timeout"
        ) from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(
            400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ApiError(400, f"the request body cannot be read: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply to be read") from None


async def wait_for_disconnect(request: Any) -> None:
    """Returns when the client closes its connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _filter_info(stage: str, verdict: Any) -> dict[str, Any]:
    return {"flagged": True, "stage": stage, "source": verdict.source, "categories": list(verdict.categories)}


# ---------------------------------------------------------------------------------------------
# A request planned: what to generate, with which settings


class Plan:
    def __init__(self, rec: RequestRecord, req: Any, kind: str):
        self.rec, self.req, self.kind = rec, req, kind
        self.starts: list[Callable[[], Any]] = []
        self.prompt_tokens = 0
        self.blocked: Any = None  # the input filter's verdict, when it blocked the request
        self.filter_context = ""  # the prompt text an LLM judge reads beside an answer
        self.rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"


def _settings(
    state: ServerState, backend: Backend, req: Any, max_new: int, seed_offset: int
) -> GenerationSettings:
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    return GenerationSettings(
        max_new_tokens=max_new,
        temperature=req.temperature,
        top_p=req.top_p,
        repetition_penalty=req.repetition_penalty or backend.default_repetition_penalty,
        seed=(seed + seed_offset) % 2**63,
        stop=req.stops,
    )


def _max_new_tokens(state: ServerState, backend: Backend, req: Any, prompt_tokens: int | None) -> int:
    """The answer's token budget: what was asked (at most --max-tokens), else as much as the
    model's context leaves, at most --max-tokens. A prompt that leaves no room is a 400."""
    cap = state.config.max_tokens
    asked = req.asked_max_tokens
    if asked is not None and asked > cap:
        raise ApiError(400, f"max_tokens {asked} is more than this server allows ({cap})", param="max_tokens")
    if prompt_tokens is None:
        return asked or cap
    if prompt_tokens > state.config.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt is {prompt_tokens} tokens; this server takes at most {state.config.max_prompt_tokens}",
            param="messages" if isinstance(req, ChatRequest) else "prompt",
            code="context_length_exceeded",
        )
    context = backend.context_tokens
    if context is None:
        return asked or cap
    room = context - prompt_tokens
    if room < 1 or (asked is not None and asked > room):
        raise ApiError(
            400,
            f"the model's context is {context} tokens: the prompt ({prompt_tokens}) plus max_tokens "
            f"({asked or 1}) does not fit; shorten the prompt or ask for fewer tokens",
            param="max_tokens" if asked and room >= 1 else "messages",
            code="context_length_exceeded",
        )
    return asked or min(cap, room)


MAX_CHARS_PER_TOKEN = 16  # far above any tokenizer's average (~4 for English): a bound, not a count


def within_reach(conversation: list[Any], max_chars: int) -> list[Any]:
    """The conversation without the oldest turns that could never fit: the engine drops old turns
    until the prompt fits the model's context, tokenizing it again each time, so a client's 1 MB
    of history would cost it seconds of CPU. A last message that alone is too long is a 400."""
    system = [m for m in conversation if m.role == "system"]
    turns = [m for m in conversation if m.role != "system"]
    size = sum(len(m.content) for m in conversation)
    while len(turns) > 1 and size > max_chars:
        size -= len(turns.pop(0).content)
    if len(turns) < len(conversation) - len(system):
        while len(turns) > 1 and turns[0].role != "user":  # history starts with a question
            size -= len(turns.pop(0).content)
    if size > max_chars:
        raise ApiError(
            400,
            f"the prompt is {size:,} characters, more than this server reads ({max_chars:,}); shorten it",
            param="messages",
            code="context_length_exceeded",
        )
    return [*system, *turns]


async def plan_chat(state: ServerState, backend: Backend, req: ChatRequest, rec: RequestRecord) -> Plan:
    plan = Plan(rec, req, "chat")
    conversation = within_reach(req.conversation(), state.config.max_prompt_tokens * MAX_CHARS_PER_TOKEN)
    guess = req.asked_max_tokens or state.config.max_tokens
    tokens = await state.counting(backend.chat_prompt_tokens, conversation, guess)
    max_new = _max_new_tokens(state, backend, req, tokens)
    plan.prompt_tokens = tokens or 0
    if state.config.log_text:
        rec.prompt = [{"role": m.role, "content": m.content} for m in conversation]
    if state.filter is not None:
        text = plan.filter_context = request_text(conversation, last_user_only=not backend.engine.multi_turn)
        verdict = await state.checking(state.filter.check, text, role="user")
        if verdict.flagged:
            plan.blocked = verdict
            return plan
    for i in range(req.n):
        settings = _settings(state, backend, req, max_new, i)
        plan.starts.append(lambda s=settings: backend.chat_stream(conversation, s))
    return plan


async def plan_completion(
    state: ServerState, backend: Backend, req: CompletionRequest, rec: RequestRecord
) -> Plan:
    plan = Plan(rec, req, "text")
    prompts = req.prompts
    counts = [await state.counting(backend.raw_prompt_tokens, p) for p in prompts]
    budgets = [_max_new_tokens(state, backend, req, c) for c in counts]
    plan.prompt_tokens = sum(c or 0 for c in counts)
    if state.config.log_text:
        rec.prompt = prompts
    if state.filter is not None:
        for p in prompts:
            verdict = await state.checking(state.filter.check, p, role="user")
            if verdict.flagged:
                plan.blocked = verdict
                return plan
    for p, max_new in zip(prompts, budgets, strict=True):
        for i in range(req.n):
            settings = _settings(state, backend, req, max_new, i)
            plan.starts.append(lambda p=p, s=settings: backend.prompt_stream(p, s))
    return plan


# ---------------------------------------------------------------------------------------------
# Answering


def _engine_error(e: BaseException) -> ApiError:
    from ..engines.openai_http import EngineError

    if isinstance(e, ApiError):
        return e
    if isinstance(e, EngineError):
        status = 400 if e.status == 400 else 502
        return ApiError(
            status, f"the model server behind this one failed: {e.message}", code="upstream_error"
        )
    if isinstance(e, UserError):
        return ApiError(400, e.message)
    log.error("generation failed", exc_info=e)
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", code="internal_error")


class Responder:
    """Turns a plan's answers into one response (JSON) or a stream of chunks (SSE)."""

    def __init__(self, state: ServerState, backend: Backend, plan: Plan, started: float):
        self.state, self.backend, self.plan, self.started = state, backend, plan, started
        self.answers: Answers | None = None  # a JSON answer's, for logging once they settle
        self.refusal = state.config.content_filter.refusal
        self.deadline = started + state.config.request_timeout_s

    def _answers(self) -> Answers:
        f, context = self.state.filter, self.plan.filter_context
        checker = (lambda: f.output_checker(context=context)) if f is not None else None
        return Answers(self.plan.starts, checker=checker, deadline=self.deadline)

    def _body(self, choices: list[dict[str, Any]], completion_tokens: int) -> dict[str, Any]:
        p = self.plan
        body = self._head(p.object)
        body["choices"] = choices
        body["usage"] = usage(p.prompt_tokens, completion_tokens)
        return body

    def _choice(self, index: int, text: str, reason: str) -> dict[str, Any]:
        if self.plan.kind == "chat":
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
            }
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    def _record_tokens(self, completions: list[Completion | None]) -> int:
        done = [c for c in completions if c is not None]
        if self.backend.upstream or not self.plan.prompt_tokens:
            # A server behind us counted the prompts (we cannot): each prompt once, not per choice.
            n = getattr(self.plan.req, "n", 1)
            counted = sum(c.prompt_tokens for c in completions[::n] if c is not None)
            self.plan.prompt_tokens = max(self.plan.prompt_tokens, counted)
        self.plan.rec.prompt_tokens = self.plan.prompt_tokens
        return sum(c.completion_tokens for c in done)

    # -- one JSON response --------------------------------------------------------------------

    async def whole(self, request: Any, ticket: Ticket | None) -> dict[str, Any]:
        p, rec = self.plan, self.plan.rec
        if p.blocked is not None:
            rec.filter_hits.append(_filter_info("input", p.blocked))
            rec.finish_reason = "content_filter"
            choices = [self._choice(0, refusal_text(self.refusal, p.blocked), "content_filter")]
            body = self._body(choices, 0)
            body["content_filter"] = _filter_info("input", p.blocked)
            return body
        n = len(p.starts)
        texts, reasons = [""] * n, ["stop"] * n
        completions: list[Completion | None] = [None] * n
        answers = self.answers = self._answers()
        watch = asyncio.create_task(wait_for_disconnect(request))

        def _cancel_on_disconnect(_task: Any) -> None:  # a client that gave up frees its slot
            answers.cancel()

        watch.add_done_callback(_cancel_on_disconnect)
        last: dict[int, float] = {}
        try:
            async for ev in answers.events():
                self._timing(ev, answers, ticket, last)
                if ev.kind == "piece":
                    texts[ev.index] += ev.text
                elif ev.kind == "blocked":
                    completions[ev.index] = ev.completion
                    texts[ev.index], reasons[ev.index] = (
                        refusal_text(self.refusal, ev.verdict),
                        "content_filter",
                    )
                    rec.filter_hits.append(_filter_info("output", ev.verdict))
                elif ev.kind == "done":
                    completions[ev.index] = ev.completion
                    texts[ev.index] = ev.completion.text if ev.completion else texts[ev.index]
                    reasons[ev.index] = finish_reason(ev.completion) if ev.completion else "stop"
                else:
                    raise _engine_error(ev.error)
        except TimeoutError:
            raise ApiError(
                504,
                f"no answer within the deadline of {self.state.config.request_timeout_s:g} s",
                code="timeout",
            ) from None
        finally:
            watch.remove_done_callback(_cancel_on_disconnect)
            gone = watch.done() and not watch.cancelled()
            watch.cancel()
        if gone:  # the client left before its answer was ready: nobody reads this response
            rec.status, rec.finish_reason = 499, "cancelled"
        rec.completion_tokens = self._record_tokens(completions)
        rec.finish_reason = reasons[0] if n == 1 else ",".join(reasons)
        if self.state.config.log_text:
            rec.answer = texts[0] if n == 1 else texts
        body = self._body([self._choice(i, texts[i], reasons[i]) for i in range(n)], rec.completion_tokens)
        if rec.filter_hits:
            body["content_filter"] = rec.filter_hits[0]
        return body

    def _timing(self, ev: Event, answers: Answers, ticket: Ticket | None, last: dict[int, float]) -> None:
        rec = self.plan.rec
        now = time.perf_counter()
        if ev.kind == "piece":
            if rec.ttft_s is None:
                rec.ttft_s = now - self.started
                if ticket:
                    ticket.started()
            if ev.index in last:
                self.state.metrics.inter_token.observe(now - last[ev.index])
            last[ev.index] = now

    # -- a stream of server-sent events ---------------------------------------------------------

    def _head(self, kind: str) -> dict[str, Any]:
        """The fields every body and chunk of this request starts with."""
        p = self.plan
        return envelope(kind, p.rid, self.backend.name, self.backend.fingerprint, p.created)

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.plan.kind == "chat" else "text_completion"

    def _chunk(self, index: int, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        p = self.plan
        body = self._head(self._chunk_kind)
        if p.kind == "chat":
            body["choices"] = [{"index": index, "delta": delta, "finish_reason": reason}]
        else:
            body["choices"] = [
                {"index": index, "text": delta.get("content", ""), "logprobs": None, "finish_reason": reason}
            ]
        return body

    async def sse(self, ticket: Ticket | None) -> AsyncIterator[bytes]:
        p, rec = self.plan, self.plan.rec
        n = max(1, len(p.starts))
        completions: list[Completion | None] = [None] * n
        texts = [""] * n
        reasons: list[str] = ["stop"] * n
        answers = self._answers() if p.blocked is None else None
        last: dict[int, float] = {}
        rec.status = 200
        try:
            if p.kind == "chat":
                for i in range(n):
                    yield _event(self._chunk(i, {"role": "assistant", "content": ""}, None))
            if p.blocked is not None:
                info = _filter_info("input", p.blocked)
                rec.filter_hits.append(info)
                reasons[0] = "content_filter"
                yield _event(self._chunk(0, {"content": refusal_text(self.refusal, p.blocked)}, None))
                yield _event({**self._chunk(0, {}, "content_filter"), "content_filter": info})
            else:
                try:
                    async for ev in answers.events():
                        self._timing(ev, answers, ticket, last)
                        if ev.kind == "piece":
                            texts[ev.index] += ev.text
                            yield _event(self._chunk(ev.index, {"content": ev.text}, None))
                        elif ev.kind == "blocked":
                            info = _filter_info("output", ev.verdict)
                            rec.filter_hits.append(info)
                            completions[ev.index], reasons[ev.index] = ev.completion, "content_filter"
                            refusal = refusal_text(self.refusal, ev.verdict)
                            yield _event(
                                self._chunk(
                                    ev.index, {"content": ("\n\n" if texts[ev.index] else "") + refusal}, None
                                )
                            )
                            yield _event(
                                {**self._chunk(ev.index, {}, "content_filter"), "content_filter": info}
                            )
                        elif ev.kind == "done":
                            completions[ev.index] = ev.completion
                            reasons[ev.index] = finish_reason(ev.completion) if ev.completion else "stop"
                            yield _event(self._chunk(ev.index, {}, reasons[ev.index]))
                        else:
                            err = _engine_error(ev.error)
                            rec.status, rec.error = err.status, err.message
                            yield _event(err.body())
                            break
                except TimeoutError:
                    err = ApiError(
                        504,
                        f"the answer did not finish within the deadline of {self.state.config.request_timeout_s:g} s",
                        code="timeout",
                    )
                    rec.status, rec.error = 504, err.message
                    rec.finish_reason = "timeout"
                    yield _event(err.body())
            if ticket:  # the answers have ended: free the place before the last chunks go out
                ticket.leave()
            rec.completion_tokens = self._record_tokens(completions)
            if p.req.include_usage:
                tail = {**self._head(self._chunk_kind), "choices": []}
                yield _event({**tail, "usage": usage(p.prompt_tokens, rec.completion_tokens)})
            yield b"data: [DONE]\n\n"
            if rec.finish_reason is None:
                rec.finish_reason = reasons[0] if n == 1 else ",".join(reasons)
        except (asyncio.CancelledError, GeneratorExit):
            # the client went away mid-stream: its answers were cancelled by Answers.events()
            rec.status, rec.finish_reason = 499, "cancelled"
            raise
        finally:
            if answers is not None:
                answers.cancel()
            if ticket:
                ticket.leave()
            if self.state.config.log_text:
                rec.answer = texts[0] if n == 1 else texts
            self.log_when_settled(answers)

    def log_when_settled(self, answers: Answers | None) -> None:
        """Log and count the request once its answers have ended: the tokens of one that was
        cancelled (a client gone, a deadline passed) are known only then."""
        rec = self.plan.rec

        def log() -> None:
            if answers is not None:
                rec.completion_tokens = self._record_tokens(answers.completions)
                rec.queue_s = answers.queue_s
            self.state.finish(rec, self.started)

        if answers is None:
            log()
        else:
            answers.when_settled(log)


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


# ---------------------------------------------------------------------------------------------
# The application


def create_app(state: ServerState) -> Any:
    # No /docs: FastAPI's docs page loads its scripts from a CDN, and this server works offline.
    app = FastAPI(title="alpaca-forge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.forge = state
    cfg = state.config

    def error_response(e: ApiError) -> Any:
        headers = {**e.headers(), **state.identity_headers()}
        if e.status == 408:  # the client went quiet mid-body: this connection cannot go on
            headers["connection"] = "close"
        # (a 413 keeps the connection: the server reads and drops the rest of the body, so the
        # client, still sending, gets the answer instead of a reset)
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> Any:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return error_response(ApiError(exc.status_code, message))

    async def answer(request: Request, endpoint: str, model: type, planner: Any) -> Any:
        started = time.perf_counter()
        rec = RequestRecord(endpoint)
        ticket: Ticket | None = None
        responder: Responder | None = None
        streaming = False
        try:
            rec.key_id = state.keys.client_of(request.headers.get("authorization"))
            state.check_origin(request)
            backend = state.ready()
            state.limiter.take(rec.key_id)
            req = parse(model, await read_json(request, cfg.max_body_bytes, cfg.body_timeout_s))
            rec.model, rec.stream = req.model, req.stream
            if req.model not in backend.aliases:
                raise ApiError(
                    404,
                    f"the model {req.model[:100]!r} does not exist here; this server serves {backend.name!r}",
                    param="model",
                    code="model_not_found",
                )
            plan = await planner(state, backend, req, rec)
            rec.prompt_tokens = plan.prompt_tokens
            if plan.blocked is None:
                ticket = state.admission.enter(len(plan.starts))
            responder = Responder(state, backend, plan, started)
            headers = state.identity_headers()
            if req.stream:
                streaming = True
                headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
                return StreamingResponse(
                    responder.sse(ticket), media_type="text/event-stream", headers=headers
                )
            body = await responder.whole(request, ticket)
            rec.prompt_tokens = plan.prompt_tokens
            return JSONResponse(body, headers=headers)
        except Exception as e:  # a UserError is a 400; anything else a logged 500, in OpenAI's shape
            err = _engine_error(e)
            rec.status, rec.error = err.status, err.message
            return error_response(err)
        finally:
            if not streaming:
                if ticket:
                    ticket.leave()
                if responder is not None:
                    responder.log_when_settled(responder.answers)
                else:
                    state.finish(rec, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await answer(request, "chat/completions", ChatRequest, plan_chat)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer(request, "completions", CompletionRequest, plan_completion)

    @app.post("/v1/moderations")
    async def moderations(request: Request) -> Any:
        started = time.perf_counter()
        rec = RequestRecord("moderations")
        try:
            rec.key_id = state.keys.client_of(request.headers.get("authorization"))
            state.check_origin(request)
            state.ready()  # the filter (its judge, too) is set up with the model
            state.limiter.take(rec.key_id)
            req = parse(ModerationRequest, await read_json(request, cfg.max_body_bytes, cfg.body_timeout_s))
            if state.filter is None:
                raise ApiError(
                    404, "the content filter is off on this server (--no-filter)", code="filter_off"
                )
            ticket = state.admission.enter(1)  # a slow moderation layer holds a place like an answer
            try:
                results = await asyncio.wait_for(
                    state.checking(state.filter.moderations, req.texts), cfg.request_timeout_s
                )
            except TimeoutError:
                raise ApiError(
                    504, f"no verdict within {cfg.request_timeout_s:g} s", code="timeout"
                ) from None
            finally:
                ticket.leave()
            for r in results:
                if r.get("flagged"):
                    hit = [c for c, v in r.get("categories", {}).items() if v]
                    rec.filter_hits.append({"stage": "moderation", "source": "api", "categories": hit})
            return JSONResponse({"id": new_id("modr"), "model": "alpaca-forge-filter", "results": results})
        except Exception as e:
            err = _engine_error(e)
            rec.status, rec.error = err.status, err.message
            return error_response(err)
        finally:
            state.finish(rec, started)

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        try:
            state.keys.client_of(request.headers.get("authorization"))
            state.check_origin(request)
            backend = state.ready()
        except ApiError as e:
            return error_response(e)
        card = {
            "id": backend.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "alpaca-forge",
            "prompt_format": backend.prompt_format,
            "fingerprint": backend.fingerprint,
            "context_tokens": backend.context_tokens,
            "max_tokens": cfg.max_tokens,
        }
        return JSONResponse({"object": "list", "data": [card]}, headers=state.identity_headers())

    @app.get("/health")
    async def health() -> Any:
        if state.backend is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse(
                {"status": status, "error": state.load_error}, status_code=503, headers={"retry-after": "5"}
            )
        return JSONResponse({"status": "ok", "model": state.backend.model_id})

    @app.get("/metrics")
    async def metrics() -> Any:
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/")
    async def page() -> Any:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    async def static(name: str) -> Any:
        kinds = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png"}
        suffix = "." + name.rpartition(".")[2]
        item = STATIC / name
        if "/" in name or name.startswith(".") or suffix not in kinds or not item.is_file():
            return error_response(ApiError(404, "no such file"))
        return Response(item.read_bytes(), media_type=kinds[suffix])

    return app
