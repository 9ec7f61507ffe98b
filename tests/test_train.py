"""`alpaca-forge train` end to end on a tiny random Llama: learning, LoRA, resume, 2 processes, bad input."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from alpaca_forge import write_records
from alpaca_forge.train import COMPLETE, TrainConfig, check_disk, read_config_file, resolve_config

from conftest import CLI, REPO, assert_user_error, run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rnd = random.Random(0)
    records = []
    for i in range(48):
        a, b = rnd.randint(1, 50), rnd.randint(1, 50)
        records.append(
            {
                "instruction": f"What is {a} plus {b}?",
                "input": "" if i % 2 else "the cat sat",
                "output": f"{a + b}. the cat sat on the mat.",
            }
        )
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", records)


def _train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = run_cli("-q", "train", *args, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result


def _io(model: Path, data: Path, out: Path | None = None) -> list[str]:
    """The model, data and (when given) output flags every run names."""
    return ["--model", str(model), "--data", str(data), *(["--output", str(out)] if out else [])]


def _flags(text: str) -> list[str]:
    return text.split()


def _assert_infers(model: Path, data: Path, tmp_path: Path, limit: int) -> None:
    """The trained output is a model `infer` loads, with its prompt format."""
    result = run_cli(
        "infer",
        "--model",
        str(model),
        "--input",
        str(data),
        "--output",
        str(tmp_path / "p.jsonl"),
        *f"--max-new-tokens 4 --limit {limit}".split(),
    )
    assert result.returncode == 0, result.stderr


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_full_fine_tune_learns_and_changes_every_parameter(tiny_model_dir, data, tmp_path):
    out = tmp_path / "full"
    _train(
        *_io(tiny_model_dir, data, out),
        *_flags("--epochs 4 --learning-rate 3e-3 --batch-size 2 --val-size 8 --save-steps 5"),
    )
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"] * 0.8, summary
    assert summary["last_eval_loss"] is not None
    assert summary["tokenized"]["examples"] == 40 and summary["padding_share"] < 0.2
    # exact counts: 4 passes over the training rows; validation batches are not training tokens
    assert summary["tokens_seen_this_run"] == 4 * summary["tokenized"]["tokens"]
    assert summary["trained_tokens_this_run"] == 4 * summary["tokenized"]["trained_tokens"]
    assert summary["steady_tokens_per_s"] > 0 and summary["median_step_s"] > 0
    before, after = _weights(tiny_model_dir), _weights(out)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if (before[k] == after[k]).all()]
    assert not unchanged
    assert (out / "loss.png").stat().st_size > 1000 and any((out / "tensorboard").iterdir())
    assert json.loads((out / "prompt_format.json").read_text())["format"] == "alpaca"
    _assert_infers(out, data, tmp_path, limit=2)


def test_lora_trains_only_the_adapters(tiny_model_dir, data, tmp_path):
    out = tmp_path / "lora"
    _train(
        *_io(tiny_model_dir, data, out),
        *_flags("--method lora --lora-targets q_proj,v_proj --epochs 2 --learning-rate 1e-2 --merge"),
    )
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "v_proj"}
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["adapter"]["parameters"] == sum(v.numel() for v in adapter.values())
    before, merged = _weights(tiny_model_dir), _weights(out / "merged")
    changed = {k for k in before if not (before[k] == merged[k]).all()}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    # The adapter folder itself loads for inference (base + adapter, merged).
    _assert_infers(out, data, tmp_path, limit=1)


def test_qlora_trains_adapters_on_a_4bit_base_and_merges_in_full_precision(
    tiny_model_dir, data, tmp_path, monkeypatch
):
    """The whole QLoRA path. bitsandbytes (0.49 and later) also runs 4-bit layers on a CPU, so the
    run's CUDA guard is lifted for this test; the guard itself is tested with the bad input."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the dev install (make test installs it)")
    from alpaca_forge import train

    monkeypatch.setattr(train, "_check_qlora", lambda device: None)
    out = tmp_path / "qlora"
    settings = {"model": str(tiny_model_dir), "data": str(data), "output": str(out), "method": "qlora"}
    cfg = resolve_config(
        None, {**settings, "epochs": 3, "learning_rate": 1e-2, "merge": True, "logging_steps": 1}
    )
    summary = train.run(cfg, progress=False).summary
    assert summary["layers_in_4bit"] == 2 * 7  # every projection of both layers
    assert summary["last_loss"] < summary["first_loss"]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    merged_config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config  # a plain model, loadable without bitsandbytes
    before, merged = _weights(tiny_model_dir), _weights(out / "merged")
    assert all(merged[k].dtype == before[k].dtype for k in before)
    changed = {k for k in before if not (before[k] == merged[k]).all()}
    assert changed and all(k.endswith("proj.weight") for k in changed)
    _assert_infers(out / "merged", data, tmp_path, limit=1)


def test_kill_and_resume_gives_the_same_weights(tiny_model_dir, data, tmp_path):
    common = [
        *_io(tiny_model_dir, data),
        *_flags("--max-steps 80 --save-steps 10 --batch-size 1 --learning-rate 1e-3 --batching padded"),
        *_flags("--save-total-limit 2"),
    ]
    straight = tmp_path / "straight"
    _train(*common, "--output", str(straight))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [str(CLI), "-q", "train", *common, "--output", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(killed.glob(f"checkpoint-*/{COMPLETE}")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "train_summary.json").exists(), "the run finished before it could be killed"
    # A kill may land in the middle of the next save: that checkpoint is never resumed from.
    _train(*common, "--output", str(killed), "--resume")
    a, b = _weights(straight), _weights(killed)
    assert all((a[k] == b[k]).all() for k in a)
    assert json.loads((killed / "train_summary.json").read_text())["steps"] == 80
    # Without --resume the checkpoints are not silently overwritten; changed settings refuse.
    assert_user_error(run_cli("train", *common, "--output", str(tmp_path / "straight")), "finished model")
    shutil.rmtree(killed / "checkpoint-80", ignore_errors=True)
    for f in ("model.safetensors", "alpaca_forge_train.json", "train_summary.json"):
        (killed / f).unlink()
    assert_user_error(run_cli("train", *common, "--output", str(killed)), "--resume")
    changed = [*common, "--learning-rate", "5e-4"]
    assert_user_error(run_cli("train", *changed, "--output", str(killed), "--resume"), "learning_rate")


def test_two_processes_agree(tiny_model_dir, data, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "-m",
            "alpaca_forge",
            "-q",
            "train",
            *_io(tiny_model_dir, data, out),
            *_flags("--epochs 1 --batch-size 2 --save-steps 3"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2
    sums = summary["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert (out / "model.safetensors").is_file() and _weights(out)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors before any compute, nothing corrupt


def test_bad_input_is_refused_before_training(tiny_model_dir, data, tmp_path):
    base = ["train", *_io(tiny_model_dir, data, tmp_path / "o")]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_user_error(
        run_cli("train", *_io(tiny_model_dir, empty, tmp_path / "e")),
        "empty",
    )
    assert_user_error(run_cli(*base, "--max-seq-len", "8"), "no record fits")
    assert_user_error(run_cli(*base, "--method", "lora", "--lora-targets", "q_proj,query"), "query", "q_proj")
    assert_user_error(run_cli(*base, "--val-size", "48"), "leaves nothing to train on")
    assert_user_error(run_cli(*base, "--method", "qlora"), "CUDA")
    assert_user_error(run_cli(*base, "--dtype", "float16"), "float16")
    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert_user_error(
        run_cli("train", *_io(no_template, data, tmp_path / "c"), "--format", "chat"),
        "chat template",
    )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("checkpoint-*"))


def test_a_failed_write_leaves_the_last_checkpoint_intact(tiny_model_dir, data, tmp_path):
    """Out of disk, simulated with a file-size limit: a clean error, and --resume works after."""
    out = tmp_path / "full"
    args = [
        str(CLI),
        "-q",
        "train",
        *_io(tiny_model_dir, data, out),
        *_flags("--max-steps 6 --save-steps 2 --batch-size 2"),
    ]

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = subprocess.run(args, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert_user_error(result, "write failed", "--resume")
    assert not list(out.glob(f"checkpoint-*/{COMPLETE}"))
    result = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 6


def test_disk_space_is_checked_first(tmp_path):
    from alpaca_forge import UserError

    with pytest.raises(UserError, match="GB free"):
        check_disk(tmp_path, 10**15, keep=2)


def test_config_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x.jsonl\nlearning_rat: 1e-4\nepochs: three\nmethod: lora\n")
    from alpaca_forge import ValidationError

    with pytest.raises(ValidationError) as e:
        read_config_file(bad)
    text = str(e.value)
    assert f"{bad}:2: unknown setting 'learning_rat'" in text and "learning_rate" in text
    assert f"{bad}:3:" in text and "epochs" in text
    ok = tmp_path / "ok.yaml"
    ok.write_text("data: x.jsonl\noutput: out\nmethod: lora\nlora_targets: [q_proj, v_proj]\nepochs: 2\n")
    cfg = resolve_config(str(ok), {"epochs": "5", "output": None})
    assert cfg.method == "lora" and cfg.lora_targets == ["q_proj", "v_proj"] and cfg.epochs == 5.0
    assert cfg.resolved_learning_rate() == 2e-4 and TrainConfig().resolved_learning_rate() == 2e-5
    result = run_cli("train", "--config", str(bad))
    assert_user_error(result, "learning_rat")


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "train" in first, path  # headed by the command that runs it
        cfg = resolve_config(str(path), {})
        assert cfg.data and cfg.output, path
    accel = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
    kinds = {yaml.safe_load(p.read_text())["distributed_type"] for p in accel}
    assert kinds == {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    fsdp = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    assert (
        fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
        and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    )


def test_data_tokenize_writes_what_the_trainer_sees(tiny_model_dir, data, tmp_path):
    from alpaca_forge import get_format, load_tokenizer, read_records
    from alpaca_forge.sft import tokenize_records

    out = tmp_path / "ids.jsonl"
    result = run_cli(
        "data", "tokenize", "--model", str(tiny_model_dir), str(data), "--output", str(out), "--show", "1"
    )
    assert result.returncode == 0, result.stderr
    assert "⟦Below is an instruction" in result.stdout and "</s>" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    examples, _ = tokenize_records(
        read_records(data), load_tokenizer(str(tiny_model_dir)), get_format("alpaca"), 512
    )
    assert [(r["index"], r["input_ids"], r["labels"]) for r in rows] == [
        (e.record, e.input_ids, e.labels) for e in examples
    ]


def test_bf16_on_a_cpu_is_checked_against_its_flags(tmp_path):
    from alpaca_forge.train import cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_has_native_bf16(str(info)) is False
    info.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16(str(info)) is True
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # Arm
    assert cpu_has_native_bf16(str(info)) is True
    assert cpu_has_native_bf16(str(tmp_path / "absent")) is None
