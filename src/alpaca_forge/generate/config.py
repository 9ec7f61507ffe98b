"""Settings of `alpaca-forge generate`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..core.config import REQUIRED, Config, nested, setting
from ..engines import EngineConfig, GenerationSettings
from ..core.shipped import or_shipped
from ..engines.config import TextStageConfig, engine_setting, generation_setting, repetition_penalty_setting
from .teacher_prompt import TEACHER_STOP

DEFAULT_BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip


@dataclass(frozen=True)
class FilterConfig(Config):
    """Which candidates are dropped before and by the ROUGE-L check."""

    min_words: int = setting(4, "drop instructions with fewer words (3 words or fewer say too little)", ge=1)
    max_words: int = setting(
        150, "drop instructions with more words (longer ones are the teacher running on)", ge=1
    )
    rouge_threshold: float = setting(
        0.7, "drop when ROUGE-L F1 with a seed or an accepted instruction is above this", gt=0, le=1
    )
    blacklist: tuple[str, ...] = setting(
        DEFAULT_BLACKLIST,
        "comma-separated words (whole words, any case) that drop an instruction: tasks a text model cannot do",
        sep=",",
        metavar="WORDS",
    )
    banned_prefixes: tuple[str, ...] = setting(
        ("Write a program",),
        "drop instructions starting with TEXT (repeatable; answers too long to check)",
        repeat=True,
        metavar="TEXT",
        flag="--banned-prefix",
    )

    def check(self):
        if self.min_words > self.max_words:
            yield (
                "max_words",
                f"is {self.max_words}, below --min-words {self.min_words}: every instruction would be dropped",
                "give a --max-words of at least --min-words",
            )


@dataclass(frozen=True)
class GenerateConfig(TextStageConfig):
    seeds: str = setting(
        REQUIRED,
        "seed tasks (seed-task format or Alpaca records)" + or_shipped("demo-seeds.jsonl"),
        metavar="FILE",
    )
    output: str = setting(REQUIRED, "accepted records, JSONL; resumed from if it exists", metavar="FILE")
    num_instructions: int = setting(
        REQUIRED, "stop once this many records are accepted (across resumed runs)", ge=1
    )
    seed: int = setting(
        0, "seeds the demonstrations and the teacher's sampling (request k always shows the same 3)", ge=0
    )
    concurrency: int = setting(
        1, "requests in flight at once (a server: 8-64; the in-process teacher: 1)", ge=1
    )
    teacher_api: Literal["chat", "completions"] | None = setting(
        None,
        "completions continues the prompt as plain text (default in-process: small models follow the layout "
        "better so); chat sends it as a user message (default for a server)",
    )
    repetition_penalty: float | None = repetition_penalty_setting()
    price_prompt_usd_per_1m: float = setting(
        0.0, "USD per million prompt tokens", ge=0, flag="--price-prompt-per-1m"
    )
    price_completion_usd_per_1m: float = setting(
        0.0, "USD per million completion tokens", ge=0, flag="--price-completion-per-1m"
    )
    max_cost_usd: float | None = setting(None, "send no new request once this much is spent", gt=0)
    max_requests: int | None = setting(
        None, "send no more than this many requests in all (resumed runs count)", ge=1
    )
    max_barren_requests: int = setting(
        100, "stop once this many requests in a row gave no accepted record", ge=1
    )
    filters: FilterConfig = nested(FilterConfig, "filters")
    engine: EngineConfig = engine_setting("teacher")
    # The Alpaca recipe's: room for a long list (3072 tokens), full-temperature sampling for
    # variety, and the stop strings that end a reply before task 20. The request seed comes from
    # --seed and the request number, and the stop strings belong to the prompt (its numbering),
    # so neither is a flag.
    generation: GenerationSettings = generation_setting(
        "teacher sampling",
        exclude=("seed", "stop"),
        max_new_tokens=3072,
        temperature=1.0,
        top_p=1.0,
        stop=TEACHER_STOP,
    )

    @property
    def api(self) -> str:
        """The teacher endpoint: --teacher-api, else chat for a server, completions in-process."""
        return self.teacher_api or ("chat" if self.on_server else "completions")

    def sampling(self, request_seed: int) -> GenerationSettings:
        """The settings of one request."""
        return dataclasses.replace(self.settings, seed=request_seed)
