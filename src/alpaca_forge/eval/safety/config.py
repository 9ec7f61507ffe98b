"""Settings of `alpaca-forge eval safety`."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.config import REQUIRED, setting
from ...engines import EngineConfig, GenerationSettings
from ...engines.config import TextStageConfig, engine_setting, generation_setting, repetition_penalty_setting


@dataclass(frozen=True)
class SafetyConfig(TextStageConfig):
    output: str = setting(
        REQUIRED,
        "folder for answers.jsonl (the answers, appended to and resumed from), safety.json, safety.md "
        "and safety.png",
        metavar="DIR",
    )
    prompts: str | None = setting(
        None,
        "red-team prompts, JSONL: `prompt` (or `instruction`), optional `input`, `category` and `id`; "
        "default: the shipped set, package:redteam.jsonl (60 prompts, 6 unsafe categories and benign controls)",
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
    engine: EngineConfig = engine_setting()
    repetition_penalty: float | None = repetition_penalty_setting()
    # Greedy, so a rerun asks the same questions and gets the same answers (the cache stays valid);
    # a refusal shows in its first sentence, a blocked answer usually well within 256 tokens.
    generation: GenerationSettings = generation_setting(temperature=0.0)
