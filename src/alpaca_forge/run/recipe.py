"""A recipe file, read and checked: every stage's section becomes the configs that stage runs.

    name: demo                     # a run directory belongs to one recipe
    run_dir: ../runs/demo          # relative to the recipe file
    forecast: {gpu: cpu, mfu: 0.5} # the dry run's assumptions
    launch: {processes: 1}         # more than 1: train runs under `accelerate launch`
    stages:
      generate: {seeds: package:demo-seeds.jsonl, num_instructions: 24, ...}   # GenerateConfig
      data: {include_seeds: true, clean: {...}, dedupe: {...}}                   # CleanConfig, DedupeConfig
      train: {method: lora, epochs: 3, ...}                                      # TrainConfig
      infer: {input: package:demo-eval.jsonl, max_new_tokens: 80}                # InferConfig
      eval: {judge_model: ..., one_order: false}                                 # PairwiseConfig
      export: {quant: q8_0}                                                      # GgufConfig

Each stage's keys are exactly its command's settings (flag names with `_`, nested sections as its
`--config` file takes them). What joins the stages (every output path, the data each stage reads,
the models infer compares) is the wiring table's (`wiring.WIRES`): setting it is a problem, and
each stage's configs are built here with those fields filled from the table, in stage order. Every
problem in the file is reported at once with its line and its place (`stages.train.epochs`),
before any compute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..core.config import REQUIRED, Config, FieldPath, config_from, leaf_paths, setting
from ..core.config_yaml import apply_overrides, compose_yaml, settings_from_node, yaml_where
from ..core.errors import Problem, UserError, ValidationError
from ..core.files import under_a_file
from ..core.shipped import PACKAGE_PREFIX, is_shipped, listing, shipped_folder
from .wiring import (
    ROLES,
    SECTIONS,
    STAGES,
    USER_MODELS,
    USER_OUTPUTS,
    USER_PATHS,
    upstream,
    wired_fields,
    wired_values,
)

GPUS = ("cpu", "a10", "l4", "rtx3090", "rtx4090", "l40s", "a100", "h100", "h200")


@dataclass(frozen=True)
class ForecastConfig(Config):
    """What the dry run assumes where nothing can be measured before the run."""

    teacher_records_per_request: float = setting(
        8.0,
        "records one teacher request yields after filtering (measured: the embedded SmolLM2 ~1.2 at "
        "768 tokens; a strong teacher 8-12 of the 16 a reply can hold)",
        gt=0,
    )
    teacher_completion_tokens_per_request: int | None = setting(
        None,
        "completion tokens one teacher request returns (default: its max_new_tokens, an upper bound)",
        ge=1,
    )
    judge_price_prompt_per_1m: float = setting(0.0, "USD per million judge prompt tokens", ge=0)
    judge_price_completion_per_1m: float = setting(0.0, "USD per million judge completion tokens", ge=0)
    gpu: Literal[GPUS] = setting(  # type: ignore[valid-type]
        "h100", "the accelerator training runs on (its dense bf16 peak sets the GPU-hours; cpu: fp32)"
    )
    peak_tflops: float | None = setting(
        None, "the accelerator's peak TFLOP/s, instead of the table's figure for --gpu", gt=0
    )
    mfu: float = setting(
        0.35, "model FLOPs utilisation assumed for training (share of the peak the run reaches)", gt=0, le=1
    )
    gpu_usd_per_hour: float = setting(0.0, "USD per accelerator-hour, to price the training", ge=0)
    parameters: float | None = setting(
        None, "the model's parameter count, where it cannot be read from local weights (e.g. 6.7e9)", gt=0
    )


@dataclass(frozen=True)
class LaunchConfig(Config):
    """How the train stage is started."""

    processes: int = setting(
        1, "training processes (GPUs); above 1 the stage runs under accelerate launch", ge=1
    )
    accelerate_config: str | None = setting(
        None,
        "accelerate config file for several processes (e.g. configs/accelerate/fsdp.yaml)",
        metavar="FILE",
    )


@dataclass(frozen=True)
class Top(Config):
    name: str = setting(REQUIRED, "the recipe's name: a run directory belongs to one recipe")
    run_dir: str = setting(REQUIRED, "the run directory, relative to the recipe file", metavar="DIR")
    description: str = setting("", "one line on what the recipe makes, shown in the report")


@dataclass(frozen=True)
class Recipe:
    path: Path
    top: Top
    forecast: ForecastConfig
    launch: LaunchConfig
    stages: dict[str, Any]  # stage name -> its section's config, wired, in STAGES order
    configs: dict[str, dict[str, Any]]  # stage name -> role -> each config it runs (infer: before, after)
    where: dict[str, str]  # stage name -> "recipe.yaml:12 (stages.train)", for later problems

    @property
    def run_dir(self) -> Path:
        return resolve_path(self.top.run_dir, self.path.parent)

    @property
    def name(self) -> str:
        return self.top.name

    def has(self, stage: str) -> bool:
        return stage in self.stages


def load_recipe(path: str | Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """The recipe, with `--set KEY=VALUE` overrides written over it, every problem in it raised at
    once (ValidationError)."""
    import yaml

    p = Path(path).expanduser()
    root = compose_yaml(p)
    if isinstance(root, yaml.MappingNode):
        root = apply_overrides(root, overrides)
    if not isinstance(root, yaml.MappingNode):
        raise UserError(
            f"{p}: a recipe is a mapping (name, run_dir, stages, ...)",
            "start from recipes/demo.yaml",
        )
    problems: list[Problem] = []
    top_node = yaml.MappingNode("tag:yaml.org,2002:map", [])
    sections: dict[str, tuple[Any, Any]] = {}
    for key_node, value_node in root.value:
        key = str(key_node.value)
        if key in ("forecast", "launch", "stages"):
            if not isinstance(value_node, yaml.MappingNode):
                problems.append(
                    Problem(
                        yaml_where(p, key_node),
                        f"'{key}' must be a mapping",
                        f"write `{key}:` with indented keys below it",
                    )
                )
                continue
            sections[key] = (key_node, value_node)
        else:
            top_node.value.append((key_node, value_node))

    top = _build(Top, (None, top_node), p, ("",), problems)
    run_dir = resolve_path(top.run_dir, p.parent) if top is not None else p.parent
    if top is not None:
        problems.extend(_run_dir_problems(run_dir, p))
    forecast = _build(ForecastConfig, sections.get("forecast"), p, ("forecast",), problems)
    launch = _build(LaunchConfig, sections.get("launch"), p, ("launch",), problems)
    nodes, where = _stage_nodes(sections.get("stages"), p, problems)
    configs: dict[str, dict[str, Any]] = {}
    stages: dict[str, Any] = {}
    for name in STAGES:  # in order: a stage's wires read the configs of the stages before it
        if name in nodes:
            configs[name] = _stage_configs(name, nodes[name], p, where[name], run_dir, stages, problems)
            stages[name] = next(c for role, c in configs[name].items() if ROLES[name][role] is SECTIONS[name])
    problems.extend(_joins(stages, where, p))
    if launch is not None and launch.accelerate_config:
        cfg = resolve_path(launch.accelerate_config, p.parent)
        if not cfg.is_file():
            problems.append(
                Problem(
                    f"{p} (launch.accelerate_config)",
                    f"{cfg} does not exist",
                    "give an accelerate config file, e.g. configs/accelerate/fsdp.yaml",
                )
            )
        else:
            launch = dataclasses.replace(launch, accelerate_config=str(cfg))
    if stages.get("train") is not None and launch is not None:
        problems.extend(_batch_fits(stages["train"], launch.processes, where["train"]))
    if problems:
        raise ValidationError(problems, what=f"recipe {p}")
    return Recipe(p, top, forecast, launch, stages, configs, where)


def _stage_nodes(
    section: tuple[Any, Any] | None, p: Path, problems: list[Problem]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Each stage's mapping under `stages:`, and where it is written ("recipe.yaml:12 (stages.train)")."""
    import yaml

    nodes: dict[str, Any] = {}
    where: dict[str, str] = {}
    if section is None:
        problems.append(
            Problem(
                str(p),
                "the recipe has no 'stages'",
                "add `stages:` with at least generate or data, and train",
            )
        )
        return nodes, where
    key_node, mapping = section
    if not mapping.value:
        problems.append(
            Problem(yaml_where(p, key_node), "'stages' is empty", "add at least generate or data, and train")
        )
    for key_node, value_node in mapping.value:
        name = str(key_node.value)
        at = yaml_where(p, key_node, ("stages", name))
        if name not in SECTIONS:
            problems.append(Problem(at, f"unknown stage '{name}'", f"stages are: {', '.join(STAGES)}"))
            continue
        if value_node.tag == "tag:yaml.org,2002:null":
            value_node = yaml.MappingNode("tag:yaml.org,2002:map", [])
        if not isinstance(value_node, yaml.MappingNode):
            problems.append(
                Problem(
                    at,
                    f"stage '{name}' must be a mapping of its settings",
                    f"write `{name}:` with its settings indented below",
                )
            )
            continue
        nodes[name] = value_node
        where[name] = at
    return nodes, where


def _stage_configs(
    name: str, node: Any, p: Path, at: str, run_dir: Path, before: dict[str, Any], problems: list[Problem]
) -> dict[str, Any]:
    """The stage's configs by role: the user's settings, and its wired fields from the table.
    `at`: where the stage is written; `before`: the configs of the stages before it, which its
    wires may read."""
    section = SECTIONS[name]
    yaml_path = ("stages", name)
    values, origins, found = settings_from_node(section, node, p, yaml_path)
    problems.extend(found)
    for path_, what in wired_fields(name).items():
        if path_ in values:
            problems.append(
                Problem(
                    origins[path_],
                    f"'{'.'.join(path_)}' is set by the recipe ({what})",
                    f"remove it from stages.{name}: the recipe joins the stages itself",
                )
            )
            del values[path_]
    _resolve_user_files(name, values, origins, p, problems)
    own = {f.name: f.default for f in dataclasses.fields(section) if f.default is not REQUIRED}
    own.update({path_[0]: v for path_, v in values.items() if len(path_) == 1})
    configs: dict[str, Any] = {}
    for role, wired in wired_values(name, run_dir, before, own).items():
        cls = ROLES[name][role]
        role_values = {**values, **wired} if cls is section else wired
        role_origins = {**origins, **{w: f"{p} (stages.{name}.{'.'.join(w)})" for w in wired}}
        flags = {v: k for k, v in leaf_paths(cls).items()}
        missing = _where_missing(at.split(" (")[0], yaml_path, flags)
        config, more = config_from(cls, role_values, role_origins, missing)
        problems.extend(m for m in more if m not in problems)  # infer's two roles share the user's settings
        configs[role] = config
    return configs


def _resolve_user_files(
    name: str, values: dict[FieldPath, Any], origins: dict[FieldPath, str], p: Path, problems: list[Problem]
) -> None:
    """The user's own files and local models, relative to the recipe file; inputs must exist."""
    for path_ in USER_OUTPUTS.get(name, ()):
        if isinstance(values.get(path_), str):
            values[path_] = str(resolve_path(values[path_], p.parent))
    for path_ in USER_MODELS.get(name, ()):
        if isinstance(values.get(path_), str):
            values[path_] = resolve_model(values[path_], p.parent)
    for path_ in USER_PATHS.get(name, ()):
        if isinstance(values.get(path_), str):
            values[path_] = str(resolve_path(values[path_], p.parent))
            if not Path(values[path_]).exists():
                problems.append(
                    Problem(
                        origins[path_],
                        f"{values[path_]} does not exist",
                        "give a file that exists (paths are relative to the recipe file), or a "
                        f"shipped one: {listing()}",
                    )
                )


def _build(
    cls: type, section: tuple[Any, Any] | None, p: Path, yaml_path: FieldPath, problems: list[Problem]
) -> Any:
    """A top-level section's config (None where it has problems, which join `problems`).
    `section`: its key's node (None for the recipe's top level) and its mapping, if written."""
    key_node, node = section or (None, None)
    values, origins, found = settings_from_node(cls, node, p, yaml_path) if node is not None else ({}, {}, [])
    problems.extend(found)
    flags = {v: k for k, v in leaf_paths(cls).items()}
    at = yaml_where(p, key_node) if key_node is not None else str(p)
    config, more = config_from(cls, values, origins, _where_missing(at, yaml_path, flags))
    problems.extend(more)
    return config


def _run_dir_problems(run_dir: Path, p: Path) -> list[Problem]:
    """The run directory can be a folder: checked before any compute, created only by a real run."""
    blocker = under_a_file(run_dir)
    if blocker is None and not (run_dir.exists() and not run_dir.is_dir()):
        return []
    what = (
        f"{blocker} is a file, so nothing can be written under it" if blocker else "is a file, not a folder"
    )
    return [
        Problem(
            f"{p} (run_dir)", f"{run_dir}: {what}", "give run_dir a folder path (relative to the recipe file)"
        )
    ]


def _batch_fits(train: Any, processes: int, where: str) -> list[Problem]:
    """The global batch splits over the processes, checked now rather than after the teacher is paid."""
    from ..train.setup import gradient_accumulation

    try:
        gradient_accumulation(train, processes)
    except UserError as e:
        return [Problem(f"{where.split(' (')[0]} (stages.train.global_batch_size)", e.message, e.fix or "")]
    return []


def _where_missing(at: str, yaml_path: FieldPath, flags: dict[FieldPath, str]) -> Callable[[FieldPath], str]:
    """A setting that is not written is named by where it belongs: `at` (the section's
    file:line, else the file) and its key path."""
    prefix = ".".join(x for x in yaml_path if x)

    def where(path: FieldPath) -> str:
        key = flags.get(path, ".".join(path))
        return f"{at} ({prefix + '.' if prefix else ''}{key})"

    return where


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _joins(stages: dict[str, Any], where: dict[str, str], p: Path) -> list[Problem]:
    """Each stage present has what it reads: a stage before it, or a file of the user's."""
    problems = []
    for stage, before in upstream():
        if stage in stages and before not in stages:
            problems.append(
                Problem(
                    where[stage],
                    f"stage '{stage}' reads the output of {_a(before)} '{before}' stage, and the recipe has none",
                    f"add {_a(before)} '{before}' stage to stages, or remove '{stage}'",
                )
            )
    data = stages.get("data")
    if "data" in stages and "generate" not in stages and data is not None and not data.input:
        problems.append(
            Problem(
                f"{p} (stages.data.input)",
                "the data stage has nothing to read: the recipe has no generate stage and no data.input",
                "add a generate stage, or give data.input: FILE (Alpaca records)",
            )
        )
    generate = stages.get("generate")
    if data is not None and data.include_seeds and generate is not None and not generate.seeds:
        problems.append(
            Problem(
                where["data"],
                "'include_seeds' takes the generate stage's seeds, and its method (magpie) reads none",
                "remove include_seeds, or give the generate stage seeds and method self-instruct or evol",
            )
        )
    if data is not None and data.include_seeds and "generate" not in stages:
        problems.append(
            Problem(
                where["data"],
                "'include_seeds' takes the generate stage's seeds, and the recipe has no generate stage",
                "add a generate stage, or remove include_seeds",
            )
        )
    if "generate" in stages and data is not None and data.input:
        problems.append(
            Problem(
                f"{p} (stages.data.input)",
                "is given, but the generate stage's records are what the data stage reads",
                "remove data.input, or remove the generate stage",
            )
        )
    return problems


def resolve_path(value: str, base: Path) -> Path:
    """A path relative to the recipe file, or a shipped file's (an unknown one's does not exist:
    the recipe's problems name it with the others)."""
    if is_shipped(value):
        return shipped_folder() / value[len(PACKAGE_PREFIX) :]
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def resolve_model(value: str, base: Path) -> str:
    """A model given as a folder or file relative to the recipe, else a name as it is."""
    candidate = resolve_path(value, base)
    return str(candidate) if (value.startswith((".", "/", "~")) or candidate.exists()) else value


__all__ = ["REQUIRED", "STAGES", "Recipe", "load_recipe"]
