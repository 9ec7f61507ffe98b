"""Settings of `alpaca-forge generate`."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

from ..core.config import REQUIRED, Config, nested, setting
from ..core.shipped import or_shipped
from ..engines import EngineConfig, GenerationSettings
from ..engines.config import (
    EngineName,
    TextStageConfig,
    repetition_penalty_for,
    repetition_penalty_setting,
)
from .evol_config import EvolConfig
from .magpie_config import MagpieConfig
from .teacher import IN_PROCESS, SERVER, default_engine, defaults_for
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
class TeacherEngineConfig(EngineConfig):
    """The teacher's engine: as every command's, except that none named picks one (teacher.py)."""

    engine: EngineName | None = setting(
        None,
        "what runs the teacher: transformers (a model in this process), openai (an OpenAI-compatible "
        "server) or llamacpp (a GGUF file in this process); default: llamacpp for a .gguf or built-in "
        "model when llama-cpp-python is installed (~2.5x faster on a CPU), else transformers",
    )

    def check(self):
        if self.engine is None and self.base_url:
            yield (
                "base_url",
                "--base-url is for --engine=openai; with no --engine the teacher runs in this process",
                "add --engine=openai, or drop --base-url",
            )
            return
        yield from super().check()


@dataclass(frozen=True)
class TeacherSampling(GenerationSettings):
    """The teacher's sampling; None: the default for where it runs (teacher.py)."""

    max_new_tokens: int | None = setting(
        None,
        f"longest reply, in tokens; default: {IN_PROCESS.max_new_tokens} in-process (a small "
        f"model given more rambles inside its first task), {SERVER.max_new_tokens} for a server "
        "(Alpaca's: room for 20 tasks)",
        ge=1,
    )
    temperature: float | None = setting(
        None,
        f"0 = greedy; higher = more varied; default: {IN_PROCESS.temperature} in-process (a "
        f"small model's text falls apart at 1), {SERVER.temperature} for a server (Alpaca's, "
        "for variety)",
        ge=0,
    )


@dataclass(frozen=True)
class GenerateConfig(TextStageConfig):
    output: str = setting(REQUIRED, "accepted records, JSONL; resumed from if it exists", metavar="FILE")
    num_instructions: int = setting(
        REQUIRED, "stop once this many records are accepted (across resumed runs)", ge=1
    )
    method: Literal["self-instruct", "evol", "magpie"] = setting(
        "self-instruct",
        "self-instruct: new tasks from 3 seed tasks a request (Alpaca); evol: harder and broader "
        "rewrites of the --seeds instructions, round by round (Evol-Instruct); magpie: an aligned "
        "model writes the queries itself from its chat template, no seeds (Magpie)",
    )
    seeds: str | None = setting(
        None,
        "seed tasks (seed-task format or Alpaca records); for evol, the instructions to evolve; "
        "magpie takes none" + or_shipped("demo-seeds.jsonl"),
        metavar="FILE",
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
    similarity_details: bool = setting(
        False,
        "self-instruct: give each accepted record its 10 most similar pool instructions and its mean "
        "ROUGE-L with the whole pool (Alpaca's most_similar_instructions, avg_similarity_score); costs "
        "an exact score of every candidate against the whole pool (O(pool) a record). Off: records "
        "carry no such fields, and only pairs that could be too similar are scored (the same records kept)",
    )
    filters: FilterConfig = nested(FilterConfig, "filters")
    evol: EvolConfig = nested(EvolConfig, "evol (--method evol)", prefix="evol")
    magpie: MagpieConfig = nested(MagpieConfig, "magpie (--method magpie)", prefix="magpie")
    engine: TeacherEngineConfig = nested(TeacherEngineConfig, "teacher")
    # Alpaca's top_p (1.0) and the stop strings that end a reply before task 20; the length and
    # temperature default by where the teacher runs (`resolved`). The request seed comes from
    # --seed and the request number, and the stop strings belong to the prompt (its numbering),
    # so neither is a flag; the repetition penalty has its own (its default is the engine's).
    generation: TeacherSampling = nested(
        TeacherSampling,
        "teacher sampling",
        functools.partial(TeacherSampling, top_p=1.0, stop=TEACHER_STOP),  # built when asked
        exclude=("repetition_penalty", "seed", "stop"),
    )

    def check(self):
        if self.method != "magpie" and not self.seeds:
            yield (
                "seeds",
                f"--method {self.method} needs seed tasks",
                "give --seeds FILE (e.g. --seeds package:demo-seeds.jsonl)",
            )
        if self.method == "magpie" and self.seeds:
            yield (
                "seeds",
                "--method magpie writes its own queries and reads no seeds",
                "leave out --seeds, or choose --method self-instruct or evol",
            )
        yield from super().check()

    @functools.cached_property
    def resolved(self) -> GenerateConfig:
        """This config with the defaults that depend on the teacher filled in: its engine (when
        none is named), reply length and temperature (when not given). Everything that runs or
        records the job reads these; an explicit value always stays."""
        engine, g = self.engine, self.generation
        if engine.engine is not None and g.max_new_tokens is not None and g.temperature is not None:
            return self
        name = engine.engine or default_engine(engine.model)
        defaults = defaults_for(name)
        sampling = _fields(g)
        if g.max_new_tokens is None:
            sampling["max_new_tokens"] = defaults.max_new_tokens
        if g.temperature is None:
            sampling["temperature"] = defaults.temperature
        return dataclasses.replace(
            self,
            engine=EngineConfig(**{**_fields(engine), "engine": name}),
            generation=GenerationSettings(**sampling),
        )

    @property
    def teacher(self) -> EngineConfig:
        """The engine that runs the teacher, resolved."""
        return self.resolved.engine

    @property
    def settings(self) -> GenerationSettings:
        """The teacher's sampling, resolved, with the engine's repetition penalty."""
        r = self.resolved
        penalty = repetition_penalty_for(r.engine, r.repetition_penalty)
        return dataclasses.replace(r.generation, repetition_penalty=penalty)

    @property
    def api(self) -> str:
        """The teacher endpoint: --teacher-api, else chat for a server, completions in-process."""
        return self.teacher_api or ("chat" if self.on_server else "completions")

    def sampling(self, request_seed: int) -> GenerationSettings:
        """The settings of one request."""
        return dataclasses.replace(self.settings, seed=request_seed)

    def to_dict(self):
        """The settings as run: with the teacher's defaults resolved."""
        return Config.to_dict(self.resolved)


def _fields(config: object) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}  # type: ignore[arg-type]
