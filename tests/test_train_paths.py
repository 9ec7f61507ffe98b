"""Training paths that exist for speed, held to the plain path on the CPU: gradient accumulation
gives the gradients of the equivalent larger batch (the loss is the mean over every trained token
of the accumulated batch, not a mean of per-micro-batch means, which weighs a token of a short
micro-batch more than one of a long one: a known pitfall); `--compile` trains; LoRA keeps its
frozen base in the compute dtype and its adapters in fp32, and still merges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alpaca_forge.train import TrainConfig


def _records(path: Path) -> Path:
    # answers of very different lengths, so per-micro-batch means would weigh tokens unevenly
    rows = [
        {"instruction": f"Task {i}", "input": "", "output": " ".join(["word"] * (1 + 9 * (i % 4)))}
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _first_step_gradients(model_dir: Path, data: Path, out: Path, batching: str, batch: int, accumulate: int):
    """The summed gradient of the first optimiser step, captured just before the optimiser runs."""
    import torch
    from transformers import TrainerCallback

    from alpaca_forge.train import loop, setup

    config = TrainConfig(
        data=str(data), output=str(out), model=str(model_dir), batching=batching, batch_size=batch,
        gradient_accumulation=accumulate, max_steps=1, max_grad_norm=0.0, warmup_ratio=0.0, seed=0,
        max_seq_len=64, threads=1,
    )  # fmt: skip
    captured: dict[str, torch.Tensor] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            for name, p in model.named_parameters():
                if p.grad is not None:
                    captured[name] = p.grad.detach().clone()

    prep = setup.prepare(config, resume=False)
    trainer = loop.build_trainer(config, prep, progress=False)
    trainer.add_callback(Capture())
    # one step over all 8 examples (or rows), in the data's own order: no shuffling differences
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(prep.train_set)
    loop.train(trainer, prep)
    return captured, len(prep.train_set)


@pytest.mark.unit
@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_accumulated_micro_batches_give_the_large_batch_gradient(tiny_model_dir, tmp_path, batching):
    import torch

    data = _records(tmp_path / "data.jsonl")
    rows = 8 if batching == "padded" else None
    big, n = _first_step_gradients(tiny_model_dir, data, tmp_path / "big", batching, rows or 8, 1)
    micro = max(1, n // 4) if batching == "packed" else 2
    small, _ = _first_step_gradients(tiny_model_dir, data, tmp_path / "small", batching, micro, n // micro)
    assert big.keys() == small.keys() and big
    for name in big:
        assert torch.allclose(big[name], small[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.integration  # inductor compiles C++ here: ~30 s
def test_compile_trains_and_reports_its_start_apart(tiny_model_dir, tmp_path):
    """torch.compile on the CPU (inductor, C++): the loss falls, every weight moves, and the
    summary keeps the compiling first step apart from the steady rate, with setup and save times."""
    import torch

    from alpaca_forge.train import run

    data = _records(tmp_path / "data.jsonl")
    before = {k: v.clone() for k, v in _weights(tiny_model_dir).items()}
    r = run(
        TrainConfig(data=str(data), output=str(tmp_path / "out"), model=str(tiny_model_dir), compile=True,
                    max_steps=6, batch_size=4, learning_rate=5e-3, logging_steps=1, threads=2),
        progress=False,
    )  # fmt: skip
    s = r.summary
    assert s["config"]["compile"] is True and r.last_loss < r.first_loss
    assert s["first_step_s"] > 0 and s["steady_tokens_per_s"] > 0 and s["setup_s"] > 0 and s["save_s"] > 0
    after = _weights(tmp_path / "out")
    assert all(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.unit
def test_lora_holds_its_frozen_base_in_the_compute_dtype_and_still_merges(tiny_model_dir, tmp_path):
    import torch

    from alpaca_forge.train import run

    data = _records(tmp_path / "data.jsonl")
    r = run(
        TrainConfig(data=str(data), output=str(tmp_path / "out"), model=str(tiny_model_dir), method="lora",
                    dtype="bfloat16", merge=True, max_steps=2, batch_size=4, threads=2),
        progress=False,
    )  # fmt: skip
    trained = {p.dtype for p in r.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in r.model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    assert (tmp_path / "out" / "merged" / "config.json").is_file()  # the base fingerprint still matches


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(Path(folder).glob("*.safetensors"))))
