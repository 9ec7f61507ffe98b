"""The recipe's wiring in one table: which output of which stage feeds which field of which stage.

    generate --records--> data --train data--> train --model--> infer (the base, then the fine-tuned
    model answers the set) --answers--> eval;  train --model--> export (merged first when LoRA)

and, learning from preferences after fine-tuning (AlpacaFarm's step):

    train --model--> prefer (the fine-tuned model's sampled answers, judged: pairs) --pairs--> align
    (DPO & co. from the fine-tuned model) --model--> infer (a third answer set) --> eval (aligned vs
    fine-tuned, the same judge); the aligned model is then the one export writes

Each stage has its section class (the recipe's `stages.NAME` keys are that class's settings), the
files it leaves under the run directory (`OUTPUTS`), and the rows of `WIRES` that feed its configs.
The loader reads the table once per stage: a wired field set in the recipe is a problem named by
its line, and every wired field takes its value from its row when the stage's config is built.
Adding a stage is its section, its outputs and its rows here, its runner in `stages`, and its own
package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import Config, FieldPath, nested, setting
from ..data.config import CleanConfig, DecontaminateConfig, DedupeConfig, QualityConfig, ScoreConfig
from ..eval.config import PairwiseConfig
from ..export.config import GgufConfig, MergeConfig
from ..generate.config import GenerateConfig
from ..infer.config import InferConfig
from ..prefer.config import PreferConfig
from ..train.config import TrainConfig


@dataclass(frozen=True)
class DataStage(Config):
    """The data stage: the teacher's records (and the seeds) -> quality report -> clean -> dedupe
    -> decontaminate (against the recipe's evaluation set) -> [score, keep the best] -> train data."""

    input: str | None = setting(
        None, "records to start from when the recipe has no generate stage", metavar="FILE"
    )
    include_seeds: bool = setting(
        False,
        "the seed tasks join the training data (a weak teacher yields few records); the report counts each source",
    )
    # Their files are wired (WIRES below): the loader replaces these empty names before any check
    # reads them; only their other settings are the user's.
    quality: QualityConfig = nested(
        QualityConfig, "quality", lambda: QualityConfig(file=""), prefix="quality"
    )
    clean: CleanConfig = nested(
        CleanConfig,
        "clean",
        lambda: CleanConfig(file="", output=""),
        prefix="clean",
        exclude=("min_score",),  # the records are rated later: min_score below
    )
    dedupe: DedupeConfig = nested(
        DedupeConfig, "dedupe", lambda: DedupeConfig(file="", output=""), prefix="dedupe"
    )
    decontaminate: bool = setting(
        True,
        "drop training records that overlap the recipe's evaluation set (the infer stage's input), by "
        "n-gram and ROUGE-L as `data decontaminate`; the report lists what was found",
    )
    decontamination: DecontaminateConfig = nested(
        DecontaminateConfig,
        "decontamination",
        lambda: DecontaminateConfig(file="", against=("",), output=""),
        prefix="decontaminate",
        exclude=("against",),  # the recipe's own evaluation set
    )
    min_score: float | None = setting(
        None,
        "rate every record with a judge (`data score`, the judge_* settings) and train on those whose "
        "overall score is at least X, 1-5 (AlpaGasus); none: no rating",
        ge=1,
        le=5,
        metavar="X",
    )
    score: ScoreConfig = nested(ScoreConfig, "score", lambda: ScoreConfig(file="", output=""), prefix="score")


# Each stage's section of the recipe, read into its command's config; in the order they run.
SECTIONS: dict[str, type] = {
    "generate": GenerateConfig,
    "data": DataStage,
    "train": TrainConfig,
    "prefer": PreferConfig,
    "align": TrainConfig,  # `train --method dpo|orpo|kto|simpo` from the fine-tuned model
    "infer": InferConfig,
    "eval": PairwiseConfig,
    "export": GgufConfig,
}
STAGES = tuple(SECTIONS)

# The configs each stage runs, by role. A role of the section's class is the section with its
# wires; another (export's merge) is made from its wires alone, when one of them applies.
ROLES: dict[str, dict[str, type]] = {
    "generate": {"generate": GenerateConfig},
    "data": {"data": DataStage},
    "train": {"train": TrainConfig},
    "prefer": {"prefer": PreferConfig},
    "align": {"align": TrainConfig},
    "infer": {"before": InferConfig, "after": InferConfig, "aligned": InferConfig},
    "eval": {"eval": PairwiseConfig, "aligned": PairwiseConfig},
    "export": {"merge": MergeConfig, "gguf": GgufConfig},
}


@dataclass(frozen=True)
class Setting:
    """An output that is one of the stage's own settings (the base model train starts from)."""

    path: FieldPath


# What each stage offers: a file or folder under the run directory (`{quant}` is the stage's own
# setting), or one of its settings.
OUTPUTS: dict[str, dict[str, str | Setting]] = {
    "generate": {"records": "generate/records.jsonl"},
    "data": {
        "combined records": "data/input.jsonl",  # the seeds and the teacher's records, as the checks read them
        "quality report": "data/quality.json",
        "clean records": "data/clean.jsonl",
        "deduped records": "data/deduped.jsonl",
        "dropped records": "data/deduped.dropped.jsonl",
        "decontaminated records": "data/decontaminated.jsonl",
        "contaminated records": "data/contaminated.jsonl",
        "scored records": "data/scored.jsonl",
        "train data": "data/train.jsonl",
    },
    "train": {"model": "train", "base model": Setting(("model",))},
    "prefer": {"pairs": "prefer/pairs.jsonl", "judge": Setting(("judge",))},
    "align": {"model": "align"},
    "infer": {
        "set": Setting(("input",)),
        "base answers": "infer/before.jsonl",
        "tuned answers": "infer/after.jsonl",
        "aligned answers": "infer/aligned.jsonl",
    },
    "eval": {
        "report folder": "eval",
        "report": "eval/report.json",
        "aligned report folder": "eval/aligned",
        "aligned report": "eval/aligned/report.json",
    },
    "export": {"merged model": "export/merged", "gguf file": "export/model.{quant}.gguf"},
}


def _aligns(stages: dict[str, Any]) -> bool:
    return "align" in stages


def _lora(stages: dict[str, Any], stage: str) -> bool:
    config = stages.get(stage)
    return config is not None and config.weights in ("lora", "qlora")


# A row applies only where its condition holds (on the configs built so far). The model export
# writes is the last one trained: the aligned one where the recipe aligns.
CONDITIONS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "the recipe aligns": _aligns,
    # an adapter is merged into its base before it becomes a GGUF file
    "train is LoRA": lambda stages: not _aligns(stages) and _lora(stages, "train"),
    "train is full": lambda stages: not _aligns(stages) and not _lora(stages, "train"),
    "align is LoRA": lambda stages: _aligns(stages) and _lora(stages, "align"),
    "align is full": lambda stages: _aligns(stages) and not _lora(stages, "align"),
}
# Rows under these conditions read an optional stage: a recipe without it simply lacks the rows.
OPTIONAL = ("the recipe aligns", "align is LoRA", "align is full")
# A role that exists only where its condition holds (the others always do).
ROLE_CONDITIONS: dict[tuple[str, str], str] = {
    ("infer", "aligned"): "the recipe aligns",
    ("eval", "aligned"): "the recipe aligns",
}


@dataclass(frozen=True)
class Wire:
    """`output` of `from_stage` fills `field` of `to_stage`'s config `role` (default: the stage's name)."""

    from_stage: str
    output: str
    to_stage: str
    field: FieldPath
    role: str = ""
    label: str = ""  # the field names a system: "fine-tuned=PATH"
    when: str = ""  # a name in CONDITIONS

    @property
    def into(self) -> str:
        return self.role or self.to_stage


WIRES: tuple[Wire, ...] = (
    Wire("generate", "records", "generate", ("output",)),
    Wire("data", "combined records", "data", ("quality", "file")),
    Wire("data", "quality report", "data", ("quality", "report")),
    Wire("data", "combined records", "data", ("clean", "file")),
    Wire("data", "clean records", "data", ("clean", "output")),
    Wire("data", "clean records", "data", ("dedupe", "file")),
    Wire("data", "deduped records", "data", ("dedupe", "output")),
    Wire("data", "dropped records", "data", ("dedupe", "dropped")),
    Wire("data", "deduped records", "data", ("decontamination", "file")),
    Wire("data", "decontaminated records", "data", ("decontamination", "output")),
    Wire("data", "contaminated records", "data", ("decontamination", "dropped")),
    Wire("data", "decontaminated records", "data", ("score", "file")),
    Wire("data", "scored records", "data", ("score", "output")),
    Wire("data", "train data", "train", ("data",)),
    Wire("train", "model", "train", ("output",)),
    Wire("train", "model", "prefer", ("engine", "model")),
    Wire("prefer", "pairs", "prefer", ("output",)),
    Wire("prefer", "pairs", "align", ("data",)),
    Wire("train", "model", "align", ("model",)),
    Wire("align", "model", "align", ("output",)),
    Wire("infer", "base answers", "infer", ("output",), role="before"),
    Wire("train", "base model", "infer", ("engine", "model"), role="before"),
    Wire("infer", "tuned answers", "infer", ("output",), role="after"),
    Wire("train", "model", "infer", ("engine", "model"), role="after"),
    Wire("infer", "aligned answers", "infer", ("output",), role="aligned", when="the recipe aligns"),
    Wire("align", "model", "infer", ("engine", "model"), role="aligned", when="the recipe aligns"),
    Wire("infer", "set", "eval", ("set",)),
    Wire("infer", "tuned answers", "eval", ("a",), label="fine-tuned"),
    Wire("infer", "base answers", "eval", ("b",), label="base"),
    Wire("eval", "report folder", "eval", ("output",)),
    Wire("infer", "set", "eval", ("set",), role="aligned", when="the recipe aligns"),
    Wire(
        "infer", "aligned answers", "eval", ("a",), role="aligned", label="aligned", when="the recipe aligns"
    ),
    Wire(
        "infer", "tuned answers", "eval", ("b",), role="aligned", label="fine-tuned", when="the recipe aligns"
    ),
    Wire("eval", "aligned report folder", "eval", ("output",), role="aligned", when="the recipe aligns"),
    # the aligned model is judged by the judge whose preferences it learned (AlpacaFarm's simulated
    # win rate), whatever judge compares the fine-tuned model with its base
    Wire("prefer", "judge", "eval", ("judging", "judge"), role="aligned", when="the recipe aligns"),
    Wire("train", "model", "export", ("adapter",), role="merge", when="train is LoRA"),
    Wire("align", "model", "export", ("adapter",), role="merge", when="align is LoRA"),
    Wire("export", "merged model", "export", ("output",), role="merge", when="train is LoRA"),
    Wire("export", "merged model", "export", ("output",), role="merge", when="align is LoRA"),
    Wire("export", "merged model", "export", ("model",), role="gguf", when="train is LoRA"),
    Wire("export", "merged model", "export", ("model",), role="gguf", when="align is LoRA"),
    Wire("train", "model", "export", ("model",), role="gguf", when="train is full"),
    Wire("align", "model", "export", ("model",), role="gguf", when="align is full"),
    Wire("export", "gguf file", "export", ("output",), role="gguf"),
)

# Settings the recipe fixes without a row, silently: a rerun replaces the export's own files.
FIXED: dict[tuple[str, str], dict[FieldPath, Any]] = {
    ("export", "merge"): {("force",): True},
    ("export", "gguf"): {("force",): True},
}

# Fields naming the user's own files: read relative to the recipe file.
USER_PATHS: dict[str, tuple[FieldPath, ...]] = {
    "generate": (("seeds",),),
    "data": (("input",),),
    "train": (("val",),),
    "prefer": (("input",),),
    "align": (("val",),),
    "infer": (("input",),),
}
# Paths of the user's that may not exist yet (a cache the stage creates), and local models.
USER_OUTPUTS: dict[str, tuple[FieldPath, ...]] = {"prefer": (("cache",),), "eval": (("judging", "cache"),)}
USER_MODELS: dict[str, tuple[FieldPath, ...]] = {
    "generate": (("engine", "model"),),
    "train": (("model",),),
    "prefer": (("judge", "model"), ("reward_model",)),
    "align": (("reference",),),
    "eval": (("judging", "judge", "model"),),
}


def wired_fields(stage: str) -> dict[FieldPath, str]:
    """The section's fields the recipe sets, each with what feeds it (for the loader's problems)."""
    fields: dict[FieldPath, list[str]] = {}
    for w in WIRES:
        # a role that exists only sometimes (eval's "aligned") may take a setting the user gives
        # the others: its rows set nothing the user may not
        if (stage, w.into) in ROLE_CONDITIONS:
            continue
        if w.to_stage == stage and ROLES[stage][w.into] is SECTIONS[stage]:
            source = OUTPUTS[w.from_stage][w.output]
            text = f"the {w.from_stage} stage's {w.output}" + (
                f", RUN/{source}" if isinstance(source, str) else ""
            )
            fields.setdefault(w.field, []).append(text + (f" when {w.when}" if w.when else ""))
    return {path: "; ".join(sources) for path, sources in fields.items()}


def upstream() -> list[tuple[str, str]]:
    """(stage, a stage whose output it reads) for every row that joins two stages, once each, in
    the table's order: a recipe with the first needs the second."""
    return list(
        dict.fromkeys(
            (w.to_stage, w.from_stage) for w in WIRES if w.from_stage != w.to_stage and w.when not in OPTIONAL
        )
    )


def run_file(run_dir: Path, stage: str, output: str, settings: dict[str, Any] | None = None) -> Path:
    """A stage's file under the run directory (`settings` fill a `{quant}` in its name)."""
    name = OUTPUTS[stage][output]
    assert isinstance(name, str), f"{stage}'s {output} is a setting, not a file"
    return run_dir / name.format_map(settings or {})


def _value(w: Wire, run_dir: Path, stages: dict[str, Any], own: dict[str, Any]) -> Any:
    """What the row carries: the file's path, or the setting's value, with its label."""
    source = OUTPUTS[w.from_stage][w.output]
    if isinstance(source, Setting):
        config = stages.get(w.from_stage)
        if config is None:  # the recipe lacks the stage: a problem the loader reports itself
            value: Any = f"(the {w.from_stage} stage's {w.output})"
        else:
            for part in source.path:
                config = getattr(config, part)
            value = config.to_dict() if isinstance(config, Config) else config  # a nested config, as settings
    else:
        value = str(run_file(run_dir, w.from_stage, w.output, own))
    return f"{w.label}={value}" if w.label else value


def _role_applies(stage: str, role: str, stages: dict[str, Any]) -> bool:
    condition = ROLE_CONDITIONS.get((stage, role))
    return condition is None or CONDITIONS[condition](stages)


def wired_values(
    stage: str, run_dir: Path, stages: dict[str, Any], own: dict[str, Any]
) -> dict[str, dict[FieldPath, Any]]:
    """Each role of the stage with its wired fields' values, by path, from the rows that apply.
    `stages`: the configs of the stages before it; `own`: the stage's own settings by name."""
    roles: dict[str, dict[FieldPath, Any]] = {
        role: {}
        for role, cls in ROLES[stage].items()
        if cls is SECTIONS[stage] and _role_applies(stage, role, stages)
    }
    for w in WIRES:
        if w.to_stage == stage and (not w.when or CONDITIONS[w.when](stages)):
            roles.setdefault(w.into, {})[w.field] = _value(w, run_dir, stages, own)
    ordered = {role: roles[role] for role in ROLES[stage] if role in roles}
    for role, values in ordered.items():
        values.update(FIXED.get((stage, role), {}))
    return ordered
