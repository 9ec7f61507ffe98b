"""Reward-model scoring and best of N (`judging.reward`, `judging.best_of`, `infer --best-of`).

A reward model is made to prefer answers that mention a cat (trained a few Bradley-Terry steps
on the very ids it scores); the judge is FakeJudge, scripted to prefer the shorter answer.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from alpaca_forge.core.examples import encode_record
from alpaca_forge.core.prompts import get_format
from alpaca_forge.core.records import Record
from alpaca_forge.judging.best_of import Choice, JudgeChooser, RewardChooser, best_index
from alpaca_forge.judging.items import Item
from alpaca_forge.judging.judge import JudgementCache
from alpaca_forge.judging.reward import RewardModel, reward_ids
from fake_judge import Ask, FakeJudge

from conftest import CLI, assert_user_error, build_tiny_model, build_tiny_tokenizer, run_cli

CAT = "the cat sat on the mat."
OTHERS = ["Paris is the capital.", "What is the capital of France?", "a response", "the mat."]


def shorter(ask: Ask) -> str:
    """The scripted judge: the shorter response wins; equal lengths tie."""
    if len(ask.a) == len(ask.b):
        return "tie"
    return "A" if len(ask.a) < len(ask.b) else "B"


def _instructions(path: Path, n: int) -> list[dict]:
    rows = [{"instruction": f"Question number {i}: what is on the mat?", "input": ""} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# A reward model that likes cats


def write_cat_pairs(path: Path) -> Path:
    """Preference pairs where the answer naming the cat is always the chosen one (prompts of
    several shapes, so the preference holds for prompts it never saw)."""
    others = [
        "Paris is the capital.", "What is the capital of France?", "a response", "the mat.", "Blue.",
        "It is a city in Europe.", "I do not know.", "Green and red, with a dog.",
    ]  # fmt: skip
    prompts = [
        "Say something.", "Describe the room.", "Hi.", "What is there?", "Tell me a fact.",
        "Question number 7: what do you see?", "Name an animal.", "Write one sentence about anything at all.",
    ]  # fmt: skip
    rows = [
        {"id": f"{i}-{j}", "prompt": prompt, "chosen": CAT, "rejected": other}
        for i, prompt in enumerate(prompts)
        for j, other in enumerate(others)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def cat_reward_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """`train --method reward` (LoRA, the default) on the tiny model, taught to prefer the cat."""
    tmp = tmp_path_factory.mktemp("cat-reward")
    r = run_cli(
        "train", "--method", "reward", "--model", str(tiny_model_dir), "--data", str(write_cat_pairs(tmp / "pairs.jsonl")),
        "--output", str(tmp / "rm"), "--max-steps", "24", "--learning-rate", "5e-3", "--batch-size", "8",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp / "rm" / "adapter_config.json").is_file()
    return tmp / "rm"


@pytest.fixture(scope="module")
def whole_reward_dir(tmp_path_factory) -> Path:
    """A whole (not adapter) reward model folder: a random tiny LlamaForSequenceClassification."""
    import torch
    from transformers import LlamaForSequenceClassification

    from alpaca_forge import save_model

    tokenizer = build_tiny_tokenizer()
    config = build_tiny_model(tokenizer).config
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.config.architectures = ["LlamaForSequenceClassification"]
    return save_model(model, tokenizer, tmp_path_factory.mktemp("whole-reward"), get_format("alpaca"))


# ---------------------------------------------------------------------------------------------
# Unit


@pytest.mark.unit
def test_ties_go_to_the_first_candidate():
    assert best_index([1.0, 3.0, 3.0, 2.0]) == 1
    assert best_index([0, 0, 0]) == 0
    assert best_index([-2.0, -1.0]) == 1
    assert Choice(1, [1.0, 3.0, 3.0]).tied and not Choice(1, [1.0, 3.0, 2.0]).tied
    assert Choice(0, None, {"wins": [2, 2, 2]}).tied and not Choice(0, None, {"wins": [4, 0, 2]}).tied


@pytest.mark.unit
def test_a_reward_model_reads_an_answer_as_sft_reads_it():
    tok = build_tiny_tokenizer()
    fmt = get_format("alpaca")
    example = encode_record(Record("Name a pet.", "in one word", "the cat"), 0, tok, fmt, 256)
    assert reward_ids(tok, fmt, "Name a pet.", "in one word", "the cat", 256) == example.input_ids
    assert example.input_ids[-1] == tok.eos_token_id
    # cut as SFT cuts: answer tokens go from the end, the EOS stays
    prompt_len = len(tok(fmt.prompt("Name a pet.", "", tok))["input_ids"])
    cut = reward_ids(tok, fmt, "Name a pet.", "", "the cat sat on the mat " * 20, prompt_len + 4)
    assert len(cut) == prompt_len + 4 and cut[-1] == tok.eos_token_id
    # a prompt that fills the window alone still gets a score: its last tokens, then the EOS
    full = reward_ids(tok, fmt, "the cat sat on the mat " * 40, "", "yes", 32)
    assert len(full) == 32 and full[-1] == tok.eos_token_id


# ---------------------------------------------------------------------------------------------
# Choosing


@pytest.mark.integration
def test_the_reward_chooser_keeps_what_the_reward_model_prefers(cat_reward_dir):
    rm = RewardModel.open(cat_reward_dir, device="cpu", batch_size=3)
    items = [Item(f"i{n}", question) for n, question in enumerate(["What is on the mat?", "Describe a pet.", "Hi."])]
    # the cat answer in every position, among answers the model never saw in training
    candidates = [
        [CAT, "A dog barked.", "Nothing at all."],
        ["It is sunny today.", CAT, "I do not know."],
        ["Lyon is a city.", "Blue.", "Green and red.", CAT],
    ]
    choices = RewardChooser(rm).choose(items, candidates)
    assert [candidates[n][c.index] for n, c in enumerate(choices)] == [CAT] * 3
    for n, c in enumerate(choices):
        assert len(c.scores) == len(candidates[n])
        assert c.index == max(range(len(c.scores)), key=c.scores.__getitem__)


@pytest.mark.integration
def test_a_whole_reward_model_scores_alike_batched_and_alone(whole_reward_dir):
    batched = RewardModel.open(whole_reward_dir, device="cpu", batch_size=4)
    alone = RewardModel.open(whole_reward_dir, device="cpu", batch_size=1)
    items = [Item("a", "Say hello."), Item("b", "Name a colour.", "in one word")] * 3
    answers = ["Hello!", "Red.", "Hello there, my friend, how are you today?", "", "x", "Blue, like the sky."]
    scores = batched.score(items, answers)  # right-padded batches of unlike lengths
    assert scores == pytest.approx(alone.score(items, answers), abs=1e-4)
    assert len(set(scores)) == len(scores)


@pytest.mark.integration
def test_the_judge_chooser_keeps_the_answer_the_judge_prefers_in_both_orders(tmp_path):
    from alpaca_forge.engines import EngineConfig, GenerationSettings
    from alpaca_forge.engines.config import open_engine

    items = [Item("a", "Say hello."), Item("b", "Name a colour.")]
    candidates = [
        ["Hello there, my friend!", "Hi!", "Hello, hello.", "Hi!"],
        ["Red.", "A deep shade of blue.", "Green, like grass."],
    ]
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0, repetition_penalty=1.0)
    fj = FakeJudge(shorter)
    with fj as url:
        judge = EngineConfig(engine="openai", base_url=url, model="fake-judge")
        cache = JudgementCache(tmp_path / "judgements.jsonl")
        chooser = JudgeChooser(lambda: open_engine(judge), "fake-judge", settings, cache, progress=False)
        choices = chooser.choose(items, candidates)
        chooser.close()
    shown = {(ask.a, ask.b) for ask in fj.asks}
    assert all((b, a) in shown for a, b in shown), "every pair judged in both orders"
    assert [c.index for c in choices] == [1, 0]  # "Hi!" (the first of two equal ones) and "Red."
    # round-robin, both orders: 4 answers with two equal -> 12 ordered pairs less the 2 equal ones
    assert choices[0].detail["wins"] == [0, 4, 2, 4] and choices[0].detail["unread"] == 0
    assert choices[1].detail["wins"] == [4, 0, 2]
    # 6 ordered pairs of item a's 3 distinct texts (the same pair in the same order is asked once), 6 of b's
    assert chooser.asked == len(fj.asks) == 6 + 6
    prompt_tokens, completion_tokens = chooser.cost()
    assert completion_tokens == 12 and prompt_tokens > 12 * 50  # FakeJudge counts words: one a reply
    # a judge that always names Response A gives every candidate as many wins: ties, the first kept
    with FakeJudge(lambda ask: "A") as url:
        judge = EngineConfig(engine="openai", base_url=url, model="fake-judge")
        biased = JudgeChooser(lambda: open_engine(judge), "biased", settings, JudgementCache(tmp_path / "b.jsonl"))
        assert [(c.index, c.tied) for c in biased.choose(items, candidates)] == [(0, True), (0, True)]
    # a rerun reads every verdict from the cache and opens no judge
    again = JudgeChooser(lambda: pytest.fail("the judge was opened"), "fake-judge", settings, JudgementCache(cache.path))
    assert [c.index for c in again.choose(items, candidates)] == [1, 0] and again.asked == 0


# ---------------------------------------------------------------------------------------------
# infer --best-of


def _infer(model: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return [
        "infer", "--model", str(model), "--input", str(src), "--output", str(out),
        "--max-new-tokens", "12", "--temperature", "1.0", *extra,
    ]  # fmt: skip


@pytest.mark.integration
def test_infer_best_of_keeps_the_reward_models_best(tmp_path, tiny_model_dir, cat_reward_dir):
    rows = _instructions(tmp_path / "in.jsonl", 5)
    out = tmp_path / "best.jsonl"
    r = run_cli(*_infer(tiny_model_dir, tmp_path / "in.jsonl", out, "--best-of", "4", "--reward-model", str(cat_reward_dir)))
    assert r.returncode == 0, r.stderr
    assert "best of 4 samples" in r.stderr
    done = _lines(out)
    assert len(done) == len(rows)
    rm = RewardModel.open(cat_reward_dir, device="cpu")
    varied = 0
    for row in done:
        assert row["best_of"] == 4 and row["chosen_by"] == str(cat_reward_dir)
        assert len(row["candidates"]) == 4 and len(row["scores"]) == 4
        assert row["output"] == row["candidates"][row["chosen"]]
        assert row["chosen"] == best_index(row["scores"])
        item = Record(row["instruction"], row["input"])
        assert rm.score([item] * 4, row["candidates"]) == pytest.approx(row["scores"], abs=1e-4)
        varied += len(set(row["candidates"])) > 1
    assert varied >= 4, "samples at temperature 1 with 4 seeds differ"
    # the same output resumed with another N would mix two kinds of rows in one file
    r = run_cli(*_infer(tiny_model_dir, tmp_path / "in.jsonl", out, "--best-of", "2", "--reward-model", str(cat_reward_dir)))
    assert_user_error(r, f"{out}:1", "best_of: 4, now 2")


@pytest.mark.integration
def test_infer_best_of_by_the_judge_keeps_the_shortest(tmp_path, tiny_model_dir):
    _instructions(tmp_path / "in.jsonl", 4)
    out = tmp_path / "judged.jsonl"
    with FakeJudge(shorter) as url:
        judge = ["--judge-engine", "openai", "--judge-base-url", url, "--judge-model", "fake-judge"]
        r = run_cli(*_infer(tiny_model_dir, tmp_path / "in.jsonl", out, "--best-of", "4", *judge))
    assert r.returncode == 0, r.stderr
    assert "best of 4 samples, chosen by the judge" in r.stderr and "completion tokens of the judge" in r.stderr
    for row in _lines(out):
        assert row["chosen_by"] == "fake-judge | engine=openai"
        texts = [c.strip() for c in row["candidates"]]
        assert len(row["wins"]) == 4
        if len(set(texts)) > 1:
            assert len(row["output"].strip()) == min(len(t) for t in texts)
    assert (tmp_path / "judged.judgements.jsonl").is_file()


@pytest.mark.integration
def test_infer_best_of_by_a_rule_judge_needs_no_model_or_server(tmp_path, tiny_model_dir):
    _instructions(tmp_path / "in.jsonl", 3)
    out = tmp_path / "ruled.jsonl"
    r = run_cli(*_infer(tiny_model_dir, tmp_path / "in.jsonl", out, "--best-of", "3", "--judge-model", "rule:shorter"))
    assert r.returncode == 0, r.stderr
    for row in _lines(out):
        words = [len(c.split()) for c in row["candidates"]]
        assert row["chosen_by"] == "rule:shorter" and len(row["output"].split()) == min(words)


@pytest.mark.integration
def test_infer_best_of_resumes_after_kill_9(tmp_path, tiny_model_dir, cat_reward_dir):
    n = 12
    rows = _instructions(tmp_path / "in.jsonl", n)
    args = _infer(
        tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "killed.jsonl",
        "--best-of", "3", "--reward-model", str(cat_reward_dir), "--batch-size", "1", "--max-new-tokens", "8",
    )  # fmt: skip
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([str(CLI), *args], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_bytes()
    assert 2 <= before.count(b"\n") < n, "killed mid-run"

    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    resumed = _lines(out)
    assert [x["instruction"] for x in resumed] == [x["instruction"] for x in rows], "nothing lost or twice"
    straight = tmp_path / "straight.jsonl"
    assert run_cli(*[str(straight) if a == str(out) else a for a in args]).returncode == 0
    for got, want in zip(resumed, _lines(straight), strict=True):
        assert (got["output"], got["candidates"], got["chosen"]) == (want["output"], want["candidates"], want["chosen"])
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.integration
def test_best_of_at_temperature_0_is_refused(tmp_path, tiny_model_dir):
    _instructions(tmp_path / "in.jsonl", 1)
    base = ["infer", "--model", str(tiny_model_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl")]
    assert_user_error(run_cli(*base, "--best-of", "4"), "--best-of", "all 4 answers would be the same", "--temperature")
    r = run_cli(*base, "--reward-model", str(tmp_path))
    assert_user_error(r, "--reward-model", "--best-of")
    r = run_cli(*base, "--best-of", "2", "--temperature", "1", "--reward-model", str(tmp_path), "--judge-model", "x")
    assert_user_error(r, "--reward-model", "not both")
    assert not (tmp_path / "o.jsonl").exists()


def _other_vocab_reward_folder(folder: Path) -> Path:
    """A reward-model folder whose tokenizer has another vocabulary and whose weights are
    unreadable: refusing it without loading anything is the only way to pass."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator(["a completely different corpus of words"] * 4, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"not weights at all")
    (folder / "prompt_format.json").write_text('{"format": "alpaca", "system": null}\n')
    return folder


@pytest.mark.integration
def test_a_reward_model_with_another_tokenizer_is_refused_before_any_model_loads(tmp_path, tiny_model_dir):
    _instructions(tmp_path / "in.jsonl", 2)
    reward = _other_vocab_reward_folder(tmp_path / "other-rm")
    out = tmp_path / "o.jsonl"
    started = time.perf_counter()
    r = run_cli(*_infer(tiny_model_dir, tmp_path / "in.jsonl", out, "--best-of", "2", "--reward-model", str(reward)))
    assert_user_error(r, str(reward / "tokenizer.json"), "--reward-model", "tokenizer is not the policy's", "train --method reward")
    assert time.perf_counter() - started < 10
    assert not out.exists() or out.read_text() == ""
