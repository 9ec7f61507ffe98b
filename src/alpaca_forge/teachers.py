"""Teachers: what writes new tasks for `generate`. Two kinds, one small interface.

- `HttpTeacher`: any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp's server, Ollama, our own
  `serve`), through its chat or completions API. Transient failures (429, 5xx, timeouts, refused
  connections) are retried with capped exponential backoff and jitter; permanent ones (401, 403,
  404, 400, answers that are not the API's shape) stop the run with a clear error.
- `LocalTeacher`: a model loaded in this process (default: the embedded SmolLM2), for offline runs.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import UserError
from .generation import GenerationSettings, generate_batch
from .models import LoadedModel


@dataclass(frozen=True)
class TeacherReply:
    text: str
    finish_reason: str  # "stop" or "length" (the completion hit max_tokens: its last task is cut)
    prompt_tokens: int
    completion_tokens: int
    retries: int = 0  # failed attempts before this reply


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 3072  # room for 20 tasks (Alpaca used 3072)
    temperature: float = 1.0  # self-instruct wants variety
    top_p: float = 1.0
    stop: tuple[str, ...] = ("\n20", "20.", "20 .")  # stop before a 21st task
    seed: int | None = None  # per request, so a resumed run samples what an uninterrupted one would


class Teacher(Protocol):
    name: str

    def complete(self, prompt: str, params: SamplingParams) -> TeacherReply: ...


class TeacherError(UserError):
    """The teacher cannot be used: wrong key, wrong URL or model, unreachable, or not speaking the API."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6  # attempts after the first, then the run stops with an error
    base_delay_s: float = 1.0  # first wait; doubles each retry
    max_delay_s: float = 60.0  # cap on one wait
    timeout_s: float = 120.0  # one request, connect to last byte

    def delay_s(self, attempt: int, retry_after: str | None, rng: random.Random) -> float:
        """Exponential backoff with full-range jitter, so many workers do not retry in step."""
        if retry_after:
            try:
                return min(self.max_delay_s, float(retry_after))
            except ValueError:
                pass
        return min(self.max_delay_s, self.base_delay_s * 2**attempt) * rng.uniform(0.5, 1.0)


_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class HttpTeacher:
    """An OpenAI-compatible endpoint. `url` is the API base, e.g. `http://127.0.0.1:8000/v1`."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api: str = "chat",
        api_key: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        seed: int = 0,
    ):
        import httpx

        if api not in ("chat", "completions"):
            raise UserError(
                f"unknown teacher API {api!r}", "use --teacher-api chat or --teacher-api completions"
            )
        self.url, self.model, self.api, self.retry = url.rstrip("/"), model, api, retry
        self.name = f"{model} @ {self.url}"
        self._endpoint = f"{self.url}/chat/completions" if api == "chat" else f"{self.url}/completions"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=retry.timeout_s)
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def _body(self, prompt: str, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": list(params.stop),
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def _parse(self, response: Any) -> tuple[str, str, int, int]:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            if not isinstance(text, str):
                raise TypeError("text is not a string")
            usage = data.get("usage") or {}
            return (
                text,
                choice.get("finish_reason") or "stop",
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)),
            )
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
            snippet = response.text[:200].replace("\n", " ")
            raise _Garbage(f"not an OpenAI-compatible {self.api} response ({e}): {snippet!r}") from None

    def complete(self, prompt: str, params: SamplingParams) -> TeacherReply:
        import httpx

        last_problem = ""
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            try:
                response = self._client.post(self._endpoint, json=self._body(prompt, params))
                if response.status_code == 200:
                    text, finish, p_tok, c_tok = self._parse(response)
                    return TeacherReply(text, finish, p_tok, c_tok, retries=attempt)
                self._refuse(response)  # raises for the statuses no retry can fix
                last_problem = f"HTTP {response.status_code}"
                retry_after = response.headers.get("retry-after")
            except httpx.TimeoutException:
                last_problem = f"no answer within {self.retry.timeout_s:g} s"
            except httpx.TransportError as e:
                last_problem = f"cannot connect ({e})"
            except _Garbage as e:
                last_problem = str(e)
            if attempt < self.retry.max_retries:
                with self._rng_lock:
                    delay = self.retry.delay_s(attempt, retry_after, self._rng)
                time.sleep(delay)
        raise TeacherError(
            f"the teacher at {self._endpoint} failed {self.retry.max_retries + 1} times; last: {last_problem}",
            "check that the server is up and the URL ends in /v1 (e.g. http://127.0.0.1:8000/v1); "
            "rerun the same command to resume, nothing accepted is lost",
        )

    def _refuse(self, response: Any) -> None:
        status = response.status_code
        if status in _RETRY_STATUS or status >= 500:
            return
        detail = response.text[:300].replace("\n", " ")
        if status in (401, 403):
            raise TeacherError(
                f"the teacher refused the request with HTTP {status} (bad or missing API key): {detail}",
                "put the key in the environment variable named by --teacher-key-env (default OPENAI_API_KEY)",
            )
        if status == 404:
            raise TeacherError(
                f"HTTP 404 from {self._endpoint}: no such endpoint or model ({detail})",
                f"check --teacher-url (the API base, ending in /v1), --teacher-model, and --teacher-api ({self.api})",
            )
        raise TeacherError(
            f"the teacher rejected the request with HTTP {status}: {detail}", "check the teacher flags"
        )


class _Garbage(Exception):
    """An HTTP 200 whose body is not the API's shape (retried: proxies sometimes answer so)."""


class LocalTeacher:
    """A model in this process. One request at a time (a model is no faster split across threads)."""

    def __init__(self, lm: LoadedModel, api: str = "completions"):
        if api not in ("chat", "completions"):
            raise UserError(
                f"unknown teacher API {api!r}", "use --teacher-api completions or --teacher-api chat"
            )
        self.lm, self.api = lm, api
        self.name = lm.name
        self._lock = threading.Lock()

    def complete(self, prompt: str, params: SamplingParams) -> TeacherReply:
        # "completions": the model continues the numbered list as plain text (small models follow
        # the layout far better so); "chat": the prompt goes through the model's prompt format.
        text = (
            prompt
            if self.api == "completions"
            else self.lm.prompt_format.prompt(prompt, tokenizer=self.lm.tokenizer)
        )
        with self._lock:
            settings = GenerationSettings(
                max_new_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed or 0,
                repetition_penalty=1.1,
                stop=params.stop,
            )
            reply = generate_batch(self.lm, [text], settings)[0]
        prompt_tokens = len(
            self.lm.tokenizer(text, add_special_tokens=self.lm.prompt_format.add_special_tokens)["input_ids"]
        )
        return TeacherReply(reply.text, reply.finish_reason, prompt_tokens, reply.num_tokens)
