"""Learning from preferences: the pair file (core.pairs) and `train --method reward|dpo|orpo|kto|simpo`."""

import gzip
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from alpaca_forge.core.errors import UserError, ValidationError
from alpaca_forge.core.pairs import Pair, pair_row, read_pairs, write_pairs
from alpaca_forge.train.checkpoints import COMPLETE

from conftest import CLI, assert_user_error, build_tiny_model, build_tiny_tokenizer, run_cli

ROW = {
    "id": "p1",
    "prompt": "Translate to French.\n\nGood morning",
    "chosen": "Bonjour",
    "rejected": "Hello",
    "instruction": "Translate to French.",
    "input": "Good morning",
    "verdicts": [{"order": "ab", "winner": "a"}, {"order": "ba", "winner": "b"}],
    "agreement": 1.0,
    "judge": "fake-judge@loopback",
}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# core.pairs


@pytest.mark.unit
@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json", "pairs.jsonl.gz"])
def test_pairs_round_trip_keeps_the_agreed_row(tmp_path, name):
    pair = read_pairs(_write(tmp_path / "in.jsonl", [ROW]))[0]
    assert pair == Pair("p1", "Translate to French.", "Good morning", "Bonjour", "Hello")
    assert pair.meta == {"verdicts": ROW["verdicts"], "agreement": 1.0, "judge": ROW["judge"]}
    assert pair_row(pair) == ROW
    assert list(pair_row(pair))[:6] == ["id", "prompt", "chosen", "rejected", "instruction", "input"]
    path = write_pairs(tmp_path / name, [pair])
    if name.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            assert json.loads(f.readline()) == ROW
    assert [pair_row(p) for p in read_pairs(path)] == [ROW]


@pytest.mark.unit
def test_trl_plain_and_conversational_rows_are_read(tmp_path):
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1+1."}],
            "chosen": [{"role": "assistant", "content": "2"}],
            "rejected": [{"role": "assistant", "content": "3"}],
        },
        {  # TRL's implicit prompt: the conversation is in chosen and rejected
            "chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
            "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Bye."}],
        },
    ]
    pairs = read_pairs(_write(tmp_path / "trl.jsonl", rows))
    assert [(p.instruction, p.input, p.chosen, p.rejected) for p in pairs] == [
        ("Name a colour.", "", "Blue.", "No."),
        ("Add 1+1.", "", "2", "3"),
        ("Say hi.", "", "Hi!", "Bye."),
    ]
    assert len({p.id for p in pairs}) == 3, "pairs without an id get a stable one"
    assert read_pairs(tmp_path / "trl.jsonl")[0].id == pairs[0].id


@pytest.mark.unit
def test_every_pair_problem_is_named_with_line_and_field(tmp_path):
    path = _write(
        tmp_path / "bad.jsonl",
        [
            {"instruction": "ok", "chosen": "a", "rejected": "b"},
            {"instruction": "x", "rejected": "b"},
            {"instruction": "x", "chosen": "  ", "rejected": "b"},
            {"instruction": "x", "chosen": " same ", "rejected": "same"},
            {"chosen": "a", "rejected": "b"},
            "{not json",
            '["a list"]',
            {"prompt": "x", "chosen": "a", "rejected": 3},
        ],
    )
    with pytest.raises(ValidationError) as e:
        read_pairs(path)
    found = [(p.where, p.message) for p in e.value.problems]
    assert found == [
        (f"{path}:2", "field 'chosen' is missing"),
        (f"{path}:3", "field 'chosen' is empty"),
        (f"{path}:4", "fields 'chosen' and 'rejected' are the same answer, so the pair teaches nothing"),
        (f"{path}:5", "the pair has no prompt: neither 'instruction' nor 'prompt' is there"),
        (f"{path}:6", "not valid JSON (Expecting property name enclosed in double quotes: column 2)"),
        (f"{path}:7", "expected a JSON object, got list"),
        (f"{path}:8", "field 'rejected' must be a string, got int (3)"),
    ]
    assert all(p.fix for p in e.value.problems)


@pytest.mark.unit
def test_an_empty_pair_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(UserError, match="holds no preference pairs"):
        read_pairs(tmp_path / "none.json")


# ---------------------------------------------------------------------------------------------
# train --method reward|dpo|orpo|kto|simpo


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """A known preference: the short answer is chosen, the rambling one rejected."""
    rnd = random.Random(0)
    pairs = []
    for i in range(32):
        a, b = rnd.randint(1, 50), rnd.randint(1, 50)
        pairs.append(
            Pair(
                f"p{i}",
                f"What is {a} plus {b}?",
                "" if i % 3 else "show your work",
                f"{a + b}.",
                f"{a + b}. the cat sat on the mat and then it sat on the mat again.",
            )
        )
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pairs)


def _align(model: Path, data: Path, out: Path, *flags: str) -> list[str]:
    return [
        "train",
        *("--model", str(model), "--data", str(data), "--output", str(out)),
        *[
            "--val-size",
            "0.25",
            "--batch-size",
            "4",
            "--logging-steps",
            "2",
            "--save-steps",
            "100",
            "--eval-steps",
            "100",
        ],
        *["--report-to", "none"],
        *flags,
    ]


# (method flags, steps, learning rate, the held-out metric that must show the preference was learnt)
METHODS = {
    "dpo": ("--method dpo --merge", 16, "5e-3", "eval_rewards/accuracies"),
    "dpo-full": ("--method dpo --tune full", 10, "1e-3", "eval_rewards/accuracies"),
    "orpo": ("--method orpo", 8, "5e-3", "eval_rewards/accuracies"),
    "simpo": ("--method simpo --simpo-gamma 0.5", 8, "5e-3", "eval_rewards/accuracies"),
    "kto": ("--method kto --beta 0.1", 8, "5e-3", "eval_rewards/margins"),
    "reward": ("--method reward", 8, "5e-3", "eval_pair_accuracy"),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_saves_and_reports_its_curves(name, tiny_model_dir, pairs_file, tmp_path):
    flags, steps, lr, metric = METHODS[name]
    out = tmp_path / name
    result = run_cli(
        "-q",
        *_align(
            tiny_model_dir, pairs_file, out, *flags.split(), "--max-steps", str(steps), "--learning-rate", lr
        ),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["method"] == flags.split()[1]
    metrics = summary["metrics"]
    assert metrics[metric] > (0.0 if metric.endswith("margins") else 0.6), metrics
    if name == "dpo":  # the known preference is learnt: held out, nearly every pair is ranked right
        assert metrics["eval_rewards/accuracies"] >= 0.9, metrics
        assert metrics["eval_rewards/margins"] > 0
        assert {"rewards/chosen", "rewards/rejected", "eval_rewards/chosen"} <= set(metrics)
        assert summary["method_settings"]["loss_type"] == ["sigmoid"]
        assert summary["method_settings"]["precompute_ref_log_probs"] is True
        assert (out / "merged" / "model.safetensors").is_file()
    assert (out / "prompt_format.json").is_file() and (out / "tokenizer.json").is_file()
    if "full" in flags:
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    else:
        assert (out / "adapter_model.safetensors").is_file()
        assert summary["adapter"]["parameters"] > 0
    if name == "reward":
        from alpaca_forge.judging.reward import RewardModel

        rm = RewardModel.open(out, device="cpu")
        assert rm.model.config.num_labels == 1
        ps = read_pairs(pairs_file)[:8]
        chosen, rejected = rm.score(ps, [p.chosen for p in ps]), rm.score(ps, [p.rejected for p in ps])
        assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) >= 7
    elif name != "dpo-full":  # a policy: loadable for generation like an SFT adapter
        from alpaca_forge import load_model

        assert load_model(str(out), device="cpu").model is not None


@pytest.mark.integration
@pytest.mark.parametrize("method", ["dpo", "orpo", "kto", "reward"])
def test_the_trainer_sees_our_ids_and_lora_references_the_disabled_adapter(
    method, tiny_model_dir, pairs_file, tmp_path
):
    """TRL trains on exactly SFT's ids (prompt format, answer, EOS); with LoRA there is no second
    model and no reference adapter: the reference is the base with the adapter disabled."""
    from alpaca_forge.core.config import build_config
    from alpaca_forge.core.examples import encode_record
    from alpaca_forge.core.records import Record
    from alpaca_forge.train import TrainConfig, loop, pair_setup

    config = build_config(
        TrainConfig,
        {
            "model": str(tiny_model_dir),
            "data": str(pairs_file),
            "output": str(tmp_path / "o"),
            "method": method,
            # cuts the rejected answers (the EOS must stay) and leaves out the pairs with an input
            "max_seq_len": 60,
            "report_to": "none",
        },
    )
    prep = pair_setup.prepare_pairs(config, resume=False)
    trainer = loop.build_trainer(config, prep, progress=False)
    assert prep.description["pairs_tokenized"]["no_room"] == 11  # every third pair: counted, not trained
    pair = read_pairs(pairs_file)[1]  # the first that fits
    ours = [
        encode_record(Record(pair.instruction, pair.input, answer), 0, prep.tokenizer, prep.fmt, 60)
        for answer in (pair.chosen, pair.rejected)
    ]
    assert ours[1].truncated and ours[1].input_ids[-1] == prep.tokenizer.eos_token_id
    rows = trainer.train_dataset
    if method == "kto":
        row = next(r for r in rows if r["prompt_ids"] + r["completion_ids"] == ours[0].input_ids)
        assert row["label"] is True
        assert any(
            r["prompt_ids"] + r["completion_ids"] == ours[1].input_ids and not r["label"] for r in rows
        )
    elif method == "reward":
        assert rows[0]["chosen_ids"] == ours[0].input_ids and rows[0]["rejected_ids"] == ours[1].input_ids
    elif method == "orpo":
        assert rows[0]["chosen_input_ids"] == ours[0].input_ids
        assert rows[0]["rejected_labels"][-1] == prep.tokenizer.eos_token_id
    else:
        assert rows[0]["prompt_ids"] + rows[0]["chosen_ids"] == ours[0].input_ids
        assert rows[0]["prompt_ids"] + rows[0]["rejected_ids"] == ours[1].input_ids
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert type(model).__name__.startswith("Peft")
    assert list(model.peft_config) == ["default"], "no reference adapter beside the trained one"
    assert getattr(trainer, "ref_model", None) is None, "no second model in memory"
    if method == "reward":
        assert "score" in model.peft_config["default"].modules_to_save


@pytest.mark.integration
def test_a_killed_dpo_run_resumes_from_its_last_checkpoint(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "killed"
    args = _align(
        tiny_model_dir, pairs_file, out, *["--method", "dpo", "--max-steps", "8", "--save-steps", "2"]
    )
    proc = subprocess.Popen([str(CLI), "-q", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob(f"checkpoint-*/{COMPLETE}")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "train_summary.json").exists(), "the run finished before it could be killed"
    done = sorted(int(p.parent.name.split("-")[1]) for p in out.glob(f"checkpoint-*/{COMPLETE}"))
    assert done and done[-1] < 8
    assert_user_error(run_cli("train", *args[1:]), "--resume")
    result = run_cli("-q", *args, "--resume")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["metrics"]["eval_rewards/accuracies"] is not None
    changed = [*args, "--beta", "0.3", "--resume"]
    (out / "train_summary.json").unlink()
    (out / "alpaca_forge_train.json").unlink()
    assert_user_error(run_cli(*changed), "beta")


@pytest.mark.integration
def test_bad_preference_input_is_refused_before_any_model_loads(tiny_model_dir, pairs_file, tmp_path):
    missing_model = str(tmp_path / "no-such-model")  # a load would fail on it: the errors come first
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"instruction": "Add 1+1.", "chosen": "2", "rejected": "3"})
        + "\n"
        + json.dumps({"instruction": "Add 2+2.", "chosen": "", "rejected": "5"})
        + "\n"
        + json.dumps({"instruction": "Add 3+3.", "chosen": "6", "rejected": " 6"})
        + "\n"
    )
    started = time.perf_counter()
    r = run_cli(
        "train",
        "--model",
        missing_model,
        "--data",
        str(bad),
        "--output",
        str(tmp_path / "o"),
        "--method",
        "dpo",
    )
    assert_user_error(
        r, f"{bad}:2: field 'chosen' is empty", f"{bad}:3: fields 'chosen' and 'rejected' are the same"
    )
    base = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(pairs_file),
        "--output",
        str(tmp_path / "o"),
    ]
    assert_user_error(
        run_cli(*base, "--method", "dpo", "--simpo-gamma", "1"),
        "--simpo-gamma is a setting of --method simpo, not dpo",
    )
    assert_user_error(
        run_cli(*base, "--method", "orpo", "--reference", str(tiny_model_dir)), "--reference is a setting of"
    )
    assert_user_error(run_cli(*base, "--method", "lora", "--tune", "full"), "--tune")
    assert_user_error(run_cli(*base, "--method", "dpo", "--tune", "full", "--merge"), "--merge")
    assert_user_error(run_cli(*base, "--method", "reward", "--merge"), "reward model")
    assert_user_error(run_cli(*base, "--method", "kto", "--batch-size", "1"), "at least 2")
    assert_user_error(run_cli(*base, "--method", "dpo", "--beta", "0"), "beta")
    assert_user_error(run_cli(*base, "--method", "dpo", "--batching", "grouped"), "--batching grouped")
    assert_user_error(run_cli(*base, "--method", "orpo", "--train-on-inputs"), "--train-on-inputs")
    assert time.perf_counter() - started < 30
    other = tmp_path / "other-base"
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, seed=1).save_pretrained(other)
    tok.save_pretrained(other)
    r = run_cli(*base, "--method", "dpo", "--reference", str(other))
    assert_user_error(r, "not the policy's base", "--tune full")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    same = tmp_path / "same-base"  # a copy of the base is the base
    import shutil

    shutil.copytree(tiny_model_dir, same)
    from alpaca_forge.core.config import build_config
    from alpaca_forge.train import TrainConfig
    from alpaca_forge.train.pair_setup import check_reference

    cfg = build_config(
        TrainConfig,
        {
            "model": str(tiny_model_dir),
            "data": str(pairs_file),
            "output": "x",
            "method": "dpo",
            "reference": str(same),
        },
    )
    assert check_reference(cfg) is None
