"""Settings of `alpaca-forge serve`: the engine, where to listen, who may call, the limits, the
sampling a request leaves out, the content filter and the logs."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import Config, nested, setting
from ..engines import EngineConfig, SamplingDefaults

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class FilterConfig(Config):
    """The content filter, on what comes in and what goes out: rules, then (if named) an external
    moderation API, then (if named) an LLM judge."""

    filter: bool = setting(True, "check prompts and answers with the content filter (--no-filter: off)")
    filter_rules: str | None = setting(
        None,
        "YAML of rules (categories -> regular expressions); extends the shipped defaults, or replaces "
        "them with `replace_defaults: true`",
        metavar="FILE",
    )
    moderation_url: str | None = setting(
        None,
        "also ask this OpenAI-shaped moderation endpoint, e.g. https://api.openai.com/v1/moderations",
        metavar="URL",
    )
    moderation_model: str | None = setting(None, "the model field sent to --moderation-url", metavar="NAME")
    moderation_api_key_env: str = setting(
        "MODERATION_API_KEY", "the environment variable holding --moderation-url's API key", metavar="VAR"
    )
    judge_model: str | None = setting(
        None,
        "also ask this model whether a text is safe (a Llama-Guard-style prompt): a model in this process, "
        "or with --judge-base-url the name a server serves",
        metavar="MODEL",
    )
    judge_base_url: str | None = setting(
        None, "the OpenAI-compatible server of --judge-model, e.g. http://127.0.0.1:8001/v1", metavar="URL"
    )
    judge_api_key_env: str = setting(
        "JUDGE_API_KEY", "the environment variable holding --judge-base-url's API key", metavar="VAR"
    )
    filter_timeout_s: float = setting(
        30.0, "time limit of one --moderation-url or --judge-model check, in seconds", gt=0
    )
    refusal: str = setting(
        "Sorry, I can't help with that.",
        "the answer given instead when the filter blocks a prompt or an answer (the category is added)",
        metavar="TEXT",
    )

    def check(self):
        if self.judge_base_url and not self.judge_model:
            yield "judge_model", "--judge-base-url needs --judge-model", "add --judge-model NAME"
        if not self.filter and (self.filter_rules or self.moderation_url or self.judge_model):
            yield (
                "filter",
                "--no-filter turns the filter off, but filter settings were given",
                "drop --no-filter, or drop --filter-rules / --moderation-url / --judge-model",
            )


def _default(field: str, what: str) -> str:
    """The help of a `--default-*` flag: the one rule, said the same way on each."""
    return (
        f"{field} of a request that leaves it out when the model's generation_config.json sets none "
        f"(that value comes first, as vLLM does); {what}. --engine openai: a setting left out is not "
        "sent, so the server behind applies its own"
    )


@dataclass(frozen=True)
class ServeConfig(Config):
    host: str = setting("127.0.0.1", "address to listen on; anything but loopback needs an API key")
    port: int = setting(8000, "port to listen on (0: any free port)", ge=0, le=65535)
    served_model_name: str | None = setting(
        None, "the model's name in the API (default: the engine's model name)", metavar="NAME"
    )
    api_key: tuple[str, ...] = setting(
        (),
        "accept this API key (repeatable); clients send `Authorization: Bearer KEY`",
        repeat=True,
        metavar="KEY",
    )
    api_keys_file: str | None = setting(
        None,
        "file of API keys, one `client-id: key` per line (logs and limits go by client id)",
        metavar="FILE",
    )
    insecure_no_auth: bool = setting(
        False,
        "allow listening on a non-loopback address without any API key (anyone who can reach it may use it)",
    )
    max_prompt_tokens: int = setting(4096, "longest prompt accepted, in tokens (400 beyond)", ge=1)
    max_tokens: int = setting(
        1024,
        "most new tokens one answer may ask for (400 beyond); a request that names none gets "
        "--default-max-tokens (or the model's max_new_tokens), at most this",
        ge=1,
    )
    max_body_bytes: int = setting(1_000_000, "largest request body accepted, in bytes (413 beyond)", ge=1024)
    max_queue: int = setting(
        64, "requests waiting or running at once; one more gets 429 with Retry-After", ge=1
    )
    max_batch_size: int = setting(16, "in-process engine: requests generated together in one batch", ge=1)
    batch_wait_ms: float = setting(
        5.0, "in-process engine: how long a new batch waits for more requests to join it", ge=0
    )
    rate_limit_rpm: int = setting(
        0, "requests per minute allowed to each API key (429 with Retry-After beyond); 0 = no limit", ge=0
    )
    request_timeout_s: float = setting(
        300.0, "deadline of one request, queueing included, in seconds (504 when it passes)", gt=0
    )
    body_timeout_s: float = setting(
        10.0, "a request's body must arrive within this many seconds (408 otherwise)", gt=0
    )
    request_log: str | None = setting(
        None,
        "append one JSON line per request to FILE (no prompt or answer text unless --log-text)",
        metavar="FILE",
    )
    log_text: bool = setting(False, "also write prompts and answers into --request-log")
    default_temperature: float = setting(
        0.3,
        _default("temperature", "0 = greedy; low, since a small model drifts off topic at higher ones"),
        ge=0,
        le=2,
    )
    default_top_p: float = setting(
        0.9, _default("top_p", "sample from the likeliest tokens making up this share"), gt=0, le=1
    )
    default_max_tokens: int = setting(
        256,
        _default(
            "max_tokens (or max_completion_tokens)",
            "on /v1/completions too, not OpenAI's 16; at most --max-tokens and what the model's context "
            "leaves after the prompt",
        ),
        ge=1,
    )
    default_repetition_penalty: float = setting(
        1.1,
        _default("repetition_penalty", "above 1 discourages repeats; small models loop without it"),
        gt=0,
        le=10,
    )
    engine: EngineConfig = nested(EngineConfig, "engine")
    content_filter: FilterConfig = nested(FilterConfig, "content filter")

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """Serve's own defaults, for settings a request and the model both leave unset."""
        return SamplingDefaults(
            temperature=self.default_temperature,
            top_p=self.default_top_p,
            repetition_penalty=self.default_repetition_penalty,
            max_new_tokens=min(self.default_max_tokens, self.max_tokens),
        )

    def check(self):
        if self.engine.batch_dir:
            yield (
                "engine.batch_dir",
                "--batch-dir answers requests hours later, in a batch: a server answers its clients now",
                "drop --batch-dir (it is for generate, eval, prefer, infer and data score)",
            )
        if self.api_key and self.api_keys_file:
            yield (
                "api_key",
                "give --api-key or --api-keys-file, not both",
                "put every key into --api-keys-file",
            )
        keyed = bool(self.api_key or self.api_keys_file)
        if not keyed and self.host not in LOOPBACK_HOSTS and not self.insecure_no_auth:
            yield (
                "host",
                f"--host {self.host} would let anyone who can reach this machine use the model: no API key is set",
                "add --api-key KEY (or --api-keys-file FILE), or --insecure-no-auth if that is really meant",
            )
