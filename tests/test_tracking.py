"""`train --report-to` and `--trainer-arg`, and the curves: loss.png's panels, TensorBoard's
scalars, wandb's and MLflow's offline files."""

from __future__ import annotations

import json
import os
import random
import struct
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from alpaca_forge import write_records
from alpaca_forge.core.errors import UserError
from alpaca_forge.train import TrainConfig
from alpaca_forge.train.callbacks import tensorboard_callback
from alpaca_forge.train.save import curves, plot_losses
from alpaca_forge.train.tracking import parse_trainer_args, tracker_environment

from conftest import assert_user_error, run_cli

PANELS = [
    "loss",
    "reward margin (chosen - rejected)",
    "preference accuracy (chosen above rejected)",
]


def _config(*trainer_args: str, method: str = "full") -> TrainConfig:
    return TrainConfig(data="d.jsonl", output="out", method=method, trainer_args=trainer_args)


def _panels(png: Path) -> list[str]:
    return Image.open(png).text["Description"].removeprefix("panels: ").split("; ")


def _scalars(folder: Path) -> dict[str, list[float]]:
    """Every scalar in a TensorBoard event folder, read from the files (TFRecord: length, its CRC,
    an Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[float]] = {}
    for path in sorted(folder.rglob("events.out.tfevents*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append(value.simple_value)
    return out


# ---------------------------------------------------------------------------------------------
# --trainer-arg, typed by the arguments class


@pytest.mark.unit
def test_trainer_args_are_typed_as_the_arguments_class_declares():
    parsed = parse_trainer_args(
        _config(
            "adam_beta2=0.95",
            'lr_scheduler_kwargs={"num_cycles": 1.0}',
            "optim=sgd",
            "dataloader_drop_last=yes",
            "torch_empty_cache_steps=4",
            "neftune_noise_alpha=none",
            "optim_target_modules=q_proj, v_proj",
        )
    )
    assert parsed == {
        "adam_beta2": 0.95,
        "lr_scheduler_kwargs": {"num_cycles": 1.0},
        "optim": "sgd",  # OptimizerNames is a str enum: its member equals its value
        "dataloader_drop_last": True,
        "torch_empty_cache_steps": 4,
        "neftune_noise_alpha": None,
        "optim_target_modules": ["q_proj", "v_proj"],
    }
    assert type(parsed["torch_empty_cache_steps"]) is int and type(parsed["adam_beta2"]) is float


@pytest.mark.unit
def test_a_trl_methods_own_fields_are_known_for_that_method_only():
    from trl import DPOConfig

    assert parse_trainer_args(_config("ld_alpha=0.5", method="dpo"), DPOConfig) == {"ld_alpha": 0.5}
    with pytest.raises(UserError, match="TrainingArguments has no field 'ld_alpha'"):
        parse_trainer_args(_config("ld_alpha=0.5"))


@pytest.mark.unit
def test_every_trainer_arg_problem_is_reported_at_once_with_its_fix():
    with pytest.raises(UserError) as e:
        parse_trainer_args(
            _config(
                "adam_beta=0.9",
                "learning_rate=1e-3",
                "per_device_train_batch_size=2",
                "adam_beta2=high",
                "save_total_limit=2.5",
                "remove_unused_columns=true",
                "lr_scheduler_kwargs={num_cycles: 1}",
                "adam_epsilon",
            )
        )
    text = str(e.value)
    assert "8 problems in the --trainer-arg settings" in text
    assert "TrainingArguments has no field 'adam_beta'\n  fix: did you mean adam_beta2 or adam_beta1?" in text
    assert "learning_rate is one of our settings\n  fix: use --learning-rate" in text
    assert "fix: use --batch-size" in text
    assert "adam_beta2 takes a number, and 'high' is not" in text
    # save_total_limit shares our setting's name, so it is ours before its type is looked at
    assert "save_total_limit is one of our settings\n  fix: use --save-total-limit" in text
    assert "remove_unused_columns is fixed by alpaca-forge" in text
    assert "lr_scheduler_kwargs takes a JSON object" in text and "not JSON" in text
    assert "--trainer-arg adam_epsilon: not of the form KEY=VALUE" in text


@pytest.mark.unit
def test_an_optimiser_the_trainer_does_not_have_is_refused_by_its_own_check():
    from alpaca_forge.train.tracking import check

    with pytest.raises(UserError, match="optim=nonsense: TrainingArguments refuses these values"):
        check(_config("optim=nonsense"))


# ---------------------------------------------------------------------------------------------
# wandb and mlflow: offline, inside the output, unless configured


@pytest.mark.unit
def test_trackers_are_kept_offline_in_the_output_unless_the_user_set_them_up(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    env = tracker_environment(["wandb"], tmp_path)
    assert env == {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_PROJECT": "alpaca-forge"}
    env = tracker_environment(["mlflow"], tmp_path)
    assert env["MLFLOW_TRACKING_URI"] == (tmp_path / "mlruns").as_uri()
    assert tracker_environment([], tmp_path) == {}
    monkeypatch.setenv("WANDB_API_KEY", "a-key")  # the user's own account: online, as they set it up
    assert tracker_environment(["wandb"], tmp_path) == {"WANDB_PROJECT": "alpaca-forge"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracker_environment(["mlflow"], tmp_path) == {}


# ---------------------------------------------------------------------------------------------
# Curves


def _preference_history(reward_trainer: bool = False) -> list[dict]:
    margin, accuracy = ("margin", "accuracy") if reward_trainer else ("rewards/margins", "rewards/accuracies")
    history = []
    for step in range(1, 9):
        history.append(
            {"step": step, "loss": 0.7 - 0.05 * step, margin: 0.1 * step, accuracy: 0.5 + step / 20}
        )
        if step % 4 == 0:
            history.append(
                {"step": step, "eval_loss": 0.6, f"eval_{margin}": 0.05 * step, f"eval_{accuracy}": 0.6}
            )
    return [*history, {"step": 8, "train_runtime": 1.0, "train_loss": 0.5}]


@pytest.mark.unit
@pytest.mark.parametrize("reward_trainer", [False, True], ids=["dpo-names", "reward-trainer-names"])
def test_preference_metrics_get_their_panels_training_and_validation(tmp_path, reward_trainer):
    history = _preference_history(reward_trainer)
    panels = curves(history)
    assert list(panels) == PANELS
    margin = panels["reward margin (chosen - rejected)"]
    assert margin["training"][-1] == (8, pytest.approx(0.8)) and margin["validation"] == [
        (4, pytest.approx(0.2)),
        (8, pytest.approx(0.4)),
    ]
    assert len(panels["preference accuracy (chosen above rejected)"]["validation"]) == 2
    png = plot_losses(history, tmp_path / "loss.png")
    assert _panels(png) == PANELS
    assert Image.open(png).size[0] > 2 * Image.open(png).size[1]  # three panels side by side


@pytest.mark.unit
def test_an_sft_history_keeps_the_one_loss_plot(tmp_path):
    history = [{"step": s, "loss": 2.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.5}]
    assert list(curves(history)) == ["loss"]
    png = plot_losses(history, tmp_path / "loss.png")
    assert _panels(png) == ["loss"] and Image.open(png).size == (770, 440)  # 7 x 4 in at 110 dpi
    kto = [{"step": 1, "loss": 0.5, "rewards/margins": 0.1}]  # KTO logs no accuracies
    assert list(curves(kto)) == PANELS[:2]


@pytest.mark.unit
def test_preference_metrics_reach_tensorboard(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    callback = tensorboard_callback(tmp_path / "tb")
    state = TrainerState(global_step=3)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    for logs in _preference_history()[:5]:
        callback.on_log(args, state, TrainerControl(), logs=dict(logs))
    callback.tb_writer.close()
    scalars = _scalars(tmp_path / "tb")
    assert {"train/rewards/margins", "train/rewards/accuracies", "eval/rewards/margins"} <= scalars.keys()
    assert scalars["train/rewards/margins"] == pytest.approx([0.1, 0.2, 0.3, 0.4])


# ---------------------------------------------------------------------------------------------
# Real runs on the tiny model


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    rnd = random.Random(0)
    rows = []
    for _ in range(16):
        a, b = rnd.randint(1, 50), rnd.randint(1, 50)
        rows.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}."})
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    rnd = random.Random(1)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with path.open("w") as f:
        for _ in range(24):
            a, b = rnd.randint(1, 50), rnd.randint(1, 50)
            row = {
                "instruction": f"What is {a} plus {b}?",
                "chosen": f"{a + b}.",
                "rejected": "I do not know.",
            }
            f.write(json.dumps(row) + "\n")
    return path


def _train(model: Path, data: Path, out: Path, *flags: str, env: dict | None = None):
    result = run_cli(
        "-q", "train", "--model", str(model), "--data", str(data), "--output", str(out), *flags, env=env
    )
    assert result.returncode == 0, result.stderr
    assert (out / "train_summary.json").is_file() and (out / "loss.png").is_file()
    return result


SHORT = ["--max-steps", "6", "--save-steps", "6", "--logging-steps", "1", "--batch-size", "4"]


@pytest.mark.integration
def test_trainer_args_reach_the_optimiser_and_the_schedule(tiny_model_dir, records, tmp_path):
    out = tmp_path / "run"
    _train(
        tiny_model_dir,
        records,
        out,
        *SHORT,
        *["--learning-rate", "1e-3", "--report-to", "none"],
        *["--trainer-arg", "adam_beta2=0.95", "--trainer-arg", 'lr_scheduler_kwargs={"num_cycles": 1.0}'],
    )
    optimizer = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in optimizer["param_groups"])
    # cosine over one whole cycle climbs back up after its trough (half a cycle, the default,
    # only ever falls after the warm-up)
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    rates = [h["learning_rate"] for h in history if "learning_rate" in h]
    assert min(rates[1:]) < 0.1e-3 and rates[-1] > 0.6e-3, rates
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["config"]["trainer_args"] == ["adam_beta2=0.95", 'lr_scheduler_kwargs={"num_cycles": 1.0}']
    assert not (out / "tensorboard").exists(), "--report-to none writes no TensorBoard folder"


@pytest.mark.integration
@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--trainer-arg", "adam_beta=0.9"], ["adam_beta", "did you mean adam_beta2 or adam_beta1?"]),
        (
            ["--trainer-arg", "num_train_epochs=2"],
            ["num_train_epochs is one of our settings", "use --epochs"],
        ),
        (["--trainer-arg", "warmup_steps=10"], ["use --warmup-ratio"]),
        (["--trainer-arg", "adam_beta2=high"], ["adam_beta2 takes a number, and 'high' is not"]),
        (["--trainer-arg", "dataloader_drop_last=maybe"], ["takes true or false"]),
        (["--trainer-arg", "optim=nonsense"], ["optim=nonsense: TrainingArguments refuses these values"]),
        (["--method", "dpo", "--trainer-arg", "beta=0.5"], ["beta is one of our settings", "use --beta"]),
        (["--method", "dpo", "--trainer-arg", "betta=0.5"], ["DPOConfig has no field 'betta'", "beta"]),
    ],
    ids=[
        "unknown",
        "ours",
        "ours-by-another-name",
        "not-a-number",
        "not-a-bool",
        "refused",
        "method-knob",
        "dpo",
    ],
)
def test_every_trainer_arg_mistake_is_refused_before_any_model_loads(tmp_path, flags, needles):
    # Neither the model nor the data exists: the trainer-arg error is what is reported, so it came
    # before either was looked at.
    missing = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl")]
    result = run_cli("train", *missing, "--output", str(tmp_path / "out"), *flags)
    assert_user_error(result, "--trainer-arg", *needles)
    assert "no-model" not in result.stderr and "no-data" not in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_named_before_any_model_loads(tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # Python's own "not installed" for an import
    missing = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl")]
    result = run_cli("train", *missing, "--output", str(tmp_path / "out"), "--report-to", tracker)
    assert_user_error(result, f"--report-to {tracker} needs the {tracker} package", f"pip install {tracker}")


def _clean_tracker_env(monkeypatch) -> None:
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)


@pytest.mark.integration
def test_wandb_writes_an_offline_run_into_the_output(tiny_model_dir, records, tmp_path, monkeypatch):
    import wandb

    _clean_tracker_env(monkeypatch)
    out = tmp_path / "run"
    result = _train(tiny_model_dir, records, out, *SHORT, "--report-to", "wandb")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(out.iterdir())
    [events] = runs[0].glob("run-*.wandb")
    logged = events.read_bytes()
    assert b"train/loss" in logged and b"train/learning_rate" in logged
    assert wandb.run is None, "the run is finished, so the next one in this process is its own"
    assert not {"WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"} & os.environ.keys(), (
        "the variables were for the run only"
    )
    assert not (out / "tensorboard").exists()
    assert "wandb" not in result.stdout


@pytest.mark.integration
def test_mlflow_logs_the_loss_into_a_file_store_in_the_output(tiny_model_dir, records, tmp_path, monkeypatch):
    import mlflow

    _clean_tracker_env(monkeypatch)
    out = tmp_path / "run"
    _train(tiny_model_dir, records, out, *SHORT, "--report-to", "mlflow")
    [loss] = (out / "mlruns").glob("*/*/metrics/loss")
    rows = [line.split() for line in loss.read_text().splitlines()]  # timestamp value step
    assert [int(r[2]) for r in rows] == list(range(1, 7)) and all(float(r[1]) > 0 for r in rows)
    summary = json.loads((out / "train_summary.json").read_text())
    assert float(rows[-1][1]) == pytest.approx(summary["last_loss"])
    assert mlflow.active_run() is None
    assert not {"MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"} & os.environ.keys()
    assert not mlflow.is_tracking_uri_set(), "nothing of this run's store is left set in the process"


@pytest.mark.integration
def test_a_dpo_run_takes_trainer_args_and_plots_and_logs_its_reward_curves(tiny_model_dir, pairs, tmp_path):
    out = tmp_path / "dpo"
    _train(
        tiny_model_dir,
        pairs,
        out,
        *["--method", "dpo", "--val-size", "4", "--max-steps", "4", "--eval-steps", "2"],
        *["--save-steps", "4", "--logging-steps", "1", "--batch-size", "4", "--learning-rate", "1e-2"],
        *["--trainer-arg", "adam_beta2=0.95", "--trainer-arg", "ld_alpha=0.5"],  # ld_alpha: DPOConfig's
    )
    args = torch.load(out / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert type(args).__name__ == "DPOConfig" and args.ld_alpha == 0.5 and args.adam_beta2 == 0.95
    optimizer = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in optimizer["param_groups"])
    assert _panels(out / "loss.png") == PANELS
    scalars = _scalars(out / "tensorboard")
    assert len(scalars["train/rewards/margins"]) == 4 and len(scalars["eval/rewards/margins"]) == 2
    assert {"train/rewards/accuracies", "eval/rewards/accuracies"} <= scalars.keys()
