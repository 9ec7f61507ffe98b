"""Train: HF's Trainer runs the loop (optimiser, schedule, mixed precision, distribution); what we
hand it is the exact data, its arguments, and callbacks for checkpoints, NaNs, timing, progress.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from .checkpoints import remove_incomplete, write_failures
from .config import TrainConfig
from .distributed import is_main_process
from .setup import Prepared
from .tracking import reporting

log = logging.getLogger(__name__)


def build_trainer(config: TrainConfig, prep: Prepared, *, progress: bool) -> Any:
    """The Trainer, its arguments and callbacks: nothing runs yet."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from .batching import TokenCounts
    from .callbacks import (
        CheckpointCallback,
        CountingTrainer,
        GuardCallback,
        ProgressBar,
        StepTimer,
        tensorboard_callback,
    )

    counts = TokenCounts()
    callbacks = [
        CheckpointCallback(prep.tokenizer, prep.fmt, prep.description, config.save_total_limit),
        GuardCallback(),
        StepTimer(counts),
    ]
    if progress:
        callbacks.append(ProgressBar(counts))
    tb = None
    if config.report_to == "tensorboard" and is_main_process():
        tb = tensorboard_callback(prep.output / "tensorboard")
    if tb is not None:
        callbacks.append(tb)
    if config.objective != "sft":  # reward and preference methods: TRL's trainers, our callbacks
        from .preference import build_preference_trainer

        trainer = build_preference_trainer(
            config, prep, training_arguments(config, prep), counts, callbacks, progress=progress
        )
        trainer.remove_callback(PrinterCallback)
        return trainer
    args = TrainingArguments(**training_arguments(config, prep))
    trainer = CountingTrainer(
        counts=counts,
        model=prep.model,
        args=args,
        train_dataset=prep.train_set,
        eval_dataset=prep.val_set,
        data_collator=prep.collator,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # our bar shows the loss; no dicts on stdout
    return trainer


def training_arguments(config: TrainConfig, prep: Prepared) -> dict[str, Any]:
    """Arguments for this run's trainer, only those its arguments class knows (TrainingArguments,
    or TRL's config for the method); the --trainer-arg values last, over ours."""
    import torch

    from . import tracking

    cls = tracking.args_class(config.objective)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {
        "output_dir": str(prep.output),
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": prep.accumulation,
        "learning_rate": config.resolved_learning_rate(),
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps,
        "lr_scheduler_type": config.lr_schedule,
        "warmup_steps": config.warmup_ratio,  # below 1: a share of the steps
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "logging_steps": config.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": None,  # rotation is ours, after a checkpoint is complete
        "eval_strategy": "steps" if prep.val_set is not None else "no",
        "eval_steps": config.eval_steps or config.save_steps,
        "seed": config.seed,
        "data_seed": config.seed,
        "bf16": prep.autocast is torch.bfloat16,
        "fp16": prep.autocast is torch.float16,
        "use_cpu": prep.device == "cpu",
        "report_to": tracking.report_to(config),  # wandb, mlflow; TensorBoard is our callback
        "run_name": prep.output.name,  # the run's name in wandb and mlflow
        "disable_tqdm": True,
        "remove_unused_columns": False,  # the collator's token counts ride along in each batch
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
        "save_safetensors": True,
        "torch_compile": config.compile,
        # fused AdamW (one kernel for the whole update), on every device: said here, not left to
        # whatever this transformers version defaults to
        "optim": "adamw_torch_fused",
    }
    if config.batching == "grouped":
        if "train_sampling_strategy" in known:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    kwargs = {k: v for k, v in kwargs.items() if k in known}
    return {**kwargs, **tracking.parse_trainer_args(config, cls)}  # checked before any model loaded


def train(trainer: Any, prep: Prepared) -> None:
    """Run the loop, from the newest complete checkpoint with --resume."""
    from transformers.utils import logging as hf_logging

    if prep.resume_from:
        log.info("resuming from %s", prep.resume_from)
    if is_main_process():
        remove_incomplete(prep.output)
    hf_logging.disable_progress_bar()  # no "writing shards" bar at every checkpoint
    with (
        write_failures(
            f"{prep.output}: a write failed during training", "the last complete checkpoint is intact"
        ),
        reporting(trainer.args),  # wandb / mlflow: offline into the output, for this run only
    ):
        trainer.train(resume_from_checkpoint=str(prep.resume_from) if prep.resume_from else None)
