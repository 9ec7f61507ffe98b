"""The OpenAI API as this server speaks it: request models (pydantic), errors in OpenAI's shape,
and the response and stream-chunk bodies.

A sampling setting a request leaves out is None here; `planning` fills it from the model's own
generation config, else serve's defaults (OpenAI's, temperature 1 and up to the whole context,
make a small model ramble). Requests are checked here, field by field, before anything reaches the engine: a wrong type, a
value out of range or an unknown role is a 400 naming the field (`param`, as OpenAI spells it:
`messages[3].role`) and what it takes. Fields other clients send that we do not use are ignored,
as OpenAI's own API does; fields that would change the answer in a way we cannot honour
(`logprobs`, a non-zero `frequency_penalty`) are refused rather than silently dropped.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..core.prompts import Message
from ..engines import Completion, FinishReason

MAX_STOP_STRINGS = 16  # OpenAI takes 4; a list of 1,000 would make every generated token scan them all
MAX_STOP_CHARS = 200
MAX_MESSAGES = 1024  # a conversation longer than this is a client bug, not a chat
MAX_N = 8  # answers per request
MAX_PROMPTS = 32  # prompts in one /v1/completions request


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _ERROR_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(max(1, round(self.retry_after_s)))}


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}
_MISMATCH = {"string_type", "list_type", "int_type", "int_parsing", "float_type", "float_parsing", "bool_type",
             "model_type", "model_attributes_type", "dict_type", "none_required"}  # fmt: skip


def _is_branch_tag(part: Any) -> bool:
    """pydantic names the member of a union it tried (`constrained-str`, `list[str]`, `TextPart`)
    in an error's location; a client knows only the field."""
    return isinstance(part, str) and (
        part in _TYPE_TAGS
        or "[" in part
        or part[:1].isupper()
        or part.startswith(("constrained-", "function-"))
    )


def _param(loc: Sequence[Any]) -> str:
    """pydantic's error location as OpenAI names a parameter: ("messages", 3, "role") -> messages[3].role."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_branch_tag(part):
            out += ("." if out else "") + str(part)
    return out


def parse(model: type[BaseModel], data: Any) -> Any:
    """`data` as `model`, or a 400 naming the first bad field (and how many others there are).
    Of a union's several complaints about one field, the one past a type mismatch is shown: a
    20-item `stop` list is "at most 16 items", not "should be a valid string"."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        params = list(dict.fromkeys(_param(err["loc"]) for err in errors))
        first = [err for err in errors if _param(err["loc"]) == params[0]]
        best = next((err for err in first if err["type"] not in _MISMATCH), first[0])
        more = f" (and {len(params) - 1} more problems)" if len(params) > 1 else ""
        raise ApiError(400, f"{params[0] or 'body'}: {best['msg']}{more}", param=params[0] or None) from None


# ---------------------------------------------------------------------------------------------
# Requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", str_max_length=2_000_000)

    model: str = Field(min_length=1)
    # None (left out, or null): the model's generation_config.json, else serve's --default-* flags
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: (
        Annotated[str, Field(max_length=MAX_STOP_CHARS)]
        | Annotated[
            list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_STRINGS)
        ]
        | None
    ) = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    repetition_penalty: float | None = Field(None, gt=0, le=10)  # vLLM's and TGI's extension
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value:
            raise ValueError(
                "is not supported by this server; use repetition_penalty (above 1 discourages repeats)"
            )
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def to_message(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return Message("system" if self.role == "developer" else self.role, text)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer spelling of max_tokens
    logprobs: Literal[False] | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user":
            raise ValueError("must end with a message with role 'user' (the one to answer)")
        return messages

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[Message]:
        return [m.to_message() for m in self.messages]


class CompletionRequest(_Request):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    # None: as on /v1/chat/completions (OpenAI's own default here is 16 tokens, cut mid-sentence)
    max_tokens: int | None = Field(None, ge=1)
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    model: str | None = None

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


# ---------------------------------------------------------------------------------------------
# Responses


def finish_reason(c: Completion) -> str:
    return "length" if c.finish_reason is FinishReason.LENGTH else "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(kind: str, rid: str, model: str, fingerprint: str, created: int | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": kind,
        "created": created or int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
    }
