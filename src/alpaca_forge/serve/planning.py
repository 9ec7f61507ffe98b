"""A request planned before anything reaches the engine: the conversation trimmed to what could
fit, its tokens counted (off the event loop), the answer's token budget, the input filter's
verdict, and one start per answer to generate (n choices, several prompts) with its settings.

A prompt too long, a budget too large, or a prompt the filter blocks is settled here: the engine
never sees it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from ..content_filter import request_text
from ..engines import GenerationSettings
from .backend import Backend
from .protocol import ApiError, ChatRequest, CompletionRequest, new_id
from .state import ServerState
from .telemetry import RequestRecord


class Plan:
    """What one request will generate: a start per answer, or the input filter's verdict instead."""

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


def _settings(backend: Backend, req: Any, max_new: int, seed_offset: int) -> GenerationSettings:
    """The request's sampling: what it asks, else `backend.defaults` (the model's generation
    config, else serve's --default-* flags). A gateway has no defaults of its own: what the
    request leaves out is left to the server behind, which applies its model's."""
    asked = {"temperature": req.temperature, "top_p": req.top_p, "repetition_penalty": req.repetition_penalty}
    left = [k for k, v in asked.items() if v is None]
    defaults = backend.defaults.as_dict()  # every one in-process; none on a gateway
    chosen = {k: v for k, v in asked.items() if v is not None} | {
        k: defaults[k] for k in left if k in defaults
    }
    if backend.upstream:  # the rest of `left` stays at GenerationSettings' defaults, never sent
        left += [k for k, v in (("seed", req.seed), ("max_new_tokens", req.asked_max_tokens)) if v is None]
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    return GenerationSettings(
        max_new_tokens=max_new,
        **chosen,
        seed=(seed + seed_offset) % 2**63,
        stop=req.stops,
        left_to_server=tuple(left) if backend.upstream else (),
    )


def _default_max_tokens(state: ServerState, backend: Backend) -> int:
    """The budget of an answer whose request names none: the model's max_new_tokens, else
    --default-max-tokens, at most --max-tokens (a gateway's placeholder: the cap, never sent)."""
    cap = state.config.max_tokens
    return min(cap, backend.defaults.max_new_tokens or cap)


def _max_new_tokens(state: ServerState, backend: Backend, req: Any, prompt_tokens: int | None) -> int:
    """The answer's token budget: what was asked (at most --max-tokens), else the default as far
    as the model's context leaves room. A prompt that leaves no room is a 400."""
    cap = state.config.max_tokens
    asked = req.asked_max_tokens
    if asked is not None and asked > cap:
        raise ApiError(400, f"max_tokens {asked} is more than this server allows ({cap})", param="max_tokens")
    default = _default_max_tokens(state, backend)
    if prompt_tokens is None:
        return asked or default
    if prompt_tokens > state.config.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt is {prompt_tokens} tokens; this server takes at most {state.config.max_prompt_tokens}",
            param="messages" if isinstance(req, ChatRequest) else "prompt",
            code="context_length_exceeded",
        )
    context = backend.context_tokens
    if context is None:
        return asked or default
    room = context - prompt_tokens
    if room < 1 or (asked is not None and asked > room):
        raise ApiError(
            400,
            f"the model's context is {context} tokens: the prompt ({prompt_tokens}) plus max_tokens "
            f"({asked or 1}) does not fit; shorten the prompt or ask for fewer tokens",
            param="max_tokens" if asked and room >= 1 else "messages",
            code="context_length_exceeded",
        )
    return asked or min(default, room)


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
    guess = req.asked_max_tokens or _default_max_tokens(state, backend)
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
        settings = _settings(backend, req, max_new, i)
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
            settings = _settings(backend, req, max_new, i)
            plan.starts.append(lambda p=p, s=settings: backend.prompt_stream(p, s))
    return plan
