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

from alpaca_forge import read_records, split_records, write_records
from alpaca_forge.core.config import build_config
from alpaca_forge.core.examples import fingerprint
from alpaca_forge.train import TrainConfig, run
from alpaca_forge.train.checkpoints import COMPLETE
from alpaca_forge.train.setup import check_disk
from train_ranks import digest

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


def _train(*args: str):
    result = run_cli("-q", "train", *args)
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_qlora_trains_adapters_on_a_4bit_base_and_merges_in_full_precision(
    tiny_model_dir, data, tmp_path, monkeypatch
):
    """The whole QLoRA path. bitsandbytes (0.49 and later) also runs 4-bit layers on a CPU, so the
    run's CUDA guard is lifted for this test; the guard itself is tested with the bad input."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the dev install (make test installs it)")
    from alpaca_forge.train import setup

    monkeypatch.setattr(setup, "check_qlora", lambda device: None)
    out = tmp_path / "qlora"
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        data=str(data),
        output=str(out),
        method="qlora",
        epochs=3,
        learning_rate=1e-2,
        merge=True,
        logging_steps=1,
    )
    result = run(cfg, progress=False)
    summary = result.summary
    assert summary["layers_in_4bit"] == 2 * 7  # every projection of both layers
    assert summary["last_loss"] < summary["first_loss"]
    assert (result.first_loss, result.last_loss, result.output) == (
        summary["first_loss"],
        summary["last_loss"],
        out,
    )
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


@pytest.mark.real_model
def test_qlora_gets_a_4bit_base_from_a_gguf_with_the_cache_off(tmp_path, monkeypatch):
    """With ALPACA_FORGE_NO_CACHE=1 the GGUF's dense copy is never written to the cache; the
    4-bit quantization QLoRA asks for must still apply (it once gave a dense model, silently)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the dev install (make test installs it)")
    from alpaca_forge.train.setup import load_model

    cache = tmp_path / "cache"  # empty, so the GGUF is converted here rather than read from a copy
    monkeypatch.setenv("ALPACA_FORGE_CACHE", str(cache))
    monkeypatch.setenv("ALPACA_FORGE_NO_CACHE", "1")
    config = TrainConfig(
        model="smollm2-135m-instruct", data="unused", output=str(tmp_path / "o"), method="qlora"
    )
    model = load_model(config, autocast=None)
    four_bit = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert len(four_bit) == 7 * model.config.num_hidden_layers == 7 * 30  # every projection of every layer
    assert not any(cache.rglob(".complete"))  # nothing was cached


@pytest.mark.integration
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


@pytest.mark.integration
def test_two_processes_agree(tiny_model_dir, data, tmp_path):
    """torchrun, 2 processes (DDP on gloo): every rank ends with the same weights, and they are
    the ones saved. Each rank writes a digest of its in-memory model (tests/train_ranks.py)."""
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            str(Path(__file__).parent / "train_ranks.py"),
            str(tiny_model_dir),
            str(data),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["steps"] == ranks[1]["steps"] == summary["steps"]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert (out / "model.safetensors").is_file() and _weights(out)
    assert digest(_weights(out).items()) == ranks[0]["digest"]  # what was saved is what was trained
    assert digest(_weights(tiny_model_dir).items()) != ranks[0]["digest"]


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors before any compute, nothing corrupt


@pytest.mark.integration
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
    assert_user_error(run_cli(*base, "--val-size", "48"), "nothing to train on")
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


@pytest.mark.integration
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


@pytest.mark.unit
def test_disk_space_is_checked_first(tmp_path):
    from alpaca_forge import UserError

    with pytest.raises(UserError, match="GB free"):
        check_disk(tmp_path, 10**15, keep=2)


@pytest.mark.integration
def test_out_of_range_flags_are_all_reported_at_once_before_any_model_loads(tmp_path):
    out = tmp_path / "never"
    flags = {
        "--learning-rate": "-1",
        "--lora-dropout": "2",
        "--threads": "-2",
        "--val-size": "-1",
        "--seed": "-1",
    }
    result = run_cli(
        "train",
        *("--data", str(tmp_path / "absent.jsonl"), "--output", str(out)),
        *(x for pair in flags.items() for x in pair),
    )
    assert_user_error(result, *flags, "5 problems")
    for flag in flags:
        assert result.stderr.count(f"{flag}:") == 1, (flag, result.stderr)
    # Reported before the data is read (it does not exist) and so before any model loads.
    assert "absent.jsonl" not in result.stderr and not out.exists()


@pytest.mark.integration
def test_settings_that_contradict_each_other_are_all_reported():
    flags = "--val v.jsonl --val-size 2.5 --merge --global-batch-size 64 --gradient-accumulation 4"
    result = run_cli("train", *_flags("--data d.jsonl --output o"), *_flags(flags))
    assert_user_error(
        result,
        "--val FILE or --val-size N, not both",
        "neither a share below 1 nor a whole count",
        "--method full trains no adapter",
        "--global-batch-size N or --gradient-accumulation N, not both",
        "4 problems",
    )


@pytest.mark.integration
def test_config_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x.jsonl\nlearning_rat: 1e-4\nepochs: three\nmethod: lora\nlora_dropout: 1.5\n")
    from alpaca_forge import ValidationError

    with pytest.raises(ValidationError) as e:
        build_config(TrainConfig, {}, bad)
    text = str(e.value)
    assert f"{bad}:2: unknown setting 'learning_rat'" in text and "learning_rate" in text
    assert f"{bad}:3:" in text and "epochs" in text
    assert f"{bad}:5: 'lora_dropout' must be below 1" in text
    assert "--output: is required" in text  # neither the file nor a flag gives it
    ok = tmp_path / "ok.yaml"
    ok.write_text("data: x.jsonl\noutput: out\nmethod: lora\nlora_targets: [q_proj, v_proj]\nepochs: 2\n")
    cfg = build_config(TrainConfig, {"epochs": "5"}, ok)
    assert cfg.method == "lora" and cfg.lora_targets == ("q_proj", "v_proj") and cfg.epochs == 5.0
    assert cfg.resolved_learning_rate() == 2e-4
    assert TrainConfig(data="d", output="o").resolved_learning_rate() == 2e-5
    result = run_cli("train", "--config", str(bad))
    assert_user_error(result, "learning_rat", f"{bad}:2:", f"{bad}:3:", f"{bad}:5:")


@pytest.mark.unit
def test_every_shipped_config_loads():
    """Each config is headed by the command that runs it, and loads as that command's settings."""
    from alpaca_forge.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    commands = set()
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and f"--config configs/{path.name}" in first, path
        # "# alpaca-forge train --config ..." or "# accelerate launch ... -m alpaca_forge train --config ..."
        words = first.split()
        command = words[words.index("alpaca-forge" if "alpaca-forge" in words else "alpaca_forge") + 1]
        commands.add(command)
        cfg = build_config(sub.choices[command].get_default("config_class"), {}, path)
        if command == "train":
            assert cfg.data and cfg.output, path
    assert {"train", "generate", "infer", "serve"} <= commands
    accel = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
    kinds = {yaml.safe_load(p.read_text())["distributed_type"] for p in accel}
    assert kinds == {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    fsdp = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    assert (
        fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
        and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    )


@pytest.mark.unit
def test_val_size_holds_out_the_records_data_split_holds_out(tiny_model_dir, data, tmp_path):
    """`train --val-size` and `data split` share one seeded split (core.records.split_records):
    the same size and seed hold out the same records, a count or a share alike."""
    records = read_records(data)
    held_out = []
    for val_size, seed in ((8, 3), (0.25, 7), (8, 4)):
        out = tmp_path / f"split-{val_size}-{seed}"
        config = TrainConfig(
            model=str(tiny_model_dir),
            data=str(data),
            output=str(out),
            val_size=val_size,
            seed=seed,
            max_steps=1,
        )
        summary = run(config, progress=False).summary
        kept, held = split_records(records, val_size, seed)
        assert summary["val_fingerprint"] == fingerprint(held)
        assert summary["data_fingerprint"] == fingerprint(kept)
        assert (
            summary["validation_tokenized"]["records"]
            == len(held)
            == round(val_size * 48 if val_size < 1 else val_size)
        )
        held_out.append(summary["val_fingerprint"])
    assert len(set(held_out)) == 3  # another seed, other records


@pytest.mark.integration
def test_data_tokenize_writes_what_the_trainer_sees(tiny_model_dir, data, tmp_path):
    from alpaca_forge import get_format, load_tokenizer
    from alpaca_forge.core.examples import tokenize_records
    from alpaca_forge.train.setup import prepare

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
    # ... which are the items the trainer is handed (unpacked: one example each, in file order).
    config = TrainConfig(
        model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o"), batching="padded"
    )
    items = prepare(config, resume=False).train_set.items
    assert [(r["input_ids"], r["labels"]) for r in rows] == [(x["input_ids"], x["labels"]) for x in items]


@pytest.mark.unit
def test_bf16_on_a_cpu_is_checked_against_its_flags(tmp_path):
    from alpaca_forge.core.devices import cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_has_native_bf16(str(info)) is False
    info.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16(str(info)) is True
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # Arm
    assert cpu_has_native_bf16(str(info)) is True
    assert cpu_has_native_bf16(str(tmp_path / "absent")) is None
