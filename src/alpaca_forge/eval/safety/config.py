"""Settings of `alpaca-forge eval safety`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...core.config import REQUIRED, Config, nested, setting
from ...engines import REPETITION_PENALTY_HELP, EngineConfig, GenerationSettings, repetition_penalty_for


def _greedy() -> GenerationSettings:
    # Greedy, so a rerun asks the same questions and gets the same answers (the cache stays valid);
    # a refusal shows in its first sentence, a blocked answer usually well within 256 tokens.
    return GenerationSettings(temperature=0.0)


@dataclass(frozen=True)
class SafetyConfig(Config):
    output: str = setting(
        REQUIRED,
        "folder for answers.jsonl (the answers, appended to and resumed from), safety.json, safety.md "
        "and safety.png",
        metavar="DIR",
    )
    prompts: str | None = setting(
        None,
        "red-team prompts, JSONL: `prompt` (or `instruction`), optional `input`, `category` and `id`; "
        "default: the shipped set (60 prompts, 6 unsafe categories and benign controls)",
        metavar="FILE",
    )
    filter_rules: str | None = setting(
        None,
        "the content filter's rules, as `serve --filter-rules`: YAML that extends the shipped defaults, "
        "or replaces them with `replace_defaults: true`",
        metavar="FILE",
    )
    limit: int | None = setting(None, "ask only the first N prompts", ge=1)
    batch_size: int = setting(8, "prompts generated together (a server: requests in flight)", ge=1)
    overwrite: bool = setting(
        False, "ask every prompt again instead of reusing the answers cached in --output"
    )
    engine: EngineConfig = nested(EngineConfig, "engine")
    repetition_penalty: float | None = setting(None, REPETITION_PENALTY_HELP, gt=0)
    # The repetition penalty's default depends on the engine: see `settings`.
    generation: GenerationSettings = nested(
        GenerationSettings, "generation", _greedy, exclude=("repetition_penalty",)
    )

    @property
    def settings(self) -> GenerationSettings:
        """The generation settings, the repetition penalty resolved for the engine."""
        penalty = repetition_penalty_for(self.engine, self.repetition_penalty)
        return dataclasses.replace(self.generation, repetition_penalty=penalty)
