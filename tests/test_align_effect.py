"""Proof of effect: learning from a judge's preferences changes what a model writes, as the judge
wanted. The judge is scripted (tests/fake_judge.py `fewer_words`: the answer of fewer words is
better), so the preference is known and every step of the recipe is the real CLI:

1. `prefer` (the tiny model's own sampled answers, judged in both orders) -> `train --method dpo`:
   on held-out pairs the trained policy's implicit reward ranks chosen above rejected (>= 0.9).
   All weights are trained (`--tune full`): on a tiny *random* model a LoRA memorises its pairs
   and stays near chance on held-out ones (best 0.73 over learning rates, ranks, betas, epochs);
   LoRA's effect is the SmolLM2 test's.
2. On the embedded SmolLM2: `prefer` -> `train --method dpo --tune lora` -> the aligned model and
   its parent answer held-out instructions -> `eval pairwise` by the same judge, both orders: the
   aligned model's win rate has its 95% interval above 50%.
3. `train --method reward` on the tiny model's pairs -> `infer --best-of 8 --reward-model` beats
   plain sampling (best-of-1) by the judge that made the pairs. That judge prefers an answer holding
   a digit (`with_a_digit`): a reward model on the tiny random model ranks held-out pairs by word
   counts no better than chance (it memorises its pairs), a token's presence it learns.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from alpaca_forge.core.pairs import read_pairs
from fake_judge import FakeJudge, fewer_words, with_a_digit, words

from conftest import VENDORED_DATA, run_cli

CORPUS = VENDORED_DATA / "corpus" / "small.alpaca.jsonl.gz"
EVAL_SET = VENDORED_DATA / "eval" / "user_oriented_instructions.jsonl"


def instructions(tmp: Path, name: str, start: int, stop: int) -> Path:
    """Records start..stop of the vendored corpus (400 instructions, our own text) as a file."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][start:stop]
    assert len(rows) == stop - start
    path = tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def judge_flags(url: str) -> list[str]:
    return ["--judge-engine", "openai", "--judge-base-url", url, "--judge-model", "fake-judge"]


def ok(*args: str):
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def summary(folder: Path) -> dict:
    return json.loads((folder / "train_summary.json").read_text())


def prefer_pairs(tmp: Path, model: str, items: Path, url: str, *more: str) -> Path:
    out = tmp / "pairs.jsonl"
    ok("-q", "prefer", "--model", model, "--input", str(items), "--output", str(out), *judge_flags(url), *more)
    return out


def assert_pairs_follow_the_judge(path: Path, least: int) -> None:
    pairs = read_pairs(path)  # the agreed format, as train reads it
    assert len(pairs) >= least, len(pairs)
    assert all(words(p.chosen) < words(p.rejected) for p in pairs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(r["agreement"] == 1.0 and len(r["verdicts"]) == 2 for r in rows)


# The tiny random model writes 24 tokens of noise; which of them have fewer words is all the
# judge sees. K=4 answers per instruction, the best against the worst (prefer's default).
TINY_SAMPLING = ["--samples", "4", "--temperature", "1.0", "--max-new-tokens", "24", "--seed", "0", "--batch-size", "64"]


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory, tiny_model_dir) -> Path:
    """300 instructions -> one pair each where the judge decided (ties dropped)."""
    tmp = tmp_path_factory.mktemp("tiny-pairs")
    with FakeJudge(fewer_words) as url:
        out = prefer_pairs(tmp, str(tiny_model_dir), instructions(tmp, "train", 0, 300), url, *TINY_SAMPLING)
    assert_pairs_follow_the_judge(out, 200)
    return out


@pytest.mark.integration
def test_dpo_on_the_judges_pairs_ranks_held_out_pairs_as_the_judge_does(tmp_path, tiny_model_dir, tiny_pairs):
    """Held-out `rewards/accuracies` (TRL's: the share of pairs whose implicit reward, beta times
    the policy's log-ratio to the reference, is higher for chosen) >= 0.9. Full weights: the tiny
    model's LoRA cannot move a preference for fewer word-starting tokens everywhere (it memorises
    the training pairs and stays at chance on held-out ones); LoRA's effect is shown on SmolLM2."""
    out = tmp_path / "dpo"
    started = time.perf_counter()
    ok(
        "-q", "train", "--method", "dpo", "--tune", "full", "--model", str(tiny_model_dir),
        "--data", str(tiny_pairs), "--val-size", "60", "--output", str(out),
        "--learning-rate", "2e-2", "--lr-schedule", "constant", "--warmup-ratio", "0",
        "--batch-size", "8", "--epochs", "5", "--save-steps", "1000", "--report-to", "none",
    )  # fmt: skip
    s = summary(out)
    metrics = s["metrics"]
    assert metrics["eval_rewards/accuracies"] >= 0.9, metrics
    assert metrics["eval_rewards/margins"] > 0, metrics
    print(f"DPO: held-out accuracy {metrics['eval_rewards/accuracies']:.3f}, {time.perf_counter() - started:.0f} s")


def eval_pairwise(tmp: Path, items: Path, a: Path, b: Path, url: str) -> dict:
    """`eval pairwise` of two predictions files by the judge at `url`, both orders: report.json."""
    out = tmp / "eval"
    ok(
        "-q", "eval", "pairwise", "--set", str(items), "--a", f"a={a}", "--b", f"b={b}", "--output", str(out),
        *judge_flags(url), "--batch-size", "32", "--bootstrap-samples", "2000",
    )  # fmt: skip
    return json.loads((out / "report.json").read_text())


def assert_a_wins(report: dict) -> None:
    rate = report["win_rate"]
    assert rate["low"] > 0.5, report
    assert report["wins"] > 3 * report["losses"] and report["sign_test_p"] < 0.01, report


@pytest.mark.integration
def test_best_of_8_by_a_reward_model_trained_on_the_pairs_beats_best_of_1(tmp_path, tiny_model_dir, tiny_pairs):
    started = time.perf_counter()
    # the same sampled answers as the DPO test (prefer's answer cache), judged by another judge
    pairs = tmp_path / "digits.jsonl"
    items = tiny_pairs.with_name("train.jsonl")
    (tmp_path / "digits.answers.jsonl").write_bytes(tiny_pairs.with_name("pairs.answers.jsonl").read_bytes())
    with FakeJudge(with_a_digit) as url:
        ok(
            "-q", "prefer", "--model", str(tiny_model_dir), "--input", str(items), "--output", str(pairs),
            *judge_flags(url), *TINY_SAMPLING, "--keep", "all",
        )  # fmt: skip
        rows = [json.loads(line) for line in pairs.read_text().splitlines()]
        assert json.loads(pairs.with_name("digits.summary.json").read_text())["answers_sampled"] == 0
        assert len(rows) >= 400 and all(with_a_digit_wins(r) for r in rows)
        rm = tmp_path / "rm"
        ok(
            "-q", "train", "--method", "reward", "--tune", "full", "--model", str(tiny_model_dir),
            "--data", str(pairs), "--output", str(rm), "--learning-rate", "1e-3", "--lr-schedule", "constant",
            "--warmup-ratio", "0", "--batch-size", "8", "--epochs", "2", "--save-steps", "1000",
            "--report-to", "none",
        )  # fmt: skip
        held_out = instructions(tmp_path, "held-out", 300, 400)
        sample = ["--model", str(tiny_model_dir), "--input", str(held_out), "--temperature", "1.0"]
        sample += ["--max-new-tokens", "24", "--seed", "7", "--batch-size", "32"]
        best8, best1 = tmp_path / "best8.jsonl", tmp_path / "best1.jsonl"
        ok("-q", "infer", *sample, "--output", str(best8), "--best-of", "8", "--reward-model", str(rm))
        ok("-q", "infer", *sample, "--output", str(best1))
        report = eval_pairwise(tmp_path, held_out, best8, best1, url)
    assert_a_wins(report)
    digit = [sum(any(c.isdigit() for c in json.loads(line)["output"]) for line in p.read_text().splitlines()) for p in (best8, best1)]
    print(
        f"best-of-8 vs best-of-1: win rate {report['win_rate']['value']:.2f} "
        f"[{report['win_rate']['low']:.2f}, {report['win_rate']['high']:.2f}], "
        f"answers with a digit {digit[0]} vs {digit[1]} of 100, {time.perf_counter() - started:.0f} s"
    )


def with_a_digit_wins(row: dict) -> bool:
    return any(c.isdigit() for c in row["chosen"]) and not any(c.isdigit() for c in row["rejected"])


def seed_instructions(tmp: Path) -> Path:
    """The 56 seed tasks we ship and vendor (package:demo-seeds.jsonl and the tests' own), as
    instructions: what `prefer` samples SmolLM2's answers to."""
    from alpaca_forge.core.shipped import package_file

    rows = []
    for path in (package_file("demo-seeds.jsonl"), VENDORED_DATA / "seed_tasks.jsonl"):
        for line in path.read_text().splitlines():
            task = json.loads(line)
            rows.append({"instruction": task["instruction"], "input": task["instances"][0].get("input", "")})
    out = tmp / "seeds.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def evaluation_set(tmp: Path) -> Path:
    """28 held-out evaluation instructions (the vendored set and package:demo-eval.jsonl)."""
    from alpaca_forge.core.shipped import package_file

    text = EVAL_SET.read_text() + package_file("demo-eval.jsonl").read_text()
    out = tmp / "eval-set.jsonl"
    out.write_text(text)
    return out


@pytest.mark.real_model
@pytest.mark.llamacpp
def test_dpo_on_smollm2_wins_against_its_parent_by_the_judge_that_made_the_pairs(tmp_path):
    """prefer (SmolLM2's own answers, llama.cpp, K=4) -> LoRA DPO -> the aligned model and its
    parent answer 28 held-out instructions (greedy) -> `eval pairwise`, both orders: the aligned
    model's win rate, with its 95% interval, lies above 50%. Measured: 56 pairs (chosen 28 words
    on average, rejected 47), training accuracy 1.0 after 14 steps, win rate 0.86 [0.71, 0.96]
    (24 wins, 4 losses), 392 words in all against the parent's 1,090."""
    from alpaca_forge.core.models import DEFAULT_MODEL

    started = time.perf_counter()
    with FakeJudge(fewer_words) as url:
        pairs = prefer_pairs(
            tmp_path, DEFAULT_MODEL, seed_instructions(tmp_path), url, "--engine", "llamacpp",
            "--samples", "4", "--temperature", "1.0", "--max-new-tokens", "64", "--seed", "0",
        )  # fmt: skip
        assert_pairs_follow_the_judge(pairs, 40)
        aligned = tmp_path / "dpo"
        ok(
            "-q", "train", "--method", "dpo", "--tune", "lora", "--model", DEFAULT_MODEL, "--data", str(pairs),
            "--output", str(aligned), "--max-steps", "14", "--batch-size", "4", "--learning-rate", "5e-4",
            "--lr-schedule", "constant", "--warmup-ratio", "0", "--max-seq-len", "256",
            "--save-steps", "1000", "--report-to", "none",
        )  # fmt: skip
        assert summary(aligned)["metrics"]["rewards/accuracies"] > 0.8
        held_out = evaluation_set(tmp_path)
        greedy = ["--input", str(held_out), "--temperature", "0", "--max-new-tokens", "64", "--batch-size", "14"]
        mine, parent = tmp_path / "aligned.jsonl", tmp_path / "parent.jsonl"
        ok("-q", "infer", "--model", str(aligned), *greedy, "--output", str(mine))
        ok("-q", "infer", "--model", DEFAULT_MODEL, *greedy, "--output", str(parent))
        report = eval_pairwise(tmp_path, held_out, mine, parent, url)
    assert report["win_rate"]["low"] > 0.5, report
    answers = [[json.loads(line)["output"] for line in p.read_text().splitlines()] for p in (mine, parent)]
    # the judge's taste is learnt as shorter answers, not as saying nothing (measured: 1 empty of 28)
    assert sum(1 for a in answers[0] if not a.strip()) <= 3
    counts = [sum(words(a) for a in side) for side in answers]
    print(
        f"aligned vs parent: win rate {report['win_rate']['value']:.2f} [{report['win_rate']['low']:.2f}, "
        f"{report['win_rate']['high']:.2f}], {counts[0]} vs {counts[1]} words, {time.perf_counter() - started:.0f} s"
    )
