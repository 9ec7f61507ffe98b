"""`alpaca-forge train`: supervised fine-tuning (full, LoRA, QLoRA) on HF transformers' Trainer.

    setup (setup.py) -> train (loop.py) -> save (save.py) -> cleanup

What is ours: the typed config, the exact tokenisation (`core.examples`) and batching
(`batching.py`), checks that fail before any compute is spent, checkpoints that describe
themselves and are only "latest" once complete (`checkpoints.py`), and the outputs (model or
adapter, loss curve, summary). The training loop, optimiser, schedule, mixed precision,
distributed engines (DDP, FSDP, DeepSpeed through accelerate), LoRA (peft) and 4-bit
quantisation (bitsandbytes) are the libraries'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import loop, pair_setup, save, setup, tracking
from .config import TrainConfig
from .distributed import leave_together
from .preference import method_settings


@dataclass(frozen=True)
class TrainResult:
    output: Path  # the model (or adapter) folder
    steps: int  # optimiser steps, those of an earlier run resumed from included
    first_loss: float | None  # nats per trained token, as logged
    last_loss: float | None
    eval_loss: float | None  # the last validation loss; None without validation
    padding_share: float  # of the batch tokens this run trained on
    tokens: int  # real (unpadded) tokens this run trained on, all processes
    trained_tokens: int  # of those, the ones that carried loss
    summary: dict[str, Any]  # everything, as written to train_summary.json
    model: Any = field(
        default=None, repr=False, compare=False
    )  # the trained model, in memory, on this process
    # Reward and preference methods: the last training and held-out value of each curve
    # (rewards/margins, rewards/accuracies, ... as TRL names them; eval_ for held-out), and for
    # reward the held-out pair accuracy (`eval_pair_accuracy`, measured after training).
    metrics: dict[str, Any] = field(default_factory=dict)


def run(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as `config` says; with `resume`, from the newest complete checkpoint in its output.
    Every check that can fail does so before the first step."""
    started = time.perf_counter()
    tracking.check(config)  # --report-to's package and --trainer-arg, before any model loads
    if config.objective == "sft":
        prep = setup.prepare(config, resume=resume)
    else:
        prep = pair_setup.prepare_pairs(config, resume=resume)
    trainer = loop.build_trainer(config, prep, progress=progress)
    setup_s = time.perf_counter() - started  # reading, tokenising, loading, building the Trainer
    loop.train(trainer, prep)
    summary = save.summarize(trainer, prep.description, started)
    summary["setup_s"] = round(setup_s, 2)
    metrics: dict[str, Any] = {}
    if config.objective != "sft":
        metrics = preference_metrics(config, trainer, prep)
        summary["method"] = config.method
        summary["method_settings"] = method_settings(config)
        summary["metrics"] = metrics
    save.save(config, trainer, prep, summary)
    model = trainer.accelerator.unwrap_model(trainer.model)
    leave_together()
    return TrainResult(
        output=prep.output,
        steps=summary["steps"],
        first_loss=summary["first_loss"],
        last_loss=summary["last_loss"],
        eval_loss=summary["last_eval_loss"],
        padding_share=summary["padding_share"],
        tokens=summary["tokens_seen_this_run"],
        trained_tokens=summary["trained_tokens_this_run"],
        summary=summary,
        model=model,
        metrics=metrics,
    )


def preference_metrics(config: TrainConfig, trainer: Any, prep: Any) -> dict[str, Any]:
    from .preference import final_metrics, pair_accuracy

    metrics = final_metrics(trainer.state.log_history)
    if config.objective == "reward" and prep.val_rows:
        model = trainer.accelerator.unwrap_model(trainer.model)
        metrics["eval_pair_accuracy"] = pair_accuracy(model, prep.val_rows, trainer.args.device)
    return metrics
