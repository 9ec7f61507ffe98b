"""Naming an engine, the same way on every command that makes text:

--engine transformers [--model NAME]                  a model in this process (the default)
--engine openai --base-url URL --model NAME [--api-key-env VAR]   an OpenAI-compatible server
--engine llamacpp [--model FILE.gguf]                 a GGUF file run by llama.cpp in this process

and the settings block every such command shares (`TextStageConfig`): the engine, how it samples,
and the repetition penalty whose default depends on the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from ..core.config import Config, nested, setting
from ..core.devices import DTYPES
from ..core.errors import UserError
from ..core.models import DEFAULT_MODEL
from ..core.prompts import FORMATS
from .base import Engine, GenerationSettings

log = logging.getLogger("alpaca_forge")

EngineName = Literal["transformers", "openai", "llamacpp"]
FormatName = Literal[tuple(FORMATS)]  # type: ignore[valid-type]
DtypeName = Literal[DTYPES]  # type: ignore[valid-type]


@dataclass(frozen=True)
class EngineConfig(Config):
    engine: EngineName = setting(
        "transformers",
        "what makes the text: transformers (a model in this process), openai (an OpenAI-compatible "
        "server) or llamacpp (a GGUF file in this process, through llama-cpp-python)",
    )
    model: str | None = setting(
        None,
        f"transformers: a built-in name ({DEFAULT_MODEL}, the default), a model folder, a .gguf file or a cached "
        "Hugging Face id; openai: the model name the server serves; llamacpp: a .gguf file or a built-in name",
    )
    base_url: str | None = setting(None, "openai: the API base, e.g. http://127.0.0.1:8000/v1", metavar="URL")
    api_key_env: str = setting(
        "OPENAI_API_KEY",
        "openai: the environment variable holding the API key (never a flag, so it stays out of shell history)",
        metavar="VAR",
    )
    format: FormatName | None = setting(  # type: ignore[valid-type]
        None,
        "transformers, llamacpp: prompt format; default: the one saved with the model, else its chat template, "
        "else alpaca",
    )
    system: str | None = setting(None, "system message (default: the prompt format's own)", metavar="TEXT")
    dtype: DtypeName = setting(
        "auto", "transformers: weights dtype; auto = bf16 on a GPU that has it, else fp32"
    )  # type: ignore[valid-type]
    device: str = setting("auto", "transformers: auto, cpu, cuda, cuda:N or mps")
    timeout_s: float = setting(120.0, "openai: one request's time limit, in seconds", gt=0)
    max_retries: int = setting(
        6, "openai: retries of a failed request (429, 5xx, timeout), with backoff and jitter", ge=0
    )
    batch_dir: str | None = setting(
        None,
        "openai: send nothing live; write each request to DIR/requests.jsonl (OpenAI Batch API format, "
        "which vLLM's run_batch also reads), answer from the result files put in DIR/results/, and stop "
        "with exit status 3 while any wait; rerun the same command once they are in",
        metavar="DIR",
    )
    batch_discount: float = setting(
        0.5,
        "openai --batch-dir: the share of the list price a batch saves (OpenAI's Batch API: 0.5, half "
        "price); cost figures count (1 - this) x the prices",
        ge=0,
        le=1,
    )

    context_tokens: int = setting(
        4096,
        "llamacpp: the context window in tokens (prompt + answer); its KV cache takes memory in proportion",
        ge=16,
    )
    cpu_threads: int | None = setting(None, "llamacpp: CPU threads (default: $OMP_NUM_THREADS where set, else llama.cpp's choice)", ge=1)

    def check(self):
        if self.engine == "openai":
            if not self.base_url and not self.batch_dir:
                yield (
                    "base_url",
                    "--engine=openai needs --base-url (the server's API base)",
                    "e.g. --base-url=http://127.0.0.1:8000/v1",
                )
            if not self.model:
                yield (
                    "model",
                    "--engine=openai needs --model (the name the server serves)",
                    "e.g. --model=gpt-4o-mini",
                )
            if self.format:
                yield (
                    "format",
                    "--format applies to --engine=transformers; a server renders prompts with its own template",
                    "drop --format",
                )
            if self.base_url:
                problem = _url_problem(self.base_url)
                if problem:
                    yield (
                        "base_url",
                        f"--base-url {self.base_url!r} {problem}",
                        "e.g. --base-url=http://127.0.0.1:8000/v1",
                    )
        elif self.batch_dir:
            yield (
                "batch_dir",
                "--batch-dir is for --engine=openai; "
                + (f"the {self.engine} engine" if self.engine else "with no --engine, the model")
                + " runs in this process",
                "add --engine=openai --model=NAME, or drop --batch-dir",
            )
        elif self.base_url:
            yield (
                "base_url",
                "--base-url is for --engine=openai; "
                + (f"the {self.engine} engine" if self.engine else "with no --engine, the model")
                + " runs in this process",
                "add --engine=openai, or drop --base-url",
            )


# The repetition penalty when none is asked for: in-process 1.1, since small models loop without
# it; a server gets none (1.0 is not sent): OpenAI's own API rejects the parameter.
IN_PROCESS_REPETITION_PENALTY = 1.1
REPETITION_PENALTY_HELP = (
    "above 1 discourages repeating earlier tokens; default: 1.1 in-process (small models loop "
    "without it), none sent to a server (not every API takes it)"
)


def repetition_penalty_for(cfg: EngineConfig, asked: float | None) -> float:
    """`asked`, else the engine's default (see IN_PROCESS_REPETITION_PENALTY)."""
    if asked is not None:
        return asked
    return 1.0 if cfg.engine == "openai" else IN_PROCESS_REPETITION_PENALTY


class TextStageConfig(Config):
    """Base of the config of a stage that makes text (chat, infer, generate, eval safety).

    A stage declares the three fields where its --help should show them, with the helpers below,
    and its own defaults; what they mean, their help and how they resolve live here once:

        engine: EngineConfig = engine_setting()
        repetition_penalty: float | None = repetition_penalty_setting()
        generation: GenerationSettings = generation_setting(temperature=0.0)
    """

    engine: EngineConfig
    # None: the engine's default (see repetition_penalty_for); a flag of its own for that reason.
    repetition_penalty: float | None
    generation: GenerationSettings

    @property
    def settings(self) -> GenerationSettings:
        """The generation settings, the repetition penalty resolved for the engine."""
        penalty = repetition_penalty_for(self.engine, self.repetition_penalty)
        return dataclasses.replace(self.generation, repetition_penalty=penalty)

    @property
    def on_server(self) -> bool:
        """The text comes from a server (--engine openai), not a model in this process."""
        return self.engine.engine == "openai"


def engine_setting(title: str = "engine") -> Any:
    """The engine, its flags shown under `title`."""
    return nested(EngineConfig, title)


def repetition_penalty_setting() -> Any:
    """The repetition penalty asked for; None leaves it to the engine."""
    return setting(None, REPETITION_PENALTY_HELP, gt=0)


def generation_setting(title: str = "generation", exclude: tuple[str, ...] = (), **defaults: Any) -> Any:
    """The generation settings, with this stage's `defaults` (GenerationSettings' fields), their
    flags shown under `title`; `exclude` keeps more of them off the command line. The repetition
    penalty always is off it: its default depends on the engine, so `repetition_penalty_setting`
    is its flag."""
    return nested(
        GenerationSettings,
        title,
        functools.partial(GenerationSettings, **defaults),  # built when asked: checking imports pydantic
        exclude=("repetition_penalty", *exclude),
    )


def _url_problem(url: str) -> str | None:
    """What keeps `url` from being a server's address (checked here: the HTTP client would
    fail on it mid-run, with its own exception)."""
    if not url.startswith(("http://", "https://")):
        return "is not an http(s) URL"
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port  # .port raises on one that is not a number
    except ValueError as e:
        return f"is not a valid URL ({e})"
    return None if host else "names no host"


def open_engine(cfg: EngineConfig, *, seed: int = 0) -> Engine:
    """The engine `cfg` names, ready to use (a model is loaded here)."""
    if cfg.engine == "openai" and cfg.batch_dir:
        from .batch import BatchEngine

        return BatchEngine(cfg.batch_dir, cfg.model or "", system=cfg.system, seed=seed)
    if cfg.engine == "openai":
        from .openai_http import OpenAIEngine, RetryPolicy

        key = os.environ.get(cfg.api_key_env)
        if key and (not key.isascii() or key != key.strip() or any(c.isspace() for c in key)):
            raise UserError(
                f"the API key in ${cfg.api_key_env} has spaces or characters an HTTP header cannot carry",
                f"set {cfg.api_key_env} to the key alone, as the provider shows it (no quotes, no spaces)",
            )

        return OpenAIEngine(
            cfg.base_url or "",
            cfg.model or "",
            api_key=key or None,
            system=cfg.system,
            retry=RetryPolicy(max_retries=cfg.max_retries, timeout_s=cfg.timeout_s),
            seed=seed,
        )
    if cfg.engine == "llamacpp":
        from .llamacpp import LlamaCppEngine, gguf_path

        path = gguf_path(cfg.model)
        log.info("loading %s with llama.cpp ...", path.name)
        engine = LlamaCppEngine(
            path,
            format=cfg.format,
            system=cfg.system,
            context_tokens=cfg.context_tokens,
            threads=cfg.cpu_threads,
            name=cfg.model or DEFAULT_MODEL,
        )
        log.info(
            "loaded %s in %.1f s (llama.cpp, %d-token context, %s format)",
            engine.name,
            engine.load_s,
            engine.context_tokens,
            engine.format_name,
        )
        return engine
    from ..core.models import load_model
    from .transformers_engine import TransformersEngine

    spec = cfg.model or DEFAULT_MODEL
    log.info("loading %s ...", spec)
    lm = load_model(spec, dtype=cfg.dtype, device=cfg.device, format=cfg.format, system=cfg.system)
    log.info(
        "loaded %s in %.1f s (%.1fM params, %s, %s, %s format)",
        lm.name,
        lm.load_s,
        lm.num_params / 1e6,
        lm.device,
        str(lm.model.dtype).removeprefix("torch."),
        lm.prompt_format.name,
    )
    return TransformersEngine(lm)


@contextlib.contextmanager
def using_engine(cfg: EngineConfig, engine: Engine | None = None, *, seed: int = 0) -> Iterator[Engine]:
    """`engine` if the caller passed one (left open: it is theirs), else the one `cfg` names,
    opened here and closed at the end."""
    if engine is not None:
        yield engine
        return
    opened = open_engine(cfg, seed=seed)
    try:
        yield opened
    finally:
        opened.close()
