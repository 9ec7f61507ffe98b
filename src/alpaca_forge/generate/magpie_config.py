"""Settings of `generate --method magpie` (flags `--magpie-*`). Owner: the magpie work.

The teacher (`--engine`, `--model`, ...) writes the queries by raw completion of its chat
template's pre-query text; the answers come from the same engine unless `--magpie-answer-engine`
names another (its flags `--magpie-answer-*` are every engine flag). The answers sample with the
teacher's `--max-new-tokens` and `--temperature`; the queries with the settings below.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import Config, nested, setting
from ..engines.config import EngineConfig, EngineName


@dataclass(frozen=True)
class AnswerEngineConfig(EngineConfig):
    """Who answers the queries: none named means the teacher answers its own."""

    engine: EngineName | None = setting(
        None,
        "what answers the queries: transformers, openai or llamacpp, as --engine; default: the teacher "
        "that wrote them answers (the same model, loaded once)",
    )

    def check(self):
        if self.engine is None:
            named = [
                f"--{name.replace('_', '-')}"
                for name in ("model", "base_url", "format", "system")
                if getattr(self, name) is not None
            ]
            if named:
                yield (
                    "engine",
                    f"{', '.join(named)} given with no --engine: the teacher answers its own queries",
                    "add --engine (transformers, openai or llamacpp) to answer with another model, or drop them",
                )
            return
        yield from super().check()


@dataclass(frozen=True)
class MagpieConfig(Config):
    """How queries are drawn from an aligned model's chat template and answered (Magpie)."""

    turns: int = setting(
        1,
        "user turns per conversation; 1 writes Alpaca records, more write {\"messages\": [...]} rows "
        "whose later queries the teacher writes after the conversation so far",
        ge=1,
        le=8,
    )
    query_max_new_tokens: int = setting(
        96, "longest query, in tokens; a query that runs past it without ending its turn is dropped", ge=8
    )
    query_temperature: float | None = setting(
        None,
        "the queries' sampling temperature (their variety comes from sampling alone); default: 1.0 for a "
        "server (Magpie's), 0.7 in-process (a small model's queries ramble at 1.0)",
        ge=0,
    )
    query_top_p: float = setting(1.0, "the queries' nucleus sampling", gt=0, le=1)
    min_answer_words: int = setting(
        2, "drop a conversation whose answer has fewer words (an empty or one-word answer)", ge=1
    )
    template: str | None = setting(
        None,
        "--engine openai only (a server renders its own template): the server model's chat template, "
        "a .jinja file or a model folder holding its tokenizer files (chat_template.jinja or "
        "tokenizer_config.json); the queries are raw completions of its pre-query text",
        metavar="PATH",
    )
    answer: AnswerEngineConfig = nested(AnswerEngineConfig, "magpie answerer", prefix="magpie_answer")
