"""The HTTP engine: any OpenAI-compatible server (vLLM, TGI, llama.cpp's server, Ollama, OpenAI,
our own `serve`), through its completions and chat-completions endpoints.

This is how a user who outgrows one machine scales inference: point `--engine openai --base-url`
at a server cluster and run `infer`, `chat` or `generate` unchanged. `complete` and `chat` send
their prompts as concurrent requests (one each; a batch of 16 is 16 requests in flight), since
not every server accepts a list of prompts in one request.

Why httpx rather than the `openai` SDK: the SDK's retry loop does not take a jitter or a cap we
choose, it hides the status code behind its own exception types (we map 401/404/400 to fixes that
name our flags), and it would be one more dependency for four POST requests we already make.
Transient failures (429, 5xx, timeouts, refused connections, a 200 that is not the API's shape)
are retried with capped exponential backoff and full jitter, honouring `Retry-After`; permanent
ones stop with a clear error.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..core.prompts import Message, check_conversation
from .base import (
    AnswerPieces,
    Completion,
    EngineError,
    FinishReason,
    GenerationSettings,
    ModelIdentity,
    SamplingDefaults,
    WholeAnswer,
    cut_at_stop,
)

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_IN_FLIGHT = 64  # requests one complete()/chat() call has open at once
_FIELDS = {"max_new_tokens": "max_tokens"}  # a GenerationSettings name as the API spells it


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6  # attempts after the first, then the call fails with an error
    base_delay_s: float = 1.0  # first wait; doubles each retry
    max_delay_s: float = 60.0  # cap on one wait
    timeout_s: float = 120.0  # each phase of a request: connecting, each read, each write, a pool wait

    def delay_s(self, attempt: int, retry_after: str | None, rng: random.Random) -> float:
        """Exponential backoff with full-range jitter, so many workers do not retry in step."""
        if retry_after:
            try:
                return max(0.0, min(self.max_delay_s, float(retry_after)))
            except ValueError:
                pass
        return min(self.max_delay_s, self.base_delay_s * 2**attempt) * rng.uniform(0.5, 1.0)


class _Garbage(Exception):
    """An HTTP 200 whose body is not the API's shape (retried: proxies sometimes answer so)."""


class _Transient(Exception):
    def __init__(self, problem: str, retry_after: str | None = None):
        super().__init__(problem)
        self.retry_after = retry_after


class OpenAIEngine:
    # The server behind renders prompts, counts tokens, limits the context and holds the weights:
    # `render` and `count_tokens` give None, and the identity is the served model's name alone.
    upstream = True
    context_tokens: int | None = None

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        system: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        seed: int = 0,
    ):
        import httpx

        self.base_url, self.model, self.retry, self.system = base_url.rstrip("/"), model, retry, system
        self.name = f"{model} @ {self.base_url}"
        self.format_name = "server"  # the server renders chats with its own template
        self.multi_turn = True  # every chat API takes whole conversations
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No cap on connections: concurrency is the caller's (generate's --concurrency, a batch
        # size), and a request waiting for a pooled connection would time out as if unanswered.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=MAX_IN_FLIGHT)
        self._client = httpx.Client(headers=headers, timeout=retry.timeout_s, limits=limits)
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._local = threading.local()

    # -- the interface ----------------------------------------------------------------------

    def complete(self, prompts: Sequence[str], settings: GenerationSettings) -> list[Completion]:
        return self._fan_out([self._body(settings, prompt=p) for p in prompts], "completions", settings)

    def chat(
        self, conversations: Sequence[Sequence[Message]], settings: GenerationSettings
    ) -> list[Completion]:
        bodies = [self._body(settings, messages=c) for c in conversations]
        return self._fan_out(bodies, "chat/completions", settings)

    def stream(self, conversation: Sequence[Message], settings: GenerationSettings) -> HttpStream:
        body = {
            **self._body(settings, messages=conversation),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return HttpStream(self, body, settings)

    def stream_prompt(self, prompt: str, settings: GenerationSettings) -> WholeAnswer:
        """A raw prompt through /v1/completions, answered whole: one piece."""
        return WholeAnswer(self, prompt, settings)

    def render(self, conversation: Sequence[Message], max_new_tokens: int) -> None:
        return None

    def count_tokens(self, text: str, *, chat: bool) -> None:
        return None

    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.model, None)

    def generation_defaults(self) -> SamplingDefaults:
        """None known here: the server applies its own model's to what is not sent."""
        return SamplingDefaults()

    def close(self) -> None:
        self._client.close()

    @property
    def last_retries(self) -> int:
        """Failed attempts before the last single-prompt call made on this thread succeeded
        (generate logs them per request; a batch's requests run on other threads)."""
        return getattr(self._local, "retries", 0)

    # -- requests ---------------------------------------------------------------------------

    def _body(
        self,
        settings: GenerationSettings,
        *,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
    ) -> dict[str, Any]:
        sampling: dict[str, Any] = {
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "seed": settings.seed,
        }
        if settings.repetition_penalty != 1.0:  # not OpenAI's own API; vLLM, TGI and llama.cpp take it
            sampling["repetition_penalty"] = settings.repetition_penalty
        left = {_FIELDS.get(name, name) for name in settings.left_to_server}
        body: dict[str, Any] = {"model": self.model, **{k: v for k, v in sampling.items() if k not in left}}
        if settings.stop:
            body["stop"] = list(settings.stop)
        if messages is not None:
            check_conversation(messages)
            if self.system and not any(m.role == "system" for m in messages):
                messages = [Message("system", self.system), *messages]
            body["messages"] = [{"role": m.role, "content": m.text} for m in messages]
        else:
            body["prompt"] = prompt
        return body

    def _fan_out(
        self, bodies: list[dict[str, Any]], endpoint: str, settings: GenerationSettings
    ) -> list[Completion]:
        if len(bodies) <= 1:
            return [self._request(b, endpoint, settings) for b in bodies]
        with ThreadPoolExecutor(
            max_workers=min(len(bodies), MAX_IN_FLIGHT), thread_name_prefix="http"
        ) as pool:
            return list(pool.map(lambda b: self._request(b, endpoint, settings), bodies))

    def url(self, endpoint: str) -> str:
        return f"{self.base_url}/{endpoint}"

    def _request(self, body: dict[str, Any], endpoint: str, settings: GenerationSettings) -> Completion:
        def attempt() -> Completion:
            response = self._client.post(self.url(endpoint), json=body)
            self._check(response, endpoint)
            return self._parse(response, endpoint, settings)

        return self.with_retries(attempt, endpoint)

    def open_stream(self, body: dict[str, Any], endpoint: str) -> Any:
        """The server's streaming answer to `body` once it says 200 (retried as `_request` is);
        the caller reads its lines and closes it."""

        def attempt() -> Any:
            request = self._client.build_request("POST", self.url(endpoint), json=body)
            response = self._client.send(request, stream=True)
            if response.status_code != 200:
                response.read()
                response.close()
            self._check(response, endpoint)
            return response

        return self.with_retries(attempt, endpoint)

    def with_retries(self, attempt: Any, endpoint: str) -> Any:
        import httpx

        last = ""
        for k in range(self.retry.max_retries + 1):
            retry_after = None
            self._local.retries = k
            try:
                return attempt()
            except _Transient as e:
                last, retry_after = str(e), e.retry_after
            except _Garbage as e:
                last = str(e)
            except httpx.TimeoutException:
                last = f"no answer within {self.retry.timeout_s:g} s"
            except httpx.TransportError as e:
                last = f"cannot connect ({e})"
            if k < self.retry.max_retries:
                with self._rng_lock:
                    delay = self.retry.delay_s(k, retry_after, self._rng)
                time.sleep(delay)
        raise EngineError(
            f"the server at {self.url(endpoint)} failed {self.retry.max_retries + 1} times; last: {last}",
            "check that the server is up and --base-url is the API base ending in /v1 "
            "(e.g. http://127.0.0.1:8000/v1); a resumable command (infer, generate) carries on when rerun",
        )

    def _check(self, response: Any, endpoint: str) -> None:
        status = response.status_code
        if status == 200:
            return
        if status in _RETRY_STATUS or status >= 500:
            raise _Transient(f"HTTP {status}", response.headers.get("retry-after"))
        detail = response.read().decode("utf-8", "replace")[:300].replace("\n", " ")
        if status in (401, 403):
            raise EngineError(
                f"the server refused the request with HTTP {status} (bad or missing API key): {detail}",
                "put the key in the environment variable named by --api-key-env (default OPENAI_API_KEY)",
                status=status,
            )
        if status == 404:
            raise EngineError(
                f"HTTP 404 from {self.url(endpoint)}: no such endpoint or model ({detail})",
                "check --base-url (the API base, ending in /v1) and --model (a name the server serves)",
                status=status,
            )
        raise EngineError(
            f"the server rejected the request with HTTP {status}: {detail}",
            "check the generation flags (servers without repetition_penalty need --repetition-penalty 1)",
            status=status,
        )

    def _parse(self, response: Any, endpoint: str, settings: GenerationSettings) -> Completion:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if endpoint.startswith("chat") else choice["text"]
            if not isinstance(text, str):
                raise TypeError("text is not a string")
            usage = data.get("usage") or {}
            finish = choice.get("finish_reason")
            prompt_tokens = int(usage.get("prompt_tokens", 0))
            completion_tokens = int(usage.get("completion_tokens", 0))
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
            snippet = response.text[:200].replace("\n", " ")
            raise _Garbage(f"not an OpenAI-compatible {endpoint} response ({e}): {snippet!r}") from None
        text, stopped = cut_at_stop(text, settings.stop)
        reason = FinishReason.LENGTH if finish == "length" and not stopped else FinishReason.STOP
        return Completion(text.strip(), reason, prompt_tokens, completion_tokens)


class HttpStream:
    """A chat answer streamed as server-sent events; `cancel()` closes the connection, which
    tells the server to stop generating."""

    def __init__(self, engine: OpenAIEngine, body: dict[str, Any], settings: GenerationSettings):
        self.engine, self.body, self.settings = engine, body, settings
        self.completion: Completion | None = None
        self.elapsed_s = 0.0
        self.queue_s: float | None = None  # the server's queue is its own
        self.cancelled = False
        self._response: Any = None
        self._pieces = AnswerPieces(settings.stop)
        self._text: list[str] = []
        self._finish: str | None = None
        self._usage: dict[str, Any] = {}
        self._count = 0
        self._start = time.perf_counter()

    def _events(self) -> Iterator[dict[str, Any]]:
        self._response = self.engine.open_stream(self.body, "chat/completions")
        try:
            for line in self._response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    yield json.loads(data)
                except json.JSONDecodeError:
                    continue
        finally:
            self._response.close()

    def __iter__(self) -> Iterator[str]:
        import httpx

        try:
            for event in self._events():
                if event.get("usage"):
                    self._usage = event["usage"]
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = delta.get("content") or ""
                    self._finish = choice.get("finish_reason") or self._finish
                    # A server without usage in its stream sends a chunk per token, some empty (a
                    # control token): those count too, the opening chunk with the role does not.
                    if piece or ("content" in delta and "role" not in delta):
                        self._count += 1
                    if piece:
                        self._text.append(piece)
                        out = self._pieces.push(piece)
                        if out:
                            yield out
                if self._pieces.stopped or self.cancelled:
                    break
        except httpx.HTTPError as e:  # the connection broke mid-answer (a cancel breaks it on purpose)
            if not self.cancelled:
                raise EngineError(
                    f"the server at {self.engine.url('chat/completions')} cut the answer off mid-stream ({e})",
                    "ask again; if it keeps happening, check the server's logs and --timeout-s",
                ) from e
        tail = self._pieces.end()
        if tail and not self.cancelled:
            yield tail
        self._done()

    def cancel(self) -> None:
        self.cancelled = True
        if self._response is not None:
            self._response.close()
        self._done()

    def _done(self) -> None:
        if self.completion is not None:
            return
        self.elapsed_s = time.perf_counter() - self._start
        text, stopped = cut_at_stop("".join(self._text), self.settings.stop)
        if self.cancelled:
            reason = FinishReason.CANCELLED
        elif self._finish == "length" and not stopped:
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.STOP
        self.completion = Completion(
            text.strip(),
            reason,
            int(self._usage.get("prompt_tokens", 0)),
            int(self._usage.get("completion_tokens", self._count)),
        )
