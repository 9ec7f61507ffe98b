"""Where a run's metrics go besides train_summary.json and loss.png, and the Trainer settings we
do not model.

`--report-to`: tensorboard is our own writer (OUTPUT/tensorboard, `callbacks.tensorboard_callback`);
wandb and mlflow are transformers' integrations, kept offline and inside OUTPUT unless the user
configured them (`reporting`). `--trainer-arg KEY=VALUE`: any field of the method's arguments
class (TrainingArguments, or TRL's config that extends it), typed as that class declares it and
refused before any model loads (`parse_trainer_args`, `check`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import functools
import importlib.util
import json
import os
import sys
import tempfile
import types
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from ..core.config_fields import leaves
from ..core.errors import Problem, UserError, ValidationError
from .config import TrainConfig

FLAG = "--trainer-arg"

# TRL's arguments class per training objective (each extends TrainingArguments); SimPO is TRL's
# CPO trainer with loss_type="simpo".
TRL_CLASSES = {
    "reward": ("trl", "RewardConfig"),
    "dpo": ("trl", "DPOConfig"),
    "kto": ("trl", "KTOConfig"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig"),
    "simpo": ("trl.experimental.cpo", "CPOConfig"),
}

# Trainer fields that one of our settings decides, by another name than the field's (fields that
# share a setting's name, like seed or learning_rate, are found in TrainConfig itself).
OUR_FLAGS = {
    "output_dir": "--output",
    "per_device_train_batch_size": "--batch-size",
    "per_device_eval_batch_size": "--batch-size",
    "gradient_accumulation_steps": "--gradient-accumulation or --global-batch-size",
    "num_train_epochs": "--epochs",
    "lr_scheduler_type": "--lr-schedule",
    "warmup_steps": "--warmup-ratio",
    "warmup_ratio": "--warmup-ratio",
    "bf16": "--dtype",
    "fp16": "--dtype",
    "data_seed": "--seed",
    "torch_compile": "--compile",
    "activation_checkpointing": "--gradient-checkpointing",
    "resume_from_checkpoint": "--resume",
    "group_by_length": "--batching grouped",
    "train_sampling_strategy": "--batching",
    "eval_strategy": "--val or --val-size (validation runs when there is validation data)",
    "save_strategy": "--save-steps",
    "logging_strategy": "--logging-steps",
    "max_length": "--max-seq-len",
    "loss_type": "--dpo-loss (DPO); --method simpo picks SimPO's",
    "precompute_ref_log_probs": "--precompute-reference",
    "desirable_weight": "--kto-desirable-weight",
    "undesirable_weight": "--kto-undesirable-weight",
}

# Trainer fields alpaca-forge fixes, and why: changing them would break what we promise.
FIXED = {
    "remove_unused_columns": "our collator's token counts ride along in each batch",
    "save_safetensors": "checkpoints and models are written as safetensors",
    "save_only_model": "--resume needs the optimiser and scheduler states in each checkpoint",
    "use_cpu": "the device follows CUDA_VISIBLE_DEVICES (empty: the CPU)",
    "disable_tqdm": "alpaca-forge draws its own progress bar (-q hides it)",
    "dataset_num_proc": "the pairs are tokenised by alpaca-forge before the trainer sees them",
    "cpo_alpha": "SimPO is CPO without its NLL term (cpo_alpha 0)",
}

TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def args_class(objective: str) -> type:
    """The arguments class the method's trainer takes: TRL's config for its trainers."""
    if objective not in TRL_CLASSES:
        from transformers import TrainingArguments

        return TrainingArguments
    module, name = TRL_CLASSES[objective]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental says it is experimental at import
        return getattr(importlib.import_module(module), name)


def check(config: TrainConfig) -> dict[str, Any]:
    """Everything about --report-to and --trainer-arg that can fail, before any model loads: the
    tracker's package, and the trainer args parsed and accepted by the arguments class."""
    if config.report_to in ("wandb", "mlflow"):
        package = {"wandb": "wandb", "mlflow": "mlflow"}[config.report_to]
        if importlib.util.find_spec(package) is None:
            raise UserError(
                f"--report-to {config.report_to} needs the {package} package, which is not installed",
                f"pip install {package} (or the smaller mlflow-skinny), or use --report-to tensorboard"
                if package == "mlflow"
                else f"pip install {package}, or use --report-to tensorboard",
            )
    cls = args_class(config.objective)
    parsed = parse_trainer_args(config, cls)
    if parsed:
        _try_arguments(cls, parsed)
    return parsed


def parse_trainer_args(config: TrainConfig, cls: type | None = None) -> dict[str, Any]:
    """--trainer-arg KEY=VALUE pairs as {field: typed value}; every problem reported at once."""
    if cls is None:
        from transformers import TrainingArguments

        cls = TrainingArguments
    hints = _field_types(cls)
    ours = _our_flags()
    parsed: dict[str, Any] = {}
    problems: list[Problem] = []
    for item in config.trainer_args:
        where = f"{FLAG} {item}"
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(Problem(where, "not of the form KEY=VALUE", f"e.g. {FLAG} adam_beta2=0.95"))
        elif key in ours:
            problems.append(
                Problem(where, f"{key} is one of our settings", f"use {ours[key]} instead of {FLAG}")
            )
        elif key in FIXED:
            problems.append(
                Problem(where, f"{key} is fixed by alpaca-forge: {FIXED[key]}", f"drop {FLAG} {key}=...")
            )
        elif key not in hints:
            close = difflib.get_close_matches(key, hints, n=3, cutoff=0.6)
            problems.append(
                Problem(
                    where,
                    f"{cls.__name__} has no field {key!r}",
                    f"did you mean {' or '.join(close)}?" if close else f"see the fields of {cls.__name__}",
                )
            )
        elif key in parsed:
            problems.append(Problem(where, f"{key} is given twice", f"give {FLAG} {key}=... once"))
        else:
            try:
                parsed[key] = coerce(text.strip(), hints[key])
            except ValueError as e:
                problems.append(
                    Problem(
                        where,
                        f"{key} takes {describe(hints[key])}, and {text!r} is not: {e}",
                        f"e.g. {FLAG} {key}={_example(hints[key])}",
                    )
                )
    if problems:
        raise ValidationError(problems, what=f"{FLAG} settings")
    return parsed


def _try_arguments(cls: type, parsed: dict[str, Any]) -> None:
    """The class's own checks (`__post_init__`) on the given values, without any model."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cls(output_dir=tmp, use_cpu=True, report_to="none", **parsed)
        except (ValueError, TypeError, KeyError) as e:
            given = " ".join(f"{FLAG} {k}={v}" for k, v in parsed.items())
            raise UserError(
                f"{given}: {cls.__name__} refuses these values: {e}", f"change the {FLAG} values"
            ) from e


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _our_flags() -> dict[str, str]:
    own = {leaf.path[-1]: leaf.flag for leaf in leaves(TrainConfig)}
    return {**own, **OUR_FLAGS}


# ---------------------------------------------------------------------------------------------
# Text to a field's type


def coerce(text: str, hint: Any) -> Any:
    """`text` read as a value of the type `hint` (bool, int, float, str, Optional, unions, enums,
    Literal, comma-separated lists, JSON objects); ValueError saying why not."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        members = sorted((a for a in args if a is not type(None)), key=_specificity)
        dicts = [m for m in members if m is dict or get_origin(m) is dict]
        if len(members) == 1 or (dicts and text.startswith("{")):  # say why it is not that one
            return coerce(text, (dicts or members)[0])
        for member in members:
            with contextlib.suppress(ValueError):
                return coerce(text, member)
        raise ValueError(f"it reads as none of {describe(hint)}")
    if origin is Literal:
        for value in args:
            if str(value).lower() == text.lower():
                return value
        raise ValueError(f"choose one of {', '.join(map(str, args))}")
    if origin in (list, tuple) or hint in (list, tuple):
        inner = args[0] if args else str
        return [coerce(part.strip(), inner) for part in text.split(",") if part.strip()]
    if origin is dict or hint is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"choose one of {', '.join(str(m.value) for m in hint)}") from None
    if hint is bool:
        if text.lower() in TRUE | FALSE:
            return text.lower() in TRUE
        raise ValueError("write true or false")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("not a whole number") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("not a number") from None
    if hint is str or hint is Any:
        return text
    raise ValueError(f"a {getattr(hint, '__name__', hint)} cannot be given as text")


def _specificity(hint: Any) -> int:
    """Union members, the most particular reading first and free text last."""
    if hint is bool:
        return 0
    if hint in (int, float):
        return 1 + (hint is float)
    if hint is str:
        return 9
    return 5


def describe(hint: Any) -> str:
    """A type as a user reads it: 'a number', 'true or false', 'one of linear, cosine, ...'."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" (or none)" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple) or hint in (list, tuple):
        return f"a comma-separated list{' of ' + describe(args[0]) if args else ''}"
    if origin is dict or hint is dict:
        return "a JSON object"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in hint)
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a text"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _example(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return _example(sorted((a for a in args if a is not type(None)), key=_specificity)[0])
    if origin is Literal:
        return str(args[0])
    if origin is dict or hint is dict:
        return "'{\"key\": 1}'"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return str(next(iter(hint)).value)
    return {bool: "true", int: "1", float: "0.5", str: "TEXT"}.get(hint, "VALUE")


# ---------------------------------------------------------------------------------------------
# wandb and mlflow, offline by default


def report_to(config: TrainConfig) -> list[str]:
    """TrainingArguments.report_to: transformers' integration for wandb or mlflow; tensorboard is
    our own callback (and none is none)."""
    return [config.report_to] if config.report_to in ("wandb", "mlflow") else []


def tracker_environment(report: list[str] | str, output: Path) -> dict[str, str]:
    """The variables a tracker needs to keep its files in `output` and off the network, unless
    the user set up the tracker (a mode, key or server of their own)."""
    env: dict[str, str] = {}
    if "wandb" in report and not {"WANDB_MODE", "WANDB_API_KEY"} & os.environ.keys():
        env.update({"WANDB_MODE": "offline", "WANDB_DIR": str(output.resolve())})
    if "wandb" in report and "WANDB_PROJECT" not in os.environ:
        env["WANDB_PROJECT"] = "alpaca-forge"
    if "mlflow" in report and "MLFLOW_TRACKING_URI" not in os.environ:
        # MLflow 3 refuses a file store unless told to allow it; a database would need SQLAlchemy
        env.update(
            {
                "MLFLOW_TRACKING_URI": (output / "mlruns").resolve().as_uri(),
                "MLFLOW_ALLOW_FILE_STORE": "true",
            }
        )
    return env


@contextlib.contextmanager
def reporting(args: Any) -> Iterator[None]:
    """Around `trainer.train()`: the tracker's variables for this run only, and its run closed
    after it, failed or not (transformers' wandb callback leaves its run open, so the next run in
    the same process would log into it)."""
    report = args.report_to or []
    env = tracker_environment(report, Path(args.output_dir))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    failed = True
    try:
        yield
        failed = False
    finally:
        try:
            _close_runs(report, failed)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _close_runs(report: list[str], failed: bool) -> None:
    if "wandb" in report and "wandb" in sys.modules:
        wandb = sys.modules["wandb"]
        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
    if "mlflow" in report and "mlflow" in sys.modules:
        mlflow = sys.modules["mlflow"]
        if mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED" if failed else "FINISHED")
