"""Settings of `alpaca-forge train`: one field each, its help line and its valid range.

The same names are the flags (`--learning-rate`) and the YAML keys (`learning_rate:`); defaults
are the Alpaca recipe where it has one, `None` means derived (see each help line).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from ..core.config import REQUIRED, Config, setting
from ..core.devices import DTYPES
from ..core.examples import AssistantTurns
from ..core.models import DEFAULT_MODEL
from ..core.prompts import FORMATS
from ..core.shipped import or_shipped
from .batching import Batching

Method = Literal["full", "lora", "qlora", "reward", "dpo", "orpo", "kto", "simpo"]
Weights = Literal["full", "lora", "qlora"]
DpoLoss = Literal["sigmoid", "ipo", "hinge", "robust"]
SFT_METHODS = ("full", "lora", "qlora")
PREFERENCE_METHODS = ("dpo", "orpo", "kto", "simpo")
# Each method's own settings: given to another method, they are an error (see `check`).
METHOD_KNOBS: dict[str, tuple[str, ...]] = {
    "beta": ("dpo", "orpo", "kto", "simpo"),
    "dpo_loss": ("dpo",),
    "label_smoothing": ("dpo",),
    "simpo_gamma": ("simpo",),
    "kto_desirable_weight": ("kto",),
    "kto_undesirable_weight": ("kto",),
    "reference": ("dpo", "kto"),
    "precompute_reference": ("dpo", "kto"),
}
Schedule = Literal["cosine", "linear", "constant", "constant_with_warmup"]
ReportTo = Literal["tensorboard", "wandb", "mlflow", "none"]
Dtype = Literal[DTYPES]  # type: ignore[valid-type]
FormatName = Literal[tuple(FORMATS)]  # type: ignore[valid-type]


@dataclass(frozen=True)
class TrainConfig(Config):
    """Every setting of a run (`--resume` is not one: it says how to run, not what to train)."""

    data: str = setting(
        REQUIRED,
        "training records (Alpaca JSON/JSONL, gz too); for reward and preference methods a pair file "
        "(prompt/chosen/rejected, as `prefer` writes it)" + or_shipped("demo-seeds.jsonl"),
        metavar="FILE",
    )
    output: str = setting(REQUIRED, "folder for checkpoints, the final model and reports", metavar="DIR")
    model: str = setting(DEFAULT_MODEL, "base model: built-in name, folder, .gguf or cached HF id")
    val: str | None = setting(None, "validation records (a file)", metavar="FILE")
    val_size: float = setting(
        0, "or hold out this many training records, or this share if below 1 (seeded)", ge=0, metavar="N"
    )
    method: Method = setting(
        "full",
        "full | lora | qlora (supervised; qlora: 4-bit base, CUDA only) | reward (a reward model on "
        "preference pairs) | dpo | orpo | kto | simpo (learning from preference pairs)",
    )
    tune: Weights | None = setting(
        None,
        "which weights a reward or preference method trains: full | lora | qlora (default lora); SFT "
        "picks them with --method",
    )
    beta: float | None = setting(
        None,
        "dpo, orpo, kto, simpo: strength of the preference term (default: TRL's, 0.1; simpo 2.0)",
        gt=0,
    )
    dpo_loss: DpoLoss | None = setting(
        None, "dpo: loss sigmoid (the paper's) | ipo | hinge | robust (default sigmoid)"
    )
    label_smoothing: float | None = setting(
        None,
        "dpo: share of labels assumed flipped (conservative DPO, or robust's noise rate; default 0)",
        ge=0,
        lt=0.5,
    )
    simpo_gamma: float | None = setting(
        None, "simpo: target reward margin gamma / beta ratio (default TRL's 0.5)", ge=0
    )
    kto_desirable_weight: float | None = setting(
        None, "kto: weight of the desirable (chosen) examples' loss (default 1.0)", gt=0
    )
    kto_undesirable_weight: float | None = setting(
        None, "kto: weight of the undesirable (rejected) examples' loss (default 1.0)", gt=0
    )
    reference: str | None = setting(
        None,
        "dpo, kto with --tune full: the reference model (default: the starting model); with LoRA "
        "the reference is the base with the adapter disabled, so this may only name that base",
        metavar="MODEL",
    )
    precompute_reference: bool | None = setting(
        None,
        "dpo, kto: compute the reference log-probs once, before training, so no reference runs "
        "during it (default on)",
    )
    format: FormatName | None = setting(  # type: ignore[valid-type]
        None, "prompt format; default: the model's saved one, else alpaca"
    )
    system: str | None = setting(None, "system message for the chat format", metavar="TEXT")
    max_seq_len: int = setting(512, "longest example in tokens; longer responses are cut, EOS kept", ge=2)
    train_on_inputs: bool = setting(False, "also learn the prompt tokens (off: prompts are masked)")
    assistant_turns: AssistantTurns = setting(
        "all",
        "conversations: learn every assistant turn (all) or only the last (last: the earlier ones "
        "are context); every other token is masked",
    )
    batching: Batching = setting("packed", "packed | grouped (by length) | padded (random, as the original)")
    epochs: float = setting(3.0, "passes over the data", gt=0)
    max_steps: int = setting(-1, "stop after this many optimiser steps (-1: run the epochs)", ge=-1)
    batch_size: int = setting(4, "items per device per forward pass (packed: rows)", ge=1)
    global_batch_size: int | None = setting(
        None,
        "items per optimiser step over all devices; sets gradient accumulation (the original: 128)",
        ge=1,
    )
    gradient_accumulation: int = setting(
        1, "forward passes per optimiser step (if no global batch size)", ge=1
    )
    learning_rate: float | None = setting(None, "peak learning rate (default: 2e-5 full, 2e-4 LoRA)", gt=0)
    lr_schedule: Schedule = setting("cosine", "learning-rate schedule")
    warmup_ratio: float = setting(0.03, "share of steps warming the learning rate up", ge=0, lt=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0: no clipping)", ge=0)
    dtype: Dtype = setting(  # type: ignore[valid-type]
        "auto",
        "auto (bf16 on a GPU that has it, else fp32) | float32 | bfloat16 | float16 (CUDA, loss-scaled)",
    )
    seed: int = setting(42, "seeds initialisation, data order, dropout and the --val-size split", ge=0)
    gradient_checkpointing: bool = setting(False, "trade compute for memory")
    compile: bool = setting(
        False,
        "torch.compile the model: the first steps compile (minutes on a GPU, reported apart as "
        "first_step_s), the steady ones run faster; needs a C++ compiler on a CPU",
    )
    lora_r: int = setting(8, "LoRA rank; higher = more capacity and memory", ge=1)
    lora_alpha: int = setting(16, "LoRA scaling numerator (the update is scaled by alpha / r)", ge=1)
    lora_dropout: float = setting(0.05, "dropout on the LoRA path", ge=0, lt=1)
    lora_targets: tuple[str, ...] = setting(
        ("all-linear",),
        "module names LoRA adapts (e.g. q_proj,v_proj); all-linear = every linear projection",
        sep=",",
        metavar="NAMES",
    )
    merge: bool = setting(False, "LoRA: also write base+adapter merged, to OUTPUT/merged")
    logging_steps: int = setting(10, "log loss every N steps", ge=1)
    eval_steps: int | None = setting(None, "validation loss every N steps (default: as save_steps)", ge=1)
    save_steps: int = setting(200, "checkpoint every N steps", ge=1)
    save_total_limit: int = setting(2, "keep this many newest checkpoints", ge=1)
    threads: int | None = setting(None, "CPU threads for torch (default: torch's choice)", ge=1)
    report_to: ReportTo = setting(
        "tensorboard",
        "where training metrics go besides OUTPUT/train_summary.json and loss.png: tensorboard "
        "(OUTPUT/tensorboard) | wandb | mlflow (both offline unless configured) | none",
    )
    trainer_args: tuple[str, ...] = setting(
        (),
        "KEY=VALUE for a field of transformers' TrainingArguments (or of the method's TRL config) we do "
        "not model (repeatable), typed and checked before any model loads; e.g. --trainer-arg adam_beta2=0.95",
        repeat=True,
        metavar="KEY=VALUE",
        flag="--trainer-arg",
    )

    def check(self) -> Iterator[tuple[str, str, str]]:
        if self.val and self.val_size:
            yield (
                "val_size",
                "both a validation file and a validation size given",
                "use --val FILE or --val-size N, not both",
            )
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            yield (
                "val_size",
                f"val_size {self.val_size:g} is neither a share below 1 nor a whole count of records",
                "e.g. --val-size 0.05 (a share) or --val-size 200 (records)",
            )
        if self.global_batch_size and self.gradient_accumulation != 1:
            yield (
                "gradient_accumulation",
                "both a global batch size and a gradient accumulation given (the first sets the second)",
                "use --global-batch-size N or --gradient-accumulation N, not both",
            )
        if not self.lora_targets or not all(t.strip() for t in self.lora_targets):
            yield "lora_targets", "no LoRA target named", "e.g. --lora-targets q_proj,v_proj, or all-linear"
        if self.tune is not None and self.method in SFT_METHODS:
            yield (
                "tune",
                f"--tune picks the weights of a reward or preference method; --method {self.method} "
                "already says them",
                f"drop --tune (--method full|lora|qlora is SFT), or use e.g. --method dpo --tune {self.tune}",
            )
        for knob, methods in METHOD_KNOBS.items():
            if getattr(self, knob) is not None and self.method not in methods:
                flag = "--" + knob.replace("_", "-")
                owners = " or ".join(f"--method {m}" for m in methods)
                yield (
                    knob,
                    f"{flag} is a setting of {owners}, not {self.method}",
                    f"drop {flag}, or use {owners}",
                )
        if self.batching == "grouped" and self.objective != "sft":
            yield (
                "batching",
                f"--batching grouped sorts SFT examples by length; --method {self.method} batches "
                "preference pairs as TRL does (padded, in random order)",
                "drop --batching",
            )
        if self.train_on_inputs and self.objective != "sft":
            yield (
                "train_on_inputs",
                f"--train-on-inputs learns the prompt in SFT; --method {self.method} compares answers "
                "to one prompt, whose tokens are never learnt",
                "drop --train-on-inputs",
            )
        if self.assistant_turns != "all" and self.objective != "sft":
            yield (
                "assistant_turns",
                f"--assistant-turns chooses what SFT learns of a conversation; --method {self.method} "
                "learns from pairs of answers",
                "drop --assistant-turns",
            )
        if self.method == "kto" and self.batch_size < 2:
            yield (
                "batch_size",
                "--method kto estimates its KL term from the other answers of a batch, so it needs at least 2",
                "use --batch-size 2 or more",
            )
        if self.merge and self.weights == "full":
            how = "--method full" if self.method == "full" else f"--method {self.method} --tune full"
            yield (
                "merge",
                f"--merge merges a LoRA adapter, but {how} trains no adapter",
                "drop --merge, or train an adapter (--method lora, or --tune lora)",
            )
        elif self.merge and self.objective == "reward":
            yield (
                "merge",
                "--merge writes a merged language model; a reward model's adapter is loaded on its base "
                "by `infer --reward-model` and `prefer` as it is",
                "drop --merge (a merged reward model: load the adapter with peft and merge_and_unload)",
            )

    @property
    def objective(self) -> str:
        """What is learnt: "sft" (full, lora, qlora), "reward", "dpo", "orpo", "kto" or "simpo"."""
        return "sft" if self.method in SFT_METHODS else self.method

    @property
    def weights(self) -> str:
        """Which weights are trained: "full", "lora" or "qlora"."""
        return self.method if self.method in SFT_METHODS else (self.tune or "lora")

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        if self.objective in ("sft", "reward"):
            return 2e-5 if self.weights == "full" else 2e-4
        # Preference methods move a model that already follows instructions: gentler steps.
        return 5e-7 if self.weights == "full" else 5e-5
