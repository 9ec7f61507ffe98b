"""Settings of the `alpaca-forge data` tools, one config per tool."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..core.config import REQUIRED, Config, nested, setting
from ..core.examples import AssistantTurns
from ..core.models import BUILTIN_MODELS, DEFAULT_MODEL
from ..core.prompts import FORMATS
from ..core.shipped import or_shipped
from ..engines import EngineConfig, GenerationSettings
from ..judging.rules import judge_model_problem
from .tools import CHECK_NAMES

PICTURE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")  # what matplotlib writes, by name
_FILE = "the dataset: a .json array or .jsonl (.gz too)" + or_shipped("demo-seeds.jsonl", "demo-eval.jsonl")
_THRESHOLD = "ROUGE-L F1 above which a record is a near-duplicate (self-instruct: 0.7)"


@dataclass(frozen=True)
class ValidateConfig(Config):
    files: tuple[str, ...] = setting(
        REQUIRED, "datasets to check" + or_shipped("demo-seeds.jsonl"), positional=True
    )


@dataclass(frozen=True)
class StatsConfig(Config):
    file: str = setting(REQUIRED, _FILE, positional=True)
    plot: str | None = setting(
        None,
        "where to draw the histograms (default: FILE's name + .lengths.png, in the current folder; skipped "
        "with a note when matplotlib is not installed)",
        metavar="PNG",
    )
    json_path: str | None = setting(None, "also write the numbers as JSON", metavar="FILE", flag="--json")

    def check(self):
        if self.plot and Path(self.plot).suffix.lower() not in PICTURE_SUFFIXES:
            yield "plot", f"{self.plot} is not a picture's name", "end it in .png (or .svg, .pdf, .jpg)"


@dataclass(frozen=True)
class QualityConfig(Config):
    file: str = setting(REQUIRED, _FILE, positional=True)
    report: str | None = setting(None, "also write the report (counts and examples) as JSON", metavar="FILE")
    examples: int = setting(3, "examples shown per check", ge=0)
    threshold: float = setting(0.7, _THRESHOLD, gt=0, le=1)


@dataclass(frozen=True)
class CleanConfig(Config):
    file: str = setting(REQUIRED, _FILE, positional=True)
    output: str = setting(REQUIRED, "the records that pass (.json array or .jsonl)", metavar="FILE")
    checks: tuple[str, ...] = setting(
        CHECK_NAMES,
        "comma-separated checks to apply (only these run); none: no check (with --min-score)",
        sep=",",
        metavar="LIST",
    )
    threshold: float = setting(0.7, _THRESHOLD + "; used by near_duplicate", gt=0, le=1)
    min_score: float | None = setting(
        None,
        "also remove records whose score.overall (from `data score`) is below this, 1-5, and those the "
        "judge left unrated; with --checks none, only this runs",
        ge=1,
        le=5,
        metavar="X",
    )

    def check(self):
        if self.checks == ("none",):
            if self.min_score is None:
                yield "checks", "'none' removes nothing without --min-score", "give --min-score X, or checks"
            return
        unknown = [c for c in self.checks if c not in CHECK_NAMES]
        if unknown:
            yield (
                "checks",
                f"unknown check(s): {', '.join(unknown)}",
                f"choose from: {', '.join(CHECK_NAMES)}",
            )
        elif not self.checks:
            yield "checks", "no check given", f"choose from: {', '.join(CHECK_NAMES)}"


@dataclass(frozen=True)
class DedupeConfig(Config):
    file: str = setting(REQUIRED, _FILE, positional=True)
    output: str = setting(REQUIRED, "kept records (.json array or .jsonl)", metavar="FILE")
    dropped: str | None = setting(
        None, "dropped records with their duplicate (default: OUTPUT's name + .dropped.jsonl)", metavar="FILE"
    )
    threshold: float = setting(
        0.7, "drop when ROUGE-L F1 with an earlier kept record is above this", gt=0, le=1
    )
    key: Literal["instruction", "instruction+input", "output"] = setting(
        "instruction",
        "which text is compared; of a conversation: its user turns joined (instruction keys) or its "
        "assistant turns joined (output)",
    )


@dataclass(frozen=True)
class SplitConfig(Config):
    file: str = setting(REQUIRED, _FILE, positional=True)
    output_dir: str = setting(REQUIRED, "where train.jsonl and val.jsonl go", metavar="DIR")
    val_size: float = setting(0.05, "validation share (below 1) or count (1 or more)", gt=0)
    seed: int = setting(
        0, "random seed for the split (train --val-size with the same seed holds out the same)", ge=0
    )


@dataclass(frozen=True)
class ConvertConfig(Config):
    file: str = setting(
        REQUIRED,
        "the dataset: Alpaca records, conversations (OpenAI messages, ShareGPT) or seed tasks"
        + or_shipped("demo-seeds.jsonl"),
        positional=True,
    )
    to: Literal["alpaca", "messages", "sharegpt", "seed"] = setting(
        REQUIRED,
        "output format: alpaca, messages (OpenAI), sharegpt, seed; a conversation (several exchanges, or "
        "a system message) has no alpaca or seed form and is refused, named by file:line",
    )
    output: str = setting(REQUIRED, "where to write (.json array or .jsonl)", metavar="FILE")


@dataclass(frozen=True)
class TokenizeConfig(Config):
    file: str = setting(REQUIRED, "the training records" + or_shipped("demo-seeds.jsonl"), positional=True)
    output: str | None = setting(
        None, "JSONL of {index, input_ids, labels}; omit to only --show", metavar="FILE"
    )
    show: int = setting(0, "print the first N examples, masking visible", ge=0)
    max_seq_len: int = setting(512, "the training window, in tokens", ge=2)
    train_on_inputs: bool = setting(False, "also learn the prompt tokens (as `train --train-on-inputs`)")
    assistant_turns: AssistantTurns = setting(
        "all", "conversations: learn every assistant turn or only the last (as `train --assistant-turns`)"
    )
    model: str = setting(
        DEFAULT_MODEL,
        f"whose tokenizer: a built-in model ({', '.join(BUILTIN_MODELS)}), a model folder, a .gguf file or a "
        "cached Hugging Face id",
    )
    format: Literal[tuple(FORMATS)] | None = setting(  # type: ignore[valid-type]
        None, "prompt format; default: the one saved with the model, else alpaca (as `train`)"
    )
    system: str | None = setting(
        None, "system message for the chat format (default: the template's own)", metavar="TEXT"
    )

    def check(self):
        if self.output is None and self.show == 0:
            yield (
                "output",
                "nothing to do",
                "give --output FILE to write the examples, or --show N to print some",
            )


# ---------------------------------------------------------------------------------------------
# data score and data decontaminate (issue 25)


def _score_greedy() -> GenerationSettings:
    # Two labelled lines and one sentence of reason: a short budget, greedy, no penalty (a penalty
    # on repeated tokens pushes a judge off the labels it was told to write).
    return GenerationSettings(max_new_tokens=48, temperature=0.0, repetition_penalty=1.0)


@dataclass(frozen=True)
class ScoreConfig(Config):
    file: str = setting(REQUIRED, _FILE, positional=True)
    output: str = setting(
        REQUIRED,
        "the records with their ratings (.jsonl or .json): each row as read plus \"score\": {accuracy, "
        "helpfulness, overall, judge} (null where the judge's reply could not be read). Rewritten whole "
        "from the cache on every run",
        metavar="FILE",
    )
    cache: str | None = setting(
        None,
        "the judge's replies, append-only JSONL, reused by a rerun (default: OUTPUT's name + "
        ".cache.jsonl); a killed run resumes from it",
        metavar="FILE",
    )
    plot: str | None = setting(
        None,
        "where to draw the score histograms (default: OUTPUT's name + .scores.png; skipped with a note "
        "when matplotlib is not installed)",
        metavar="PNG",
    )
    judge: EngineConfig = nested(EngineConfig, "judge", prefix="judge")
    judge_generation: GenerationSettings = nested(
        GenerationSettings, "judge sampling", _score_greedy, exclude=("seed",), prefix="judge"
    )
    judge_batch_size: int = setting(
        32, "ratings asked at once (a server judge: requests kept in flight all the time)", ge=1
    )
    retries: int = setting(
        2, "ask again this many times when a reply holds no readable rating (then it is counted)", ge=0
    )
    max_output_chars: int | None = setting(
        6000, "show the judge at most this many characters of an output (cut ones are marked)", ge=100
    )
    limit: int | None = setting(None, "score only the first N records", ge=1)

    def check(self):
        if self.plot and Path(self.plot).suffix.lower() not in PICTURE_SUFFIXES:
            yield "plot", f"{self.plot} is not a picture's name", "end it in .png (or .svg, .pdf, .jpg)"
        bad_judge = judge_model_problem(self.judge.model)
        if bad_judge:
            yield "judge.model", *bad_judge


@dataclass(frozen=True)
class DecontaminateConfig(Config):
    file: str = setting(REQUIRED, "the training records" + or_shipped("demo-seeds.jsonl"), positional=True)
    against: tuple[str, ...] = setting(
        REQUIRED,
        "an evaluation set to keep out of training (Alpaca records, seed or evaluation tasks); repeat "
        "the flag for several",
        metavar="EVAL",
        repeat=True,
    )
    output: str = setting(REQUIRED, "the kept records (.json array or .jsonl)", metavar="FILE")
    dropped: str | None = setting(
        None,
        "each dropped record with the evaluation item it matched, the method and the score (default: "
        "OUTPUT's name + .dropped.jsonl)",
        metavar="FILE",
    )
    ngram: int = setting(
        13,
        "drop a record that shares any run of this many words with an evaluation item (words as "
        "ROUGE-L reads them: lower-case letters and digits); 0: no n-gram check",
        ge=0,
    )
    threshold: float = setting(
        0.7,
        "drop a record whose ROUGE-L F1 with an evaluation item is above this (exact: rouge-score's "
        "tokens and arithmetic)",
        gt=0,
        le=1,
    )
    rouge: bool = setting(True, "run the ROUGE-L check (--no-rouge: the n-gram check alone)")
    key: Literal["instruction", "instruction+input"] = setting(
        "instruction+input", "which text of both sides is compared"
    )
