"""`alpaca-forge train` on the command line."""

from __future__ import annotations

from typing import Any

from ..core.cli import add_command, say
from .config import TrainConfig

DESCRIPTION = """\
Fine-tune a causal LM on Alpaca records (HF Trainer + peft + accelerate), or on preference pairs
(--method reward|dpo|orpo|kto|simpo, through TRL; --data is then a pair file as `prefer` writes
it, --tune full|lora|qlora picks the weights, LoRA by default). Settings come from
--config FILE (YAML) and flags; flags win. The prompt is masked (only the response and its EOS
are learnt), examples are packed into full rows without attending across each other, and
checkpoints are written every --save-steps: after a crash or kill -9, run the same command with
--resume. The output folder gets the model (or LoRA adapter), tokenizer, prompt format,
train_summary.json, loss.png and TensorBoard logs.
Several GPUs: `accelerate launch --config_file configs/accelerate/fsdp.yaml -m alpaca_forge train ...`.

examples:
  alpaca-forge train --data data/train.jsonl --output runs/my-alpaca --method lora --format alpaca \\
      --epochs 3 --learning-rate 1e-3 --max-seq-len 256 --val-size 0.1
  alpaca-forge train --config configs/smollm2-cpu.yaml --output runs/my-alpaca-yaml   # the same, from a file
  alpaca-forge train --config configs/smollm2-cpu.yaml --resume
  alpaca-forge train --method dpo --model runs/my-alpaca --data out/pairs.jsonl --output runs/my-alpaca-dpo \\
      --beta 0.1 --val-size 0.2 --max-seq-len 256
  alpaca-forge train --method reward --model runs/my-alpaca --data out/pairs.jsonl --output runs/my-reward \\
      --val-size 0.2"""


def register(sub: Any) -> None:
    p = add_command(
        sub,
        "train",
        "fine-tuning: SFT (full, LoRA, QLoRA), a reward model, or DPO/ORPO/KTO/SimPO on pairs; resumable",
        DESCRIPTION,
        TrainConfig,
        _main,
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last complete checkpoint in --output"
    )


def _main(config: TrainConfig, args: Any) -> int:
    from .runner import run

    r = run(config, resume=args.resume, progress=not args.quiet)
    say(
        "trained %d steps in %.0f s: loss %s -> %s%s; padding %.1f%% of batch tokens",
        r.steps,
        r.summary["wall_time_s"],
        _loss(r.first_loss),
        _loss(r.last_loss),
        f", validation {r.eval_loss:.4f}" if r.eval_loss is not None else "",
        100 * r.padding_share,
    )
    if r.metrics:
        say("%s", _metrics(r.metrics))
    say("model: %s (summary: train_summary.json, curve: loss.png)", r.output)
    return 0


def _metrics(metrics: dict[str, Any]) -> str:
    """The preference figures that say whether it learnt: held-out first, as TRL names them."""
    shown = [
        f"{name} {metrics[name]:.3f}"
        for name in (
            "eval_rewards/accuracies",
            "eval_rewards/margins",
            "eval_pair_accuracy",
            "rewards/accuracies",
            "rewards/margins",
            "accuracy",
        )
        if metrics.get(name) is not None
    ]
    return "preference: " + ", ".join(shown) if shown else "preference: no reward figures were logged"


def _loss(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
