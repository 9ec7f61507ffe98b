"""`alpaca-forge train`: supervised fine-tuning (full, LoRA, QLoRA) on HF transformers' Trainer.

What is ours: the typed config (YAML and flags), the exact tokenisation and batching (`sft.py`),
checks that fail before any compute is spent, checkpoints that describe themselves and are only
"latest" once complete, and the outputs (model or adapter, loss curve, summary). The training
loop, optimiser, schedule, mixed precision, distributed engines (DDP, FSDP, DeepSpeed through
accelerate), LoRA (peft) and 4-bit quantisation (bitsandbytes) are the libraries'.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Problem, UserError, ValidationError
from .models import DEFAULT_MODEL
from .records import write_text_atomic
from .sft import BATCHING

log = logging.getLogger(__name__)

METHODS = ("full", "lora", "qlora")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
CONFIG_FILE = "alpaca_forge_train.json"  # in every checkpoint and in the output: what made it
COMPLETE = ".complete"  # written last into a checkpoint: only then is it one to resume from
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def _setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field: its default, the help text `--help` shows, the values it may take."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are the Alpaca recipe where it has one; `None` = derived."""

    model: str = _setting(DEFAULT_MODEL, "base model: built-in name, folder, .gguf or cached HF id")
    data: str = _setting("", "training records (Alpaca JSON/JSONL, gz too)")
    output: str = _setting("", "folder for checkpoints, the final model and reports")
    val: str | None = _setting(None, "validation records (a file)")
    val_size: int = _setting(0, "or hold out this many training records (seeded)")
    method: str = _setting("full", "full | lora | qlora (4-bit base, CUDA only)", METHODS)
    format: str | None = _setting(
        None, "prompt format: alpaca | chat | user-assistant; default: the model's saved one, else alpaca"
    )
    system: str | None = _setting(None, "system message for the chat format")
    max_seq_len: int = _setting(512, "longest example in tokens; longer responses are cut, EOS kept")
    train_on_inputs: bool = _setting(False, "also learn the prompt tokens (off: prompts are masked)")
    batching: str = _setting(
        "packed", "packed | grouped (by length) | padded (random, as the original)", BATCHING
    )
    epochs: float = _setting(3.0, "passes over the data")
    max_steps: int = _setting(-1, "stop after this many optimiser steps (-1: run the epochs)")
    batch_size: int = _setting(4, "items per device per forward pass (packed: rows)")
    global_batch_size: int | None = _setting(
        None, "items per optimiser step over all devices; sets gradient accumulation (the original: 128)"
    )
    gradient_accumulation: int = _setting(1, "forward passes per optimiser step (if no global batch size)")
    learning_rate: float | None = _setting(None, "peak learning rate (default: 2e-5 full, 2e-4 LoRA)")
    lr_schedule: str = _setting("cosine", "learning-rate schedule", SCHEDULES)
    warmup_ratio: float = _setting(0.03, "share of steps warming the learning rate up")
    weight_decay: float = _setting(0.0, "AdamW weight decay")
    max_grad_norm: float = _setting(1.0, "gradient clipping norm")
    dtype: str = _setting(
        "auto",
        "auto (bf16 on a GPU that has it, else fp32) | float32 | bfloat16 | float16 (CUDA, loss-scaled)",
        DTYPES,
    )
    seed: int = _setting(42, "seeds initialisation, data order and dropout")
    gradient_checkpointing: bool = _setting(False, "trade compute for memory")
    lora_r: int = _setting(8, "LoRA rank")
    lora_alpha: int = _setting(16, "LoRA scaling numerator")
    lora_dropout: float = _setting(0.05, "dropout on the LoRA path")
    lora_targets: list[str] = _setting(  # noqa: RUF009 (a field with a default_factory)
        ["all-linear"], "module names LoRA adapts (e.g. q_proj,v_proj); all-linear = every linear projection"
    )
    merge: bool = _setting(False, "LoRA: also write base+adapter merged, to OUTPUT/merged")
    logging_steps: int = _setting(10, "log loss every N steps")
    eval_steps: int | None = _setting(None, "validation loss every N steps (default: as save_steps)")
    save_steps: int = _setting(200, "checkpoint every N steps")
    save_total_limit: int = _setting(2, "keep this many newest checkpoints")
    threads: int | None = _setting(None, "CPU threads for torch (default: torch's choice)")

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-5 if self.method == "full" else 2e-4

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Settings that may change when a run resumes; every other one must match the checkpoint's.
_MAY_CHANGE_ON_RESUME = {
    "output",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "threads",
    "merge",
}


def _type_name(f: dataclasses.Field) -> str:
    t = str(f.type)
    if "list" in t:
        return "a list of names"
    if "bool" in t:
        return "true or false"
    if "int" in t:
        return "a whole number"
    if "float" in t:
        return "a number"
    return "a text"


def coerce(name: str, value: Any, where: str) -> Any:
    """A value from a YAML file or a flag, checked and converted to the field's type."""
    f = _FIELDS[name]
    t = str(f.type)

    def bad() -> UserError:
        return UserError(
            f"{where}: '{name}' must be {_type_name(f)}, not {value!r}",
            f"set {name}: {f.default if f.default is not dataclasses.MISSING else '...'}  ({f.metadata.get('help', '')})",
        )

    if value is None:
        if "None" in t:
            return None
        raise bad()
    if "list" in t:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
            raise bad()
        return value
    if "bool" in t:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise bad()
    if "int" in t and "float" not in t:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad()
        try:
            return int(value)
        except ValueError:
            raise bad() from None
    if "float" in t:
        if isinstance(value, bool):
            raise bad()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad() from None
    if not isinstance(value, str):
        raise bad()
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{where}: '{name}' is {value!r}", f"use one of: {', '.join(choices)}")
    return value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config's settings, each checked, with file:line in every error."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{p}: cannot read the config ({e.strerror})", "check the path") from e
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise UserError(
            f"{where}: not valid YAML ({getattr(e, 'problem', e)})", "fix the syntax at that line"
        ) from e
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{p}: a config is a mapping of settings", "write one `name: value` per line")
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    for key_node, value_node in root.value:
        where = f"{p}:{key_node.start_mark.line + 1}"
        name = str(key_node.value).replace("-", "_")
        if name not in _FIELDS:
            close = [n for n in _FIELDS if n.startswith(name[:4])] or sorted(_FIELDS)
            problems.append(
                Problem(
                    where,
                    f"unknown setting '{key_node.value}'",
                    f"known settings include: {', '.join(close)}",
                )
            )
            continue
        try:
            values[name] = coerce(name, yaml.safe_load(yaml.serialize(value_node)), where)
        except UserError as e:
            problems.append(Problem(where, e.message.split(": ", 1)[1], e.fix or ""))
    if problems:
        raise ValidationError(problems, what=str(p))
    return values


def resolve_config(file: str | None, flags: dict[str, Any]) -> TrainConfig:
    """Defaults, then the YAML file, then flags (flags win)."""
    values = read_config_file(file) if file else {}
    for name, value in flags.items():
        if value is not None:
            values[name] = coerce(name, value, f"--{name.replace('_', '-')}")
    cfg = TrainConfig(**values)
    for name in ("data", "output"):
        if not getattr(cfg, name):
            raise UserError(f"no {name} given", f"pass --{name} (or set {name}: in the config file)")
    positive = ("max_seq_len", "batch_size", "gradient_accumulation", "logging_steps", "save_steps", "lora_r")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(
                f"'{name}' must be at least 1, not {getattr(cfg, name)}", f"set {name} to a positive number"
            )
    if cfg.val and cfg.val_size:
        raise UserError(
            "both a validation file and a validation size given", "use --val FILE or --val-size N, not both"
        )
    if not 0 <= cfg.warmup_ratio < 1:
        raise UserError(f"warmup_ratio {cfg.warmup_ratio} is outside [0, 1)", "the original used 0.03")
    return cfg


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoints(output: Path, complete_only: bool = True) -> list[Path]:
    """The run's checkpoints, oldest first."""
    found = []
    for p in output.glob("checkpoint-*"):
        m = _CHECKPOINT.fullmatch(p.name)
        if m and p.is_dir() and (not complete_only or (p / COMPLETE).is_file()):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_resumable(cfg: TrainConfig, facts: dict[str, Any], checkpoint: Path) -> None:
    """A checkpoint resumes only the run that wrote it: same settings and same data."""
    try:
        saved = json.loads((checkpoint / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"{checkpoint}: its description {CONFIG_FILE} is unreadable ({e})",
            "resume from another checkpoint or start over",
        ) from e
    diffs = [
        f"{k}: {saved['config'].get(k)!r} then, {v!r} now"
        for k, v in cfg.to_dict().items()
        if k not in _MAY_CHANGE_ON_RESUME and saved["config"].get(k) != v
    ]
    for k in ("data_fingerprint", "val_fingerprint"):
        if saved.get(k) != facts.get(k):
            diffs.append(f"{k}: {saved.get(k)} then, {facts.get(k)} now (the data changed)")
    if diffs:
        raise UserError(
            f"{checkpoint} was written by a different run: " + "; ".join(diffs),
            "resume with the same settings and data, or train into a new --output",
        )


# ---------------------------------------------------------------------------------------------
# The run


def _pick_precision(cfg: TrainConfig) -> tuple[str, Any]:
    """(device type, autocast dtype or None for fp32)."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.dtype == "auto":
        return ("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else None) if cuda else ("cpu", None)
    if cfg.dtype == "float16":
        if not cuda:
            raise UserError(
                "float16 training needs a CUDA GPU (it relies on loss scaling, which runs there)",
                "on a CPU use --dtype bfloat16 or float32",
            )
        return "cuda", torch.float16
    if cfg.dtype == "bfloat16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bfloat16", "use --dtype float16 (loss-scaled) or float32")
        if not cuda and cpu_has_native_bf16() is False:
            log.warning(
                "warning: this CPU has no bfloat16 instructions (no AVX512-BF16 or AMX): bfloat16 "
                "matrix products are emulated and run far slower than float32 (130x, measured on an "
                "AVX2 EPYC); use --dtype float32 here"
            )
        return ("cuda" if cuda else "cpu"), torch.bfloat16
    return ("cuda" if cuda else "cpu"), None


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16); None where
    the CPU's flags cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags = {
        word
        for line in text.splitlines()
        if line.lower().startswith(("flags", "features"))
        for word in line.split(":", 1)[-1].split()
    }
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _linear_names(model: Any) -> set[str]:
    import torch

    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}:
            names.add(full.rsplit(".", 1)[-1])
    return names


def check_lora_targets(model: Any, targets: list[str]) -> list[str] | str:
    """The targets peft gets; names that match no linear layer are an error before any compute."""
    if targets == ["all-linear"]:
        return "all-linear"
    known = _linear_names(model)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise UserError(
            f"LoRA targets {', '.join(unknown)} match no linear layer of this model",
            f"use all-linear or names from: {', '.join(sorted(known))}",
        )
    return targets


def _estimate_checkpoint_bytes(model: Any) -> int:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # weights (all, or the adapter) + AdamW's two fp32 moments of what is trained
    saved_weights = total if trainable == sum(p.numel() for p in model.parameters()) else trainable * 4
    return saved_weights + trainable * 8


def check_disk(output: Path, needed: int, keep: int) -> None:
    free = shutil.disk_usage(output).free
    # `keep` checkpoints, one more being written, and the final model
    want = needed * (keep + 2)
    if free < want:
        raise UserError(
            f"{output}: {free / 1e9:.2f} GB free, but checkpoints of this run need about {want / 1e9:.2f} GB "
            f"({keep} kept + 1 being written + the final model, {needed / 1e9:.2f} GB each)",
            "free some space, point --output at a larger disk, or lower --save-total-limit",
        )


@dataclass
class TrainResult:
    output: Path
    summary: dict[str, Any]


def _training_args_kwargs() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as `cfg` says. Every check that can fail does so before the first step."""
    import torch

    from . import sft
    from .models import load_tokenizer
    from .records import read_records

    started = time.perf_counter()
    output = Path(cfg.output).expanduser()
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder", "give --output a folder path")
    if (output / CONFIG_FILE).is_file():
        raise UserError(f"{output} already holds a finished model", "train into a new --output")
    done = checkpoints(output) if output.is_dir() else []
    if done and not resume:
        raise UserError(
            f"{output} already holds checkpoints of a run (latest: {done[-1].name})",
            "add --resume to continue it, or train into a new --output",
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, autocast = _pick_precision(cfg)
    if cfg.method == "qlora":
        _check_qlora(device)

    # Data first: every problem in it shows before a model is loaded.
    train_records = read_records(cfg.data)
    if cfg.val:
        val_records = read_records(cfg.val)
    elif cfg.val_size:
        train_records, val_records = sft.split_validation(train_records, cfg.val_size, cfg.seed)
    else:
        val_records = []
    facts: dict[str, Any] = {
        "base_model": str(Path(cfg.model).expanduser().resolve())
        if Path(cfg.model).expanduser().exists()
        else cfg.model,
        "data_fingerprint": sft.fingerprint(train_records),
        "val_fingerprint": sft.fingerprint(val_records) if val_records else None,
    }
    if resume and done:
        check_resumable(cfg, facts, done[-1])

    tokenizer = load_tokenizer(cfg.model)
    fmt = training_format(cfg.model, cfg.format, cfg.system)
    added_pad = tokenizer.pad_token_id is None
    if added_pad:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    sft.eos_id(tokenizer)
    examples, report = sft.tokenize_records(
        train_records, tokenizer, fmt, cfg.max_seq_len, cfg.train_on_inputs
    )
    if not examples:
        raise UserError(
            f"{cfg.data}: no record fits the window of {cfg.max_seq_len} tokens ({report.summary()})",
            "raise --max-seq-len, or shorten the prompts",
        )
    log.info("data: %s", report.summary())
    val_examples, val_report = sft.tokenize_records(
        val_records, tokenizer, fmt, cfg.max_seq_len, cfg.train_on_inputs
    )
    if val_records and not val_examples:
        raise UserError(
            f"no validation record fits the window of {cfg.max_seq_len} tokens", "raise --max-seq-len"
        )

    model = _load_model(cfg, autocast)
    if cfg.method == "qlora":
        facts["layers_in_4bit"] = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    if added_pad:
        _add_pad_embedding(model, tokenizer)
        log.info(
            "the tokenizer had no pad token: added <pad>, its embedding the mean of the others (as the original)"
        )
    if cfg.method in ("lora", "qlora"):
        model = _wrap_lora(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.method != "full":
            model.enable_input_require_grads()
    output.mkdir(parents=True, exist_ok=True)
    check_disk(output, _estimate_checkpoint_bytes(model), cfg.save_total_limit)

    train_set = sft.SFTDataset(examples, cfg.batching, cfg.max_seq_len)
    val_set = sft.SFTDataset(val_examples, cfg.batching, cfg.max_seq_len) if val_examples else None
    collator = sft.Collator(tokenizer.pad_token_id, cfg.batching == "packed")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = cfg.gradient_accumulation
    if cfg.global_batch_size:
        per_step = cfg.batch_size * world
        if cfg.global_batch_size % per_step:
            raise UserError(
                f"global batch {cfg.global_batch_size} is not a multiple of batch_size x processes = {per_step}",
                f"use a global batch size that {per_step} divides, e.g. {per_step * max(1, round(cfg.global_batch_size / per_step))}",
            )
        accumulation = cfg.global_batch_size // per_step
    facts.update(
        {
            "prompt_format": fmt.to_dict(),
            "added_pad_token": added_pad,
            "tokenized": report.to_dict(),
            "validation_tokenized": val_report.to_dict() if val_records else None,
            "items": len(train_set),
            "gradient_accumulation": accumulation,
            "processes": world,
            "learning_rate": cfg.resolved_learning_rate(),
        }
    )
    description = {"config": cfg.to_dict(), **facts}

    trainer = _build_trainer(
        cfg,
        model,
        tokenizer,
        fmt,
        train_set,
        val_set,
        collator,
        accumulation,
        device,
        autocast,
        description,
        progress,
    )
    resume_from = str(done[-1]) if resume and done else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    if _is_main_process():
        _remove_incomplete(output)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "writing shards" bar at every checkpoint
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except Exception as e:
        if not _is_write_failure(e):
            raise
        raise UserError(
            f"{output}: a write failed during training ({_first_line(e)}); the last complete checkpoint is intact",
            "free disk space, then run the same command with --resume",
        ) from e
    return _finish(cfg, trainer, tokenizer, fmt, output, description, started)


def _is_write_failure(e: BaseException) -> bool:
    """Out of disk (or quota, or a file-size limit) while saving, whichever library was writing."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return (type(e).__name__ == "SafetensorError" and "I/O error" in text) or (
        isinstance(e, RuntimeError) and ("file write failed" in text or "PytorchStreamWriter" in text)
    )


def _first_line(e: BaseException) -> str:
    return (getattr(e, "strerror", None) or str(e)).splitlines()[0][:200]


def _is_main_process() -> bool:
    """Before the Trainer sets up distribution, the launcher's RANK says who writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def training_format(spec: str, name: str | None, system: str | None) -> Any:
    """The prompt format a model is trained with: the one asked for, else the one saved with the
    model, else Alpaca; `system` overrides the format's own system message."""
    from .models import saved_format_of
    from .prompts import get_format

    if name is None:
        saved = saved_format_of(spec)
        if saved is not None and system is None:
            return saved
        name = saved.name if saved else "alpaca"
    return get_format(name, system)


def _check_qlora(device: str) -> None:
    if device != "cuda":
        raise UserError(
            "QLoRA keeps the base model in 4 bits with bitsandbytes, which needs a CUDA GPU; none is available",
            "use --method lora on this machine, or run on a machine with an NVIDIA GPU",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UserError("QLoRA needs the bitsandbytes package", "pip install 'alpaca-forge[qlora]'") from e


def _load_model(cfg: TrainConfig, autocast: Any) -> Any:
    """Weights in fp32 (the master copy mixed precision needs), or 4-bit for QLoRA."""
    import torch

    from .models import load_pretrained

    if cfg.method != "qlora":
        return load_pretrained(cfg.model)[0].float()
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = autocast or torch.bfloat16
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    model = load_pretrained(cfg.model, quantization_config=quant, dtype=compute)[0]
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)


def _add_pad_embedding(model: Any, tokenizer: Any) -> None:
    """Grow the vocabulary by the new pad token; its input and output rows start at the mean."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(dim=0, keepdim=True)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[old:] = out.weight[:old].mean(dim=0, keepdim=True)
    model.config.pad_token_id = tokenizer.pad_token_id


def _wrap_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = check_lora_targets(model, cfg.lora_targets)
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA r=%d on %s: %d trainable parameters of %d (%.2f%%)",
        cfg.lora_r,
        targets,
        trainable,
        total,
        100 * trainable / total,
    )
    return model


def _remove_incomplete(output: Path) -> None:
    """A checkpoint a kill cut short is never resumed from; clear it so it cannot confuse anyone."""
    complete = set(checkpoints(output))
    for p in checkpoints(output, complete_only=False):
        if p not in complete:
            shutil.rmtree(p, ignore_errors=True)


def _build_trainer(
    cfg: TrainConfig,
    model: Any,
    tokenizer: Any,
    fmt: Any,
    train_set: Any,
    val_set: Any,
    collator: Any,
    accumulation: int,
    device: str,
    autocast: Any,
    description: dict[str, Any],
    progress: bool,
) -> Any:
    import torch
    from transformers import TrainingArguments

    from .sft import TokenCounts
    from .train_callbacks import (
        CheckpointCallback,
        CountingTrainer,
        GuardCallback,
        ProgressBar,
        StepTimer,
        tensorboard_callback,
    )

    known = _training_args_kwargs()
    kwargs: dict[str, Any] = {
        "output_dir": cfg.output,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": accumulation,
        "learning_rate": cfg.resolved_learning_rate(),
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "lr_scheduler_type": cfg.lr_schedule,
        "warmup_steps": cfg.warmup_ratio,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "logging_steps": cfg.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": None,  # rotation is ours, after a checkpoint is complete
        "eval_strategy": "steps" if val_set is not None else "no",
        "eval_steps": cfg.eval_steps or cfg.save_steps,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": autocast is torch.bfloat16,
        "fp16": autocast is torch.float16,
        "use_cpu": device == "cpu",
        "report_to": "none",
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
        "save_safetensors": True,
    }
    if cfg.batching == "grouped":
        if "train_sampling_strategy" in known:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    args = TrainingArguments(**{k: v for k, v in kwargs.items() if k in known})
    callbacks = [
        CheckpointCallback(tokenizer, fmt, description, cfg.save_total_limit),
        GuardCallback(),
        StepTimer(counts := TokenCounts()),
    ]
    if progress:
        callbacks.append(ProgressBar(counts))
    tb = tensorboard_callback(Path(cfg.output) / "tensorboard") if _is_main_process() else None
    if tb is not None:
        callbacks.append(tb)
    trainer = CountingTrainer(
        counts=counts,
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=collator,
        callbacks=callbacks,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our bar shows the loss; no dicts on stdout
    return trainer


def _finish(
    cfg: TrainConfig,
    trainer: Any,
    tokenizer: Any,
    fmt: Any,
    output: Path,
    description: dict[str, Any],
    started: float,
) -> TrainResult:
    from .train_callbacks import StepTimer, plot_losses

    state = trainer.state
    history = state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    summary = {
        **description,
        "steps": state.global_step,
        "epochs_done": state.epoch,
        "first_loss": train_losses[0] if train_losses else None,
        "last_loss": train_losses[-1] if train_losses else None,
        "last_eval_loss": eval_losses[-1] if eval_losses else None,
        "train_runtime_s": next((h["train_runtime"] for h in history if "train_runtime" in h), None),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    counts = _all_counts(trainer.counts)
    summary["padding_share"] = round(counts.padding_share, 4)
    summary["tokens_seen_this_run"] = counts.real
    summary["trained_tokens_this_run"] = counts.trained
    timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer))
    summary.update(timer.summary(trainer.args.world_size))
    summary["rank_checksums"] = _rank_checksums(trainer)
    tmp = output / ".final-tmp"
    try:
        if trainer.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(tmp))  # every process takes part (FSDP and DeepSpeed gather here)
        if trainer.is_world_process_zero():
            model = trainer.accelerator.unwrap_model(trainer.model)
            _save_final(cfg, model, tokenizer, fmt, tmp, output, summary)
            plot = plot_losses(history, output / "loss.png")
            if plot:
                summary["loss_plot"] = str(plot)
            write_text_atomic(
                output / "train_summary.json", json.dumps(summary, indent=2, default=str) + "\n"
            )
    except Exception as e:
        if not _is_write_failure(e):
            raise
        raise UserError(
            f"{output}: saving the final model failed ({_first_line(e)}); the checkpoints are intact",
            "free disk space, then run the same command with --resume",
        ) from e
    finally:
        if trainer.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Leave together: a process exiting while another still talks to it aborts (gloo).
        torch.distributed.destroy_process_group()
    return TrainResult(output, summary)


def _gather(value: Any) -> list[Any]:
    """`value` from every process, in rank order (just `[value]` without distribution)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _all_counts(counts: Any) -> Any:
    """Token counts summed over every process."""
    from .sft import TokenCounts

    total = TokenCounts()
    for c in _gather((counts.real, counts.padding, counts.trained)):
        total.add(c)
    return total


def _rank_checksums(trainer: Any) -> list[float]:
    """One number per process summarising its weights: equal numbers = the ranks agree."""
    import torch

    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        total = sum(float(p.detach().double().sum()) for p in model.parameters() if p.is_floating_point())
    return _gather(total)


def _save_final(
    cfg: TrainConfig, model: Any, tokenizer: Any, fmt: Any, tmp: Path, output: Path, summary: dict[str, Any]
) -> None:
    """Complete the model (or adapter) the Trainer wrote into `tmp`, then move it in: the model's
    description goes last, so a kill during the save leaves nothing that loads half-written."""
    from .prompts import save_format

    tokenizer.save_pretrained(tmp)
    save_format(tmp, fmt)
    if cfg.method != "full":
        summary["adapter"] = verify_adapter(tmp, model)
    write_text_atomic(tmp / CONFIG_FILE, json.dumps(summary, indent=2, default=str) + "\n")
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_FILE):
        if item.name != "training_args.bin":
            os.replace(item, output / item.name)
    _fsync_dir(output)
    if cfg.method != "full" and cfg.merge:
        from .models import load_pretrained, save_model

        # QLoRA: merging into the 4-bit base would quantise the update away and need bitsandbytes
        # to load; the adapter goes onto the base in full precision instead.
        merged = load_pretrained(str(output))[0] if cfg.method == "qlora" else model.merge_and_unload()
        save_model(merged, tokenizer, output / "merged", fmt)
        summary["merged"] = str(output / "merged")
        log.info("merged model: %s", output / "merged")


def verify_adapter(folder: Path, model: Any) -> dict[str, Any]:
    """The saved adapter holds every trained LoRA tensor (the alpaca-lora empty-adapter bug)."""
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{folder}: the adapter was not written as safetensors", "report this as a bug")
    with safe_open(str(path), "pt") as f:
        keys = [k for k in f.keys() if "lora_" in k]  # noqa: SIM118 (safe_open is no dict)
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    if not keys or numel != trainable:
        raise UserError(
            f"{path}: the saved adapter holds {numel} values in {len(keys)} tensors, but {trainable} were trained",
            "report this as a bug; the checkpoints hold the trained weights",
        )
    return {"file": path.name, "tensors": len(keys), "parameters": numel, "bytes": path.stat().st_size}
