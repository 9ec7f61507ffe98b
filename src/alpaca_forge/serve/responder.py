"""A planned request's answers, turned into the response.

One loop (`Responder.outcomes`) reads the answers' events and says what happened to each answer,
as typed outcomes: a piece of text, a refusal by the filter (of the prompt, or of an answer
midway), an answer finished, or the request failed (the engine's error, or the deadline). It
keeps the request's tally as it goes: texts, finish reasons, completions, filter hits, timings.
Two thin renderers write those outcomes: `whole()` as one JSON body, `sse()` as server-sent
events, chunk by chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from ..content_filter import refusal_text
from ..core.errors import UserError
from ..engines import Completion, EngineError
from .answers import Answers, Event
from .backend import Backend
from .gate import Ticket
from .planning import Plan
from .protocol import ApiError, envelope, finish_reason, usage
from .request_body import wait_for_disconnect
from .state import ServerState

log = logging.getLogger("alpaca_forge")


@dataclass(frozen=True)
class Piece:
    index: int  # which answer
    text: str


@dataclass(frozen=True)
class Refused:
    """The filter stopped an answer (stage "output") or the whole request (stage "input")."""

    index: int
    refusal: str  # what the client reads instead
    info: dict[str, Any]  # the `content_filter` field: stage, source, categories


@dataclass(frozen=True)
class Finished:
    index: int
    reason: str  # "stop" | "length"


@dataclass(frozen=True)
class Failed:
    """The request ends here: an answer's engine failed."""

    error: ApiError


@dataclass(frozen=True)
class TimedOut:
    """The request ends here: its deadline (--request-timeout-s) passed."""


Outcome = Piece | Refused | Finished | Failed | TimedOut


def engine_error(e: BaseException) -> ApiError:
    """Any error met while answering, as the ApiError the client gets: a UserError is a 400, a
    server behind us its own status (a 400 stays one, the rest are 502), anything else a logged 500."""
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


def filter_info(stage: str, verdict: Any) -> dict[str, Any]:
    return {"flagged": True, "stage": stage, "source": verdict.source, "categories": list(verdict.categories)}


class Responder:
    """Turns a plan's answers into one response (JSON) or a stream of chunks (SSE)."""

    def __init__(self, state: ServerState, backend: Backend, plan: Plan, started: float):
        self.state, self.backend, self.plan, self.started = state, backend, plan, started
        self.refusal = state.config.content_filter.refusal
        self.deadline = started + state.config.request_timeout_s
        # None: the input filter blocked the request, so nothing is generated
        self.answers: Answers | None = self._answers() if plan.blocked is None else None
        n = self.n = max(1, len(plan.starts))  # a blocked request answers with one refusal
        self.texts = [""] * n  # as streamed
        self.reasons = ["stop"] * n
        self.refusals: list[str | None] = [None] * n
        self.completions: list[Completion | None] = [None] * n

    def _answers(self) -> Answers:
        f, context = self.state.filter, self.plan.filter_context
        checker = (lambda: f.output_checker(context=context)) if f is not None else None
        return Answers(self.plan.starts, checker=checker, deadline=self.deadline)

    # -- what happened, once for both renderers ---------------------------------------------

    async def outcomes(self, ticket: Ticket | None) -> AsyncIterator[Outcome]:
        """Each answer's pieces and end, in the order they happen, tallied as they pass. Ends
        after a `Failed` or a `TimedOut`."""
        rec = self.plan.rec
        if self.answers is None:
            info = filter_info("input", self.plan.blocked)
            rec.filter_hits.append(info)
            self.refusals[0], self.reasons[0] = (
                refusal_text(self.refusal, self.plan.blocked),
                "content_filter",
            )
            yield Refused(0, self.refusals[0], info)
            return
        last: dict[int, float] = {}  # when each answer's last piece came
        try:
            async with aclosing(self.answers.events()) as events:
                async for ev in events:
                    self._timing(ev, ticket, last)
                    i = ev.index
                    if ev.kind == "piece":
                        self.texts[i] += ev.text
                        yield Piece(i, ev.text)
                    elif ev.kind == "blocked":
                        info = filter_info("output", ev.verdict)
                        rec.filter_hits.append(info)
                        self.completions[i], self.reasons[i] = ev.completion, "content_filter"
                        self.refusals[i] = refusal_text(self.refusal, ev.verdict)
                        yield Refused(i, self.refusals[i], info)
                    elif ev.kind == "done":
                        self.completions[i] = ev.completion
                        self.reasons[i] = finish_reason(ev.completion) if ev.completion else "stop"
                        yield Finished(i, self.reasons[i])
                    else:
                        yield Failed(engine_error(ev.error))
                        return
        except TimeoutError:
            yield TimedOut()

    def _timing(self, ev: Event, ticket: Ticket | None, last: dict[int, float]) -> None:
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

    def _record_tokens(self, completions: list[Completion | None]) -> int:
        done = [c for c in completions if c is not None]
        if self.backend.upstream or not self.plan.prompt_tokens:
            # A server behind us counted the prompts (we cannot): each prompt once, not per choice.
            n = self.plan.req.n
            counted = sum(c.prompt_tokens for c in completions[::n] if c is not None)
            self.plan.prompt_tokens = max(self.plan.prompt_tokens, counted)
        self.plan.rec.prompt_tokens = self.plan.prompt_tokens
        return sum(c.completion_tokens for c in done)

    def _head(self, kind: str) -> dict[str, Any]:
        """The fields every body and chunk of this request starts with."""
        p = self.plan
        return envelope(kind, p.rid, self.backend.name, self.backend.fingerprint, p.created)

    # -- one JSON response --------------------------------------------------------------------

    def _choice(self, index: int) -> dict[str, Any]:
        """An answer whole: the refusal when the filter stopped it, else the engine's own text."""
        done = self.completions[index]
        text = self.refusals[index]
        if text is None:
            text = done.text if done is not None else self.texts[index]
        reason = self.reasons[index]
        if self.plan.kind == "chat":
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
            }
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    async def whole(self, request: Any, ticket: Ticket | None) -> dict[str, Any]:
        rec, answers = self.plan.rec, self.answers
        watch = asyncio.create_task(wait_for_disconnect(request))

        def _cancel_on_disconnect(_task: Any) -> None:  # a client that gave up frees its slot
            if answers is not None:
                answers.cancel()

        watch.add_done_callback(_cancel_on_disconnect)
        try:
            async with aclosing(self.outcomes(ticket)) as outcomes:
                async for outcome in outcomes:
                    if isinstance(outcome, TimedOut):
                        raise ApiError(
                            504,
                            f"no answer within the deadline of {self.state.config.request_timeout_s:g} s",
                            code="timeout",
                        )
                    if isinstance(outcome, Failed):
                        raise outcome.error
        finally:
            watch.remove_done_callback(_cancel_on_disconnect)
            gone = watch.done() and not watch.cancelled()
            watch.cancel()
        rec.completion_tokens = self._record_tokens(self.completions)
        if gone:  # the client left before its answer was ready: nobody reads this response
            rec.status, rec.finish_reason = 499, "cancelled"
        else:
            rec.finish_reason = self.reasons[0] if self.n == 1 else ",".join(self.reasons)
        choices = [self._choice(i) for i in range(self.n)]
        if self.state.config.log_text:
            said = [c["message"]["content"] if "message" in c else c["text"] for c in choices]
            rec.answer = said[0] if self.n == 1 else said
        body = self._head(self.plan.object)
        body["choices"] = choices
        body["usage"] = usage(self.plan.prompt_tokens, rec.completion_tokens)
        if rec.filter_hits:
            body["content_filter"] = rec.filter_hits[0]
        return body

    # -- a stream of server-sent events ---------------------------------------------------------

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.plan.kind == "chat" else "text_completion"

    def _chunk(self, index: int, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        body = self._head(self._chunk_kind)
        if self.plan.kind == "chat":
            body["choices"] = [{"index": index, "delta": delta, "finish_reason": reason}]
        else:
            body["choices"] = [
                {"index": index, "text": delta.get("content", ""), "logprobs": None, "finish_reason": reason}
            ]
        return body

    async def sse(self, ticket: Ticket | None) -> AsyncIterator[bytes]:
        p, rec = self.plan, self.plan.rec
        rec.status = 200
        try:
            if p.kind == "chat":
                for i in range(self.n):
                    yield _event(self._chunk(i, {"role": "assistant", "content": ""}, None))
            async with aclosing(self.outcomes(ticket)) as outcomes:
                async for outcome in outcomes:
                    if isinstance(outcome, Piece):
                        yield _event(self._chunk(outcome.index, {"content": outcome.text}, None))
                    elif isinstance(outcome, Refused):
                        i = outcome.index
                        said = ("\n\n" if self.texts[i] else "") + outcome.refusal
                        yield _event(self._chunk(i, {"content": said}, None))
                        yield _event({**self._chunk(i, {}, "content_filter"), "content_filter": outcome.info})
                    elif isinstance(outcome, Finished):
                        yield _event(self._chunk(outcome.index, {}, outcome.reason))
                    elif isinstance(outcome, TimedOut):
                        err = ApiError(
                            504,
                            f"the answer did not finish within the deadline of {self.state.config.request_timeout_s:g} s",
                            code="timeout",
                        )
                        rec.status, rec.error, rec.finish_reason = 504, err.message, "timeout"
                        yield _event(err.body())
                    else:  # Failed
                        rec.status, rec.error = outcome.error.status, outcome.error.message
                        yield _event(outcome.error.body())
            if ticket:  # the answers have ended: free the place before the last chunks go out
                ticket.leave()
            rec.completion_tokens = self._record_tokens(self.completions)
            if p.req.include_usage:
                tail = {**self._head(self._chunk_kind), "choices": []}
                yield _event({**tail, "usage": usage(p.prompt_tokens, rec.completion_tokens)})
            yield b"data: [DONE]\n\n"
            if rec.finish_reason is None:
                rec.finish_reason = self.reasons[0] if self.n == 1 else ",".join(self.reasons)
        except (asyncio.CancelledError, GeneratorExit):
            # the client went away mid-stream: its answers were cancelled by Answers.events()
            rec.status, rec.finish_reason = 499, "cancelled"
            raise
        finally:
            if self.answers is not None:
                self.answers.cancel()
            if ticket:
                ticket.leave()
            if self.state.config.log_text:
                rec.answer = self.texts[0] if self.n == 1 else self.texts
            self.log_when_settled()

    def log_when_settled(self) -> None:
        """Log and count the request once its answers have ended: the tokens of one that was
        cancelled (a client gone, a deadline passed) are known only then."""
        rec, answers = self.plan.rec, self.answers

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
