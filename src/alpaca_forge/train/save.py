"""Save: the final model (or LoRA adapter) with its tokenizer, prompt format and description,
checked and moved in whole; the merged model with --merge; the summary and the loss curve.

Every process takes part in the Trainer's save (FSDP and DeepSpeed gather the weights there);
only the first writes the rest. The description goes into the output last, so a kill during
the save leaves nothing there that loads half-written.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..core.chat_template import save_tokenizer
from ..core.errors import UserError
from ..core.files import fsync_dir, write_json_atomic
from ..core.models import merge_adapter, save_model
from ..core.prompts import save_format
from .batching import TokenCounts
from .checkpoints import CONFIG_FILE, write_failures
from .config import TrainConfig
from .distributed import gather
from .setup import Prepared

log = logging.getLogger(__name__)
SUMMARY_FILE = "train_summary.json"
LOSS_PLOT = "loss.png"


def summarize(trainer: Any, description: dict[str, Any], started: float) -> dict[str, Any]:
    """The run's description and outcome: losses, steps, exact token counts (all processes), step
    times. Every process must call it (the counts are gathered)."""
    from .callbacks import StepTimer

    state = trainer.state
    history = state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    counts = TokenCounts()
    for c in gather((trainer.counts.real, trainer.counts.padding, trainer.counts.trained)):
        counts.add(c)
    timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer))
    steps = timer.summary(trainer.args.world_size)
    return {
        **description,
        "steps": state.global_step,
        "epochs_done": state.epoch,
        "first_loss": train_losses[0] if train_losses else None,
        "last_loss": train_losses[-1] if train_losses else None,
        "last_eval_loss": eval_losses[-1] if eval_losses else None,
        "train_runtime_s": next((h["train_runtime"] for h in history if "train_runtime" in h), None),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "padding_share": round(counts.padding_share, 4),
        "tokens_seen_this_run": counts.real,
        "trained_tokens_this_run": counts.trained,
        **steps,
        **_gpu_figures(trainer, steps.get("steady_tokens_per_s")),
    }


def _gpu_figures(trainer: Any, tokens_per_s: float | None) -> dict[str, Any]:
    """On CUDA: peak memory of this process's GPU, and the MFU of the steady steps over the
    devices' bf16 peak (6 x N FLOPs per token for a full fine-tune, 4 x N for adapters)."""
    import torch

    from ..core.hardware import flops_per_token_factor, mfu, peak_tflops_of

    if not torch.cuda.is_available() or trainer.args.use_cpu:
        return {}
    out: dict[str, Any] = {"peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3)}
    name = torch.cuda.get_device_name()
    peak = peak_tflops_of(name)
    model = trainer.accelerator.unwrap_model(trainer.model)
    method = "full" if all(p.requires_grad for p in model.parameters()) else "adapter"
    if peak and tokens_per_s:
        params = sum(p.numel() for p in model.parameters())
        world = max(1, trainer.args.world_size)
        out["mfu"] = round(mfu(tokens_per_s, params, method, peak, world), 4)
        out["mfu_basis"] = (
            f"{flops_per_token_factor(method)} x {params:,} parameters x {tokens_per_s:,.0f} tokens/s "
            f"over {world} x {peak:g} TFLOP/s ({name}, dense bf16)"
        )
    return out


def save(config: TrainConfig, trainer: Any, prep: Prepared, summary: dict[str, Any]) -> None:
    """Write the outputs into `prep.output`; `summary` gains what saving learnt (adapter, merged
    model, plot). Every process must call it."""
    output = prep.output
    tmp = output / ".final-tmp"
    main = trainer.is_world_process_zero()
    start = time.perf_counter()
    with write_failures(f"{output}: saving the final model failed", "the checkpoints are intact"):
        try:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            trainer.accelerator.wait_for_everyone()
            trainer.save_model(str(tmp))  # every process takes part (FSDP and DeepSpeed gather here)
            if main:
                model = trainer.accelerator.unwrap_model(trainer.model)
                _move_in(config, model, prep, tmp, summary)
                if config.weights != "full" and config.merge:
                    summary["merged"] = str(merge(output, prep))
                plot = plot_losses(trainer.state.log_history, output / LOSS_PLOT)
                if plot:
                    summary["loss_plot"] = str(plot)
                summary["save_s"] = round(time.perf_counter() - start, 2)  # model, adapter check, merge, plot
                write_json_atomic(output / SUMMARY_FILE, summary)
        finally:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)


def _move_in(config: TrainConfig, model: Any, prep: Prepared, tmp: Path, summary: dict[str, Any]) -> None:
    """Complete what the Trainer wrote into `tmp`, then move it into the output, description last."""
    save_tokenizer(prep.tokenizer, tmp, prep.fmt)  # the trained format as its chat template
    save_format(tmp, prep.fmt)
    if config.weights != "full":
        summary["adapter"] = verify_adapter(tmp, model)
    write_json_atomic(tmp / CONFIG_FILE, summary)
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_FILE):
        if item.name != "training_args.bin":
            os.replace(item, prep.output / item.name)
    fsync_dir(prep.output)


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


def merge(output: Path, prep: Prepared) -> Path:
    """OUTPUT/merged: the saved adapter on its base in full precision, by the one merge path
    (`core.models.merge_adapter`, which also loads adapters for inference), for LoRA and QLoRA
    alike: merging into a 4-bit base would quantise the update away."""
    model, tokenizer = merge_adapter(output)
    folder = save_model(model, tokenizer, output / "merged", prep.fmt)
    log.info("merged model: %s", folder)
    return folder


# Preference curves as TRL logs them: DPO, ORPO, SimPO (CPO) and KTO name the implicit rewards
# `rewards/...`; the reward trainer logs `margin` and `accuracy`. Held-out values carry `eval_`.
PANELS = {
    "reward margin (chosen - rejected)": ("rewards/margins", "margin"),
    "preference accuracy (chosen above rejected)": ("rewards/accuracies", "accuracy"),
}


def curves(history: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{panel: {"training" | "validation": [(step, value)]}} from the Trainer's log history: the
    loss, then each preference panel the history holds."""

    def series(key: str) -> list[tuple[int, float]]:
        return [(h["step"], float(h[key])) for h in history if key in h and "step" in h]

    out = {"loss": {"training": series("loss"), "validation": series("eval_loss")}}
    for title, names in PANELS.items():
        name = next((n for n in names if series(n) or series(f"eval_{n}")), None)
        if name:
            out[title] = {"training": series(name), "validation": series(f"eval_{name}")}
    return {title: lines for title, lines in out.items() if any(lines.values())}


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training (and validation) loss against step, as a PNG, and beside it the reward margin
    and accuracy of a reward or preference method; None without matplotlib. The PNG's
    Description names its panels."""
    panels = curves(history)
    if not panels:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no loss plot (pip install 'alpaca-forge[plot]')")
        return None
    width = 7 if len(panels) == 1 else 5.5 * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4), dpi=110, squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items(), strict=True):
        name = "loss" if title == "loss" else title.split(" (")[0]
        if lines["training"]:
            ax.plot(*zip(*lines["training"], strict=True), label=f"training {name}", color="#1f77b4")
        if lines["validation"]:
            ax.plot(*zip(*lines["validation"], strict=True), "o-", label=f"validation {name}", color="#d62728")
        if title == "loss" and len(panels) == 1:
            ax.set_ylabel("loss (nats per trained token)")  # SFT's: the plot it always was
        else:
            ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, metadata={"Description": "panels: " + "; ".join(panels)})
    plt.close(fig)
    tmp.replace(path)
    return path
