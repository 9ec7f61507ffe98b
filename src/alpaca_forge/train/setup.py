"""Setup: everything before the first step, in the order it can fail, cheapest first.

output folder and resume -> precision -> gradient accumulation -> records (and the validation
split) -> tokenizer, prompt format, examples -> model (fp32 master weights, or a 4-bit base for
QLoRA) -> LoRA wrap -> disk space -> datasets and collator. A mistake in the data shows before a
model is loaded, and nothing is trained before every check has passed.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.devices import training_precision
from ..core.errors import UserError
from ..core.examples import eos_id, fingerprint, tokenize_records
from ..core.files import check_output
from ..core.library_noise import peft_call
from ..core.models import (
    load_pretrained,
    load_tokenizer,
    model_format,
    weights_fingerprint,
)
from ..core.prompts import PromptFormat
from ..core.records import Record, read_records, split_records
from .batching import Collator, SFTDataset
from .checkpoints import CONFIG_FILE, check_resumable, checkpoints
from .config import TrainConfig
from .distributed import world_size

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What the training loop needs, all checked."""

    output: Path
    resume_from: Path | None  # the newest complete checkpoint, with --resume
    device: str  # "cuda" | "cpu"
    autocast: Any  # torch.bfloat16 / torch.float16, or None for fp32
    tokenizer: Any
    fmt: PromptFormat
    model: Any  # fp32 (full), or peft-wrapped (LoRA, QLoRA)
    train_set: SFTDataset
    val_set: SFTDataset | None
    collator: Collator
    accumulation: int  # forward passes per optimiser step
    description: dict[str, Any]  # the config and the facts of the run: saved with every checkpoint
    # Reward and preference methods (pair_setup.py): TRL wraps the model with this LoRA config,
    # and a --reference model (full fine-tunes only); the held-out rows, for the reward accuracy.
    peft_config: Any = None
    ref_model: Any = None
    val_rows: list[dict[str, Any]] | None = None


def prepare(config: TrainConfig, *, resume: bool) -> Prepared:
    """SFT's setup; reward and preference methods have theirs in pair_setup.py."""
    output, done, device, autocast, accumulation = start(config, resume)
    train_records, val_records = read_data(config)
    facts: dict[str, Any] = {
        "base_model": _base_model_name(config.model),
        "data_fingerprint": fingerprint(train_records),
        "val_fingerprint": fingerprint(val_records) if val_records else None,
    }
    resume_from = done[-1] if resume and done else None
    if resume_from:
        check_resumable(config, facts, resume_from)

    tokenizer = load_tokenizer(config.model)
    fmt = model_format(config.model, config.format, config.system, tokenizer, for_training=True)
    added_pad = tokenizer.pad_token_id is None
    if added_pad:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    eos_id(tokenizer)  # no EOS: an error now, not a model that never learns to stop
    examples, report = tokenize_records(
        train_records,
        tokenizer,
        fmt,
        config.max_seq_len,
        config.train_on_inputs,
        assistant_turns=config.assistant_turns,
    )
    if not examples:
        raise UserError(
            f"{config.data}: no record fits the window of {config.max_seq_len} tokens ({report.summary()})",
            "raise --max-seq-len, or shorten the prompts",
        )
    log.info("data: %s", report.summary())
    val_examples, val_report = tokenize_records(
        val_records,
        tokenizer,
        fmt,
        config.max_seq_len,
        config.train_on_inputs,
        assistant_turns=config.assistant_turns,
    )
    if val_records and not val_examples:
        raise UserError(
            f"no validation record fits the window of {config.max_seq_len} tokens", "raise --max-seq-len"
        )

    model = load_model(config, autocast)
    if config.weights == "lora":  # a merge checks that it is given these very base weights
        facts["base_fingerprint"] = weights_fingerprint(model)
        if autocast is not None:
            # The frozen base gets no gradient and no optimiser state, so it needs no fp32 master
            # copy: held in the compute dtype it takes half the memory and is not cast at every
            # step. The adapters stay fp32 (cast back after wrapping, below).
            model = model.to(autocast)
    if config.weights == "qlora":
        facts["layers_in_4bit"] = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    if added_pad:
        add_pad_embedding(model, tokenizer)
        log.info(
            "the tokenizer had no pad token: added <pad>, its embedding the mean of the others (as the original)"
        )
    if config.weights in ("lora", "qlora"):
        model = wrap_lora(model, config)
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():  # fp32 weights for the optimiser
                p.data = p.data.float()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if config.weights != "full":
            model.enable_input_require_grads()
    check_disk(output, estimate_checkpoint_bytes(model), config.save_total_limit)

    train_set = SFTDataset(examples, config.batching, config.max_seq_len)
    val_set = SFTDataset(val_examples, config.batching, config.max_seq_len) if val_examples else None
    facts.update(
        {
            "prompt_format": fmt.to_dict(),
            "added_pad_token": added_pad,
            "tokenized": report.to_dict(),
            "validation_tokenized": val_report.to_dict() if val_records else None,
            "items": len(train_set),
            "gradient_accumulation": accumulation,
            "processes": world_size(),
            "learning_rate": config.resolved_learning_rate(),
        }
    )
    return Prepared(
        output=output,
        resume_from=resume_from,
        device=device,
        autocast=autocast,
        tokenizer=tokenizer,
        fmt=fmt,
        model=model,
        train_set=train_set,
        val_set=val_set,
        collator=Collator(tokenizer.pad_token_id, packed=config.batching == "packed"),
        accumulation=accumulation,
        description={"config": config.to_dict(), **facts},
    )


# ---------------------------------------------------------------------------------------------
# Output, data


def start(config: TrainConfig, resume: bool) -> tuple[Path, list[Path], str, Any, int]:
    """What every method checks first: the output folder (and its complete checkpoints), torch's
    threads, the precision and device (QLoRA's CUDA), and the gradient accumulation."""
    output, done = check_output_folder(config.output, resume)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    device, autocast = training_precision(config.dtype)
    if config.weights == "qlora":
        check_qlora(device)
    return output, done, device, autocast, gradient_accumulation(config, world_size())



def check_output_folder(path: str, resume: bool) -> tuple[Path, list[Path]]:
    """The output folder and its complete checkpoints; a finished model is never overwritten and
    checkpoints are continued only with --resume."""
    output = check_output(path, flag="--output", folder=True)
    if (output / CONFIG_FILE).is_file():
        raise UserError(f"{output} already holds a finished model", "train into a new --output")
    done = checkpoints(output)
    if done and not resume:
        raise UserError(
            f"{output} already holds checkpoints of a run (latest: {done[-1].name})",
            "add --resume to continue it, or train into a new --output",
        )
    return output, done


def read_data(config: TrainConfig) -> tuple[list[Record], list[Record]]:
    """Training and validation records; `--val-size` holds records out by the one seeded split
    (`core.records.split_records`, as `data split` does)."""
    records = read_records(config.data)
    if config.val:
        return records, read_records(config.val)
    if config.val_size:
        return split_records(records, config.val_size, config.seed)
    return records, []


def _base_model_name(spec: str) -> str:
    """A local model by its absolute path (an adapter must find its base from anywhere)."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def gradient_accumulation(config: TrainConfig, processes: int) -> int:
    if not config.global_batch_size:
        return config.gradient_accumulation
    per_step = config.batch_size * processes
    if config.global_batch_size % per_step:
        nearest = per_step * max(1, round(config.global_batch_size / per_step))
        raise UserError(
            f"--global-batch-size {config.global_batch_size} is not a multiple of --batch-size x processes "
            f"= {config.batch_size} x {processes} = {per_step}",
            f"use a --global-batch-size that {per_step} divides, e.g. {nearest}",
        )
    return config.global_batch_size // per_step


# ---------------------------------------------------------------------------------------------
# Model


def check_qlora(device: str) -> None:
    if device != "cuda":
        raise UserError(
            "QLoRA keeps the base model in 4 bits with bitsandbytes, which needs a CUDA GPU; none is available",
            "use --method lora on this machine, or run on a machine with an NVIDIA GPU",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UserError("QLoRA needs the bitsandbytes package", "pip install 'alpaca-forge[qlora]'") from e


def load_model(config: TrainConfig, autocast: Any) -> Any:
    """Weights in fp32 (the master copy mixed precision needs), or a 4-bit NF4 base for QLoRA
    (computing in the autocast dtype, else bf16)."""
    import torch

    if config.weights != "qlora":
        return load_pretrained(config.model)[0].float()
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = autocast or torch.bfloat16
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    model = load_pretrained(config.model, quantization_config=quant, dtype=compute)[0]
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)


def add_pad_embedding(model: Any, tokenizer: Any) -> None:
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


def _linear_names(model: Any) -> set[str]:
    import torch

    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}:
            names.add(full.rsplit(".", 1)[-1])
    return names


def check_lora_targets(model: Any, targets: tuple[str, ...]) -> list[str] | str:
    """The targets peft gets; names that match no linear layer are an error before any compute."""
    if tuple(targets) == ("all-linear",):
        return "all-linear"
    known = _linear_names(model)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise UserError(
            f"--lora-targets {','.join(unknown)}: no linear layer of this model has that name",
            f"use all-linear or names from: {', '.join(sorted(known))}",
        )
    return list(targets)


def lora_config(model: Any, config: TrainConfig, task_type: str = "CAUSAL_LM") -> Any:
    """The LoRA adapter's settings (a reward model's: its score head trained in full too)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=check_lora_targets(model, config.lora_targets),
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )


def wrap_lora(model: Any, config: TrainConfig) -> Any:
    from peft import get_peft_model

    lora = lora_config(model, config)
    targets = lora.target_modules
    with peft_call():
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA r=%d on %s: %d trainable parameters of %d (%.2f%%)",
        config.lora_r,
        targets,
        trainable,
        total,
        100 * trainable / total,
    )
    return model


# ---------------------------------------------------------------------------------------------
# Disk


def estimate_checkpoint_bytes(model: Any) -> int:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = sum(p.numel() for p in model.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # weights (all of them, or the adapter's in fp32) + AdamW's two fp32 moments of what is trained
    saved_weights = total_bytes if trainable == params else trainable * 4
    return saved_weights + trainable * 8


def check_disk(output: Path, needed: int, keep: int) -> None:
    free = shutil.disk_usage(output).free
    want = needed * (keep + 2)  # `keep` checkpoints, one more being written, and the final model
    if free < want:
        raise UserError(
            f"{output}: {free / 1e9:.2f} GB free, but checkpoints of this run need about {want / 1e9:.2f} GB "
            f"({keep} kept + 1 being written + the final model, {needed / 1e9:.2f} GB each)",
            "free some space, point --output at a larger disk, or lower --save-total-limit",
        )
