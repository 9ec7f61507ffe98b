"""The model behind the server: an engine, what it is called, what it is, and how long a prompt it
takes. The routes speak only to this, so they never ask which kind of engine runs.

- In-process (transformers): requests are batched (`BatchingEngine`); prompts are counted with
  the model's tokenizer, so a prompt too long for the model's context is a 400 before it queues.
- Gateway (`--engine openai`): requests pass to the server behind; it counts and limits tokens
  itself (its 400s come back as ours), and applies its own model's defaults to the sampling
  settings a request leaves out (none is sent).

Sampling a request leaves out comes from the model's own generation config (what its authors
set), else serve's `--default-*` flags: `defaults`.

The model's identity is its name plus a short hash of its weights and prompt format, sent with
every response (`system_fingerprint`, and the `x-model-id` header): two servers answering with
the same name but different weights, or the same weights under another template, differ there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

from ..core.prompts import Message
from ..engines import (
    Engine,
    EngineConfig,
    GenerationSettings,
    ModelIdentity,
    SamplingDefaults,
    Stream,
    open_engine,
)

log = logging.getLogger("alpaca_forge")


class Backend:
    def __init__(self, engine: Engine, *, defaults: SamplingDefaults, served_name: str | None = None):
        self.engine = engine
        # An engine that runs here (transformers, llama.cpp) renders prompts and counts tokens;
        # a gateway's server does both itself (`upstream`).
        self.upstream = engine.upstream
        identity = engine.identity()
        spec = identity.model
        # A model folder or file is served by its last name part (`out/alpaca-7b` -> `alpaca-7b`);
        # requests may use either spelling.
        self.name = served_name or spec.rstrip("/").rpartition("/")[2].removesuffix(".gguf") or spec
        self.aliases = {self.name, spec}
        self.prompt_format = engine.format_name
        # What a request leaves out: the model's own settings, then serve's (`defaults`); a
        # gateway fills nothing, so the server behind applies its model's.
        self.model_defaults = engine.generation_defaults()
        self.defaults = SamplingDefaults() if self.upstream else self.model_defaults.over(defaults)
        self.context_tokens = engine.context_tokens
        self.fingerprint = "fp_" + self._identity_hash(identity)

    def api_defaults(self, cap: int, *, model_only: bool = False) -> dict[str, float | int]:
        """The defaults as the API names them (max_tokens at most `cap`, as planning applies them):
        what a request leaving them out gets, or (`model_only`) what the model itself sets."""
        out = (self.model_defaults if model_only else self.defaults).as_dict()
        if "max_new_tokens" in out:
            out["max_tokens"] = min(cap, out.pop("max_new_tokens"))
        return out

    def describe_defaults(self) -> str:
        """The defaults in a line for the log, each with where it came from."""
        if self.upstream:
            return "the defaults of the server behind (nothing left out is sent)"
        model = self.model_defaults.as_dict()
        return ", ".join(
            f"{k} {v:g} ({'the model' if k in model else 'serve'})"
            for k, v in self.defaults.as_dict().items()
        )

    @property
    def model_id(self) -> str:
        """`name@hash`, the `x-model-id` header."""
        return f"{self.name}@{self.fingerprint.removeprefix('fp_')}"

    def _identity_hash(self, identity: ModelIdentity) -> str:
        if identity.digest is None:  # a server's model, known by its name and our engine's
            return hashlib.sha256(json.dumps([self.engine.name, self.prompt_format]).encode()).hexdigest()[
                :12
            ]
        return identity.digest.hex()[:12]

    # -- prompts ----------------------------------------------------------------------------

    def chat_prompt_tokens(self, conversation: Sequence[Message], max_new_tokens: int) -> int | None:
        """Tokens of the prompt the engine will render (None when a server renders it)."""
        prompt = self.engine.render(conversation, max_new_tokens)
        return None if prompt is None else self.engine.count_tokens(prompt, chat=True)

    def raw_prompt_tokens(self, prompt: str) -> int | None:
        return self.engine.count_tokens(prompt, chat=False)

    # -- answers ----------------------------------------------------------------------------

    def chat_stream(self, conversation: Sequence[Message], settings: GenerationSettings) -> Stream:
        return self.engine.stream(conversation, settings)

    def prompt_stream(self, prompt: str, settings: GenerationSettings) -> Stream:
        return self.engine.stream_prompt(prompt, settings)

    def close(self) -> None:
        self.engine.close()


def serving_engine(engine: Engine, *, max_batch_size: int, batch_wait_s: float) -> Engine:
    """What serve runs: an in-process engine wrapped so concurrent requests share a batch; any
    other (a server behind a gateway batches on its own) as it is."""
    from ..engines.transformers_engine import TransformersEngine

    if not isinstance(engine, TransformersEngine):
        return engine
    from ..engines.batching import BatchingEngine

    return BatchingEngine(engine, max_batch_size=max_batch_size, wait_s=batch_wait_s)


def open_backend(
    engine_cfg: EngineConfig,
    *,
    served_name: str | None,
    max_batch_size: int,
    batch_wait_s: float,
    defaults: SamplingDefaults,
) -> Backend:
    """The engine `engine_cfg` names, loaded and ready to serve."""
    engine = serving_engine(open_engine(engine_cfg), max_batch_size=max_batch_size, batch_wait_s=batch_wait_s)
    backend = Backend(engine, served_name=served_name, defaults=defaults)
    log.info("serving %s (%s, prompt format %s)", backend.name, backend.fingerprint, backend.prompt_format)
    log.info("a request leaving sampling out gets %s", backend.describe_defaults())
    return backend
