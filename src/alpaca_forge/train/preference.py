"""Reward models and learning from preferences through TRL's trainers, on our token ids.

    reward -> trl.RewardTrainer          dpo -> trl.DPOTrainer         kto -> trl.KTOTrainer
    orpo   -> trl.experimental ORPO      simpo -> trl.experimental CPO (loss "simpo", cpo_alpha 0)

What is ours: the data (`pair_data.py`: SFT's prompt rendering, truncation and EOS), the
arguments (`loop.training_arguments`, so --trainer-arg and --report-to apply to every method, plus
the method's knobs), and the callbacks (self-describing checkpoints, the NaN guard, timing, the
bar). Each trainer is TRL's class with a small mixin: it takes our pre-tokenised columns as they
are, counts the tokens each step trains on, and writes no model card.

LoRA: TRL gets the base model and a `LoraConfig`; it wraps the model itself, so its reference is
the base with the adapter disabled (no second model, no reference adapter: `trainer.ref_model` is
None). Full: with --precompute-reference (the default) the reference log-probs are computed once
by the starting model before the first step and no copy is kept; without it, a second copy (or
--reference) is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from ..core.library_noise import peft_call
from .batching import TokenCounts
from .config import TrainConfig
from .setup import Prepared

log = logging.getLogger(__name__)

# The curves each method logs (TRL's names); the summary keeps the last training and held-out value.
METRICS = (
    "rewards/margins",
    "rewards/accuracies",
    "rewards/chosen",
    "rewards/rejected",
    "accuracy",  # reward
    "margin",  # reward
    "kl",  # kto
    "log_odds_ratio",  # orpo
)


class _Ours:
    """Mixed into a TRL trainer: our pre-tokenised columns pass through, token counts, no model card."""

    counts: TokenCounts

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, name: str) -> Any:
        """dpo, kto, reward: the rows are already our ids (pair_data.rows_for). KTO's KL term reads
        each row's answer paired with another row's prompt: the answers rotated by one within
        each batch, as TRL's own preparation does."""
        if getattr(self, "calculate_KL", False) and "completion_ids" in dataset.column_names:

            def rotate(batch: dict[str, list]) -> dict[str, list]:
                ids = batch["completion_ids"]
                return {"KL_completion_ids": [ids[-1], *ids[:-1]]}

            dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset

    def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:  # orpo, cpo
        prompt, out = feature["prompt_ids"], {}
        for side in ("chosen", "rejected"):
            ids = prompt + feature[f"{side}_ids"]
            out[f"{side}_input_ids"] = ids
            out[f"{side}_attention_mask"] = [1] * len(ids)
            out[f"{side}_labels"] = [-100] * len(prompt) + feature[f"{side}_ids"]
        out["prompt_input_ids"] = prompt
        out["prompt_attention_mask"] = [1] * len(prompt)
        return out

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        return None  # no README.md in the output: the summary says what made the model

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        real = padding = trained = 0
        for key, value in inputs.items():
            if key.startswith("prompt_"):  # orpo, cpo: the prompt alone, inside the sequences too
                continue
            if key.endswith("attention_mask") and hasattr(value, "sum"):
                n = int(value.sum())
                real += n
                padding += value.numel() - n
            elif key.endswith("completion_mask") and hasattr(value, "sum"):
                trained += int(value.sum())
            elif key.endswith("_labels") and hasattr(value, "ne"):
                trained += int(value.ne(-100).sum())
        self.counts.add((real, padding, trained or real))
        return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]


def _classes(objective: str) -> tuple[type, type]:
    """(trainer class with our mixin, its config class) for a method."""
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        base, cfg = DPOTrainer, DPOConfig
    elif objective == "kto":
        from trl import KTOConfig, KTOTrainer

        base, cfg = KTOTrainer, KTOConfig
    elif objective == "reward":
        from trl import RewardConfig, RewardTrainer

        base, cfg = RewardTrainer, RewardConfig
    elif objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        base, cfg = ORPOTrainer, ORPOConfig
    else:  # simpo
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        base, cfg = CPOTrainer, CPOConfig
    return type(f"Our{base.__name__}", (_Ours, base), {}), cfg


def method_settings(config: TrainConfig) -> dict[str, Any]:
    """The method's knobs as TRL's config fields; an unset knob keeps TRL's default."""
    o = config.objective
    given: dict[str, Any] = {}
    if config.beta is not None:
        given["beta"] = config.beta
    if o == "dpo":
        given["loss_type"] = [config.dpo_loss or "sigmoid"]
        if config.label_smoothing is not None:
            given["label_smoothing"] = config.label_smoothing
    if o in ("dpo", "kto"):
        given["precompute_ref_log_probs"] = config.precompute_reference is not False
    if o == "kto":
        given["train_sampling_strategy"] = "sequential"  # its KL pairs rows of one batch; pair_setup shuffles
        if config.kto_desirable_weight is not None:
            given["desirable_weight"] = config.kto_desirable_weight
        if config.kto_undesirable_weight is not None:
            given["undesirable_weight"] = config.kto_undesirable_weight
    if o == "simpo":
        given.update({"loss_type": "simpo", "cpo_alpha": 0.0})
        given.setdefault("beta", 2.0)  # SimPO's paper; CPO's own default is DPO's 0.1
        if config.simpo_gamma is not None:
            given["simpo_gamma"] = config.simpo_gamma
    return given


def checkpointing_key(known: set[str]) -> str:
    return "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"


def trainer_arguments(config: TrainConfig, arguments: dict[str, Any], cfg_class: type) -> Any:
    """TRL's config for the method: `arguments` (loop.training_arguments, as SFT's) and the knobs."""
    known = {f.name for f in dataclasses.fields(cfg_class)}
    kwargs = {k: v for k, v in arguments.items() if k in known}
    kwargs.update(
        {
            # TRL's default is on; transformers 5 names it activation_checkpointing (the old
            # name still works, with a FutureWarning at every run)
            checkpointing_key(known): config.gradient_checkpointing,
            "max_length": None,  # our ids already fit max_seq_len (cut as SFT cuts)
            "dataset_num_proc": None,
        }
    )
    kwargs.update(method_settings(config))
    if config.objective in ("orpo", "simpo"):
        kwargs["max_length"] = config.max_seq_len
    if config.objective == "reward":
        kwargs["center_rewards_coefficient"] = None
    from .tracking import parse_trainer_args

    kwargs.update(parse_trainer_args(config, cfg_class))  # --trainer-arg last, over ours
    return cfg_class(**{k: v for k, v in kwargs.items() if k in known})


def build_preference_trainer(
    config: TrainConfig,
    prep: Prepared,
    arguments: dict[str, Any],
    counts: TokenCounts,
    callbacks: list,
    *,
    progress: bool = True,
) -> Any:
    """The method's TRL trainer on `prep`'s ids, with `arguments` (loop.training_arguments) and
    our callbacks. Building it computes the reference log-probs where they are precomputed (a
    bar shows it, unless `progress` is off)."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # the quick maps over our rows need no bar
    cls, cfg_class = _classes(config.objective)
    args = trainer_arguments(config, arguments, cfg_class)
    kwargs: dict[str, Any] = {
        "model": prep.model,
        "args": args,
        "train_dataset": prep.train_set,
        "eval_dataset": prep.val_set,
        "processing_class": prep.tokenizer,
        "callbacks": callbacks,
        "peft_config": prep.peft_config,
    }
    if config.objective in ("dpo", "kto"):
        kwargs["ref_model"] = prep.ref_model
    saved = os.environ.get("TQDM_DISABLE")
    if not progress:
        os.environ["TQDM_DISABLE"] = "1"  # TRL's reference pass reads it
    try:
        with peft_call():  # TRL wraps the model in peft itself, from peft_config
            trainer = cls(**kwargs)
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved
    trainer.counts = counts
    return trainer


def final_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The last training and held-out value of each preference curve, under stable names."""
    out: dict[str, Any] = {}
    for name in METRICS:
        train = [h[name] for h in history if name in h]
        held = [h[f"eval_{name}"] for h in history if f"eval_{name}" in h]
        if train:
            out[name] = round(float(train[-1]), 6)
        if held:
            out[f"eval_{name}"] = round(float(held[-1]), 6)
    return out


def pair_accuracy(model: Any, rows: list[dict[str, Any]], device: Any) -> float | None:
    """Share of pairs whose chosen sequence the reward model scores above the rejected one."""
    import torch

    if not rows:
        return None
    model.eval()
    wins = 0
    with torch.no_grad():
        for row in rows:
            scores = [
                float(model(input_ids=torch.tensor([row[k]], device=device)).logits[0, -1])
                for k in ("chosen_ids", "rejected_ids")
            ]
            wins += scores[0] > scores[1]
    return round(wins / len(rows), 4)
