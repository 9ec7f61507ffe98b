"""Around HF's Trainer: a subclass that counts the tokens it trains on, and callbacks for
self-describing checkpoints, a NaN guard, step timing, the progress bar and TensorBoard."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from ..core.chat_template import save_tokenizer
from ..core.errors import UserError
from ..core.prompts import save_format
from .batching import COUNTS, TokenCounts
from .checkpoints import mark_complete, rotate

log = logging.getLogger(__name__)


class CountingTrainer(Trainer):
    """HF's Trainer, taking each batch's token counts (put there by our collator) out before the
    model sees it, and adding those of training batches to `counts`."""

    def __init__(self, *args: Any, counts: TokenCounts, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.counts = counts

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.counts.add(inputs.pop(COUNTS))
        return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs.pop(COUNTS, None)
        return super().prediction_step(model, inputs, *args, **kwargs)


class CheckpointCallback(TrainerCallback):
    """After the Trainer writes `checkpoint-N` (weights, optimiser, scheduler, RNG states), add what
    makes it stand alone (tokenizer, prompt format, the whole config, the data's fingerprint, the
    step), then mark it complete; only then are older checkpoints rotated out. A kill at any
    moment leaves the newest complete checkpoint untouched."""

    def __init__(self, tokenizer: Any, fmt: Any, description: dict[str, Any], keep: int):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.description = description
        self.keep = keep

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_tokenizer(self.tokenizer, folder, self.fmt)
        save_format(folder, self.fmt)
        mark_complete(folder, {**self.description, "step": state.global_step, "epoch": state.epoch})
        rotate(Path(args.output_dir), self.keep)


class GuardCallback(TrainerCallback):
    """Stop at the first non-finite loss, with a fix, rather than train on into garbage."""

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise UserError(
                f"the training loss became {loss} at step {state.global_step}",
                "lower --learning-rate; with --dtype float16 prefer bfloat16 where the GPU has it; "
                "resume from the last checkpoint with --resume",
            )


class StepTimer(TrainerCallback):
    """Wall time and real (unpadded) tokens of every optimiser step on this process, so the summary
    can give the steady throughput apart from the first step's start-up cost."""

    def __init__(self, counts: TokenCounts):
        self.counts = counts
        self.steps: list[tuple[float, int]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.mark = (time.perf_counter(), self.counts.real)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = (time.perf_counter(), self.counts.real)
        self.steps.append((now[0] - self.mark[0], now[1] - self.mark[1]))
        self.mark = now

    def summary(self, world_size: int) -> dict[str, Any]:
        """First step's seconds, the median step's, and tokens/s (all processes) over every step
        after the first."""
        if not self.steps:
            return {}
        seconds = sorted(s for s, _ in self.steps)
        out: dict[str, Any] = {
            "first_step_s": round(self.steps[0][0], 4),
            "median_step_s": round(seconds[len(seconds) // 2], 4),
        }
        rest = self.steps[1:]
        elapsed = sum(s for s, _ in rest)
        if elapsed:
            out["steady_tokens_per_s"] = round(sum(t for _, t in rest) * max(1, world_size) / elapsed, 2)
        return out


class ProgressBar(TrainerCallback):
    """Steps done, loss, tokens per second and the time left."""

    def __init__(self, counts: TokenCounts):
        self.counts = counts
        self.bar = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                unit="step",
                desc="train",
                dynamic_ncols=True,
            )
            self.start = time.perf_counter()
            self.tokens0 = self.counts.real
            self.loss = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        elapsed = time.perf_counter() - self.start
        world = max(1, args.world_size)
        rate = (self.counts.real - self.tokens0) * world / elapsed if elapsed else 0.0
        post = {"tok/s": f"{rate:,.0f}"}
        if self.loss is not None:
            post["loss"] = f"{self.loss:.4f}"
        self.bar.set_postfix(post, refresh=False)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            self.loss = logs["loss"]
        if self.bar is not None and logs and "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}: validation loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def tensorboard_callback(folder: Path) -> Any:
    """Transformers' TensorBoard callback writing into `folder`, or None without a writer package."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("no TensorBoard writer installed (pip install tensorboardX): TensorBoard logs are off")
            return None
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder)))
