"""`alpaca-forge prefer`: preference pairs from the tiny model's sampled answers, judged by a
scripted judge on loopback (FakeJudge) whose preference is known, so every pair's winner is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from alpaca_forge.core.pairs import read_pairs
from alpaca_forge.prefer.decide import Vote, decide, flip, keep_pairs
from fake_judge import Ask, FakeJudge

from conftest import CLI, assert_user_error, run_cli


def make_set(tmp: Path, n: int) -> Path:
    path = tmp / "set.jsonl"
    rows = [
        {
            "id": f"t{k}",
            "instruction": f"Write something about topic number {k}.",
            "input": "" if k % 2 else f"note {k}",
        }
        for k in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def shorter(ask: Ask) -> str:
    """Prefers the shorter answer; a tie when they are as long."""
    if len(ask.a) == len(ask.b):
        return "tie"
    return "A" if len(ask.a) < len(ask.b) else "B"


def prefer_args(tiny: Path, items: Path, out: Path, url: str, *more: str) -> list[str]:
    return [
        "prefer", "--model", str(tiny), "--input", str(items), "--output", str(out),
        "--max-new-tokens", "10", "--judge-engine", "openai", "--judge-base-url", url,
        "--judge-model", "fake-judge", *more,
    ]  # fmt: skip


def summary_of(out: Path) -> dict:
    return json.loads(out.with_name(out.name.removesuffix(".jsonl") + ".summary.json").read_text())


def answers_of(out: Path) -> dict[str, list[str]]:
    by_item: dict[str, dict[int, str]] = {}
    path = out.with_name(out.name.removesuffix(".jsonl") + ".answers.jsonl")
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_item.setdefault(row["item"], {})[row["j"]] = row["answer"]
    return {item: [a[j] for j in sorted(a)] for item, a in by_item.items()}


# ---------------------------------------------------------------------------------------------
# Deciding a pair (unit)


def votes(*sides: tuple[bool, str | None]) -> list[Vote]:
    return [Vote(x_first, verdict, False) for x_first, verdict in sides]


@pytest.mark.unit
def test_a_pair_is_kept_only_when_its_verdicts_agree_on_a_winner():
    both = decide(0, 1, votes((True, "A"), (False, "B")), 1.0)  # x shown first won, then second won
    assert (both.winner, both.loser, both.agreement, both.dropped) == (0, 1, 1.0, None)
    always_a = decide(0, 1, votes((True, "A"), (False, "A")), 1.0)  # position bias: each answer once
    assert (always_a.winner, always_a.dropped) == (None, "inconsistent")
    half_tie = decide(0, 1, votes((True, "tie"), (False, "A")), 1.0)  # y once, a tie once
    assert (half_tie.winner, half_tie.dropped) == (None, "tie")
    assert decide(0, 1, votes((True, None), (False, None)), 1.0).dropped == "unreadable"
    # with a lower bar, 3 of 4 verdicts decide it
    four = votes((True, "A"), (False, "B"), (True, "A"), (False, "A"))
    assert decide(0, 1, four, 1.0).dropped == "inconsistent"
    assert (decide(0, 1, four, 0.75).winner, decide(0, 1, four, 0.75).agreement) == (0, 0.75)


@pytest.mark.unit
def test_best_worst_keeps_the_pair_of_the_most_and_the_fewest_wins():
    # answer 2 beats 0 and 1, 0 beats 1: best 2, worst 1
    d = [
        decide(0, 1, votes((True, "A"), (False, "B")), 1.0),
        decide(0, 2, votes((True, "B"), (False, "A")), 1.0),
        decide(1, 2, votes((True, "B"), (False, "A")), 1.0),
    ]
    (kept,) = keep_pairs(d, "best-worst")
    assert (kept.winner, kept.loser) == (2, 1)
    assert len(keep_pairs(d, "all")) == 3


@pytest.mark.unit
def test_flips_are_seeded_by_what_they_flip_and_counted_near_their_rate():
    draws = [flip("A", 0.3, 7, "t1", k) for k in range(2000)]
    assert draws == [flip("A", 0.3, 7, "t1", k) for k in range(2000)]  # the same on every run
    share = sum(f for _v, f in draws) / len(draws)
    assert 0.26 < share < 0.34
    assert all(v == ("B" if f else "A") for v, f in draws)
    assert flip("tie", 0.5, 7, "x") == ("tie", False) and flip(None, 0.5, 7, "x") == (None, False)


# ---------------------------------------------------------------------------------------------
# Pairs from the judge


@pytest.mark.integration
def test_pairs_are_trls_rows_with_the_judges_choice_and_a_rerun_asks_nothing(tmp_path, tiny_model_dir):
    items = make_set(tmp_path, 5)
    out = tmp_path / "pairs.jsonl"
    fj = FakeJudge(shorter)
    with fj as url:
        result = run_cli(*prefer_args(tiny_model_dir, items, out, url, "--samples", "3", "--keep", "all"))
        assert result.returncode == 0, result.stderr
        s = summary_of(out)
        first = out.read_bytes()
        asked = len(fj.asks)
        again = run_cli(*prefer_args(tiny_model_dir, items, out, url, "--samples", "3", "--keep", "all"))
        assert again.returncode == 0, again.stderr
        assert len(fj.asks) == asked and out.read_bytes() == first  # all cached, the same file
        assert summary_of(out)["answers_sampled"] == 0 and summary_of(out)["judgements_asked"] == 0
    answers = answers_of(out)
    distinct = sum(
        1 for a in answers.values() for x in range(3) for y in range(x + 1, 3) if a[x].strip() != a[y].strip()
    )
    assert s["items"] == 5 and s["answers_sampled"] == 15 and asked == s["judgements"] == 2 * distinct
    pairs = read_pairs(out)  # the train helper's reader takes every row
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == len(rows) == s["pairs"] > 0
    for row, pair in zip(rows, pairs, strict=True):
        assert set(row) >= {
            "id",
            "prompt",
            "chosen",
            "rejected",
            "instruction",
            "input",
            "verdicts",
            "agreement",
            "judge",
        }
        assert len(row["chosen"]) < len(row["rejected"])  # the judge's known preference
        assert row["prompt"] == row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        assert row["judge"] == "fake-judge | engine=openai" and row["agreement"] == 1.0
        assert sorted(v["order"] for v in row["verdicts"]) == ["chosen-first", "rejected-first"]
        assert all(v["verdict"] == ("A" if v["order"] == "chosen-first" else "B") for v in row["verdicts"])
        assert pair.chosen == row["chosen"] and row["chosen"] in answers[row["id"].split(":")[0]]
    ties = sum(
        1
        for a in answers.values()
        for x in range(3)
        for y in range(x + 1, 3)
        if a[x].strip() != a[y].strip() and len(a[x].strip()) == len(a[y].strip())
    )
    assert s["dropped"]["tie"] == ties and s["pairs"] == distinct - ties
    assert s["judge_cost"]["prompt_tokens"] > 0 and s["judge_cost"]["completion_tokens"] == s["judgements"]


@pytest.mark.integration
def test_a_policy_on_a_server_gets_one_request_per_answer_each_with_its_own_seed(tmp_path, tiny_lm):
    from alpaca_forge.engines.transformers_engine import TransformersEngine

    from openai_server import LoopbackServer

    items = make_set(tmp_path, 4)
    out = tmp_path / "pairs.jsonl"
    server = LoopbackServer(TransformersEngine(tiny_lm))
    with server as policy_url, FakeJudge(shorter) as judge_url:
        args = prefer_args(Path("tiny"), items, out, judge_url, "--samples", "3", "--engine", "openai")
        args += ["--base-url", policy_url, "--batch-size", "4"]
        assert run_cli(*args).returncode == 0
        seeds = [r["seed"] for r in server.requests]
        first = out.read_text()
        out.with_name("pairs.summary.json").unlink()
        assert run_cli(*args).returncode == 0 and len(server.requests) == 12  # all cached
    assert len(seeds) == 12 and len(set(seeds)) == 12
    assert out.read_text() == first and summary_of(out)["answers_cached"] == 12
    assert all(len(set(a)) > 1 for a in answers_of(out).values())  # sampled: not all the same


@pytest.mark.integration
def test_a_judge_that_always_says_a_gives_no_pairs_and_says_why(tmp_path, tiny_model_dir):
    items = make_set(tmp_path, 4)
    out = tmp_path / "pairs.jsonl"
    with FakeJudge(lambda ask: "A") as url:
        result = run_cli(*prefer_args(tiny_model_dir, items, out, url))
    assert result.returncode == 0, result.stderr
    s = summary_of(out)
    compared = s["pairs_compared"] - s["dropped"]["identical"]
    assert compared > 0 and s["dropped"]["inconsistent"] == compared and s["pairs"] == 0
    assert out.read_text() == ""
    assert f"{compared} order-inconsistent" in result.stderr


@pytest.mark.integration
def test_flip_rate_flips_about_that_share_the_same_way_every_run(tmp_path, tiny_model_dir):
    items = make_set(tmp_path, 6)
    outs = [tmp_path / "a" / "pairs.jsonl", tmp_path / "b" / "pairs.jsonl"]
    with FakeJudge(shorter) as url:
        for out in outs:
            more = (
                "--samples",
                "4",
                "--flip-rate",
                "0.5",
                "--annotators",
                "3",
                "--keep",
                "all",
                "--min-agreement",
                "0.51",
            )
            result = run_cli(*prefer_args(tiny_model_dir, items, out, url, *more))
            assert result.returncode == 0, result.stderr
    s = summary_of(outs[0])
    decisive = s["judgements"] - s["unreadable_verdicts"]
    assert decisive > 40 and 0.3 * decisive < s["flips"] < 0.7 * decisive
    assert outs[0].read_text() == outs[1].read_text() and s["flips"] == summary_of(outs[1])["flips"]
    rows = [json.loads(line) for line in outs[0].read_text().splitlines()]
    prompts = {v["prompt"] for r in rows for v in r["verdicts"]}
    assert prompts <= {"pairwise-v1", "pairwise-v2-correct", "pairwise-v3-user"} and len(prompts) > 1
    assert any(v["flipped"] for r in rows for v in r["verdicts"])


@pytest.mark.integration
def test_a_killed_run_resumes_to_the_same_pairs_asking_nothing_twice(tmp_path, tiny_model_dir):
    items = make_set(tmp_path, 6)
    killed, whole = tmp_path / "killed" / "pairs.jsonl", tmp_path / "whole" / "pairs.jsonl"
    cache = killed.with_name("pairs.judgements.jsonl")

    def slow(ask: Ask) -> str:
        time.sleep(0.1)
        return shorter(ask)

    fj = FakeJudge(slow)
    with fj as url:
        args = prefer_args(tiny_model_dir, items, killed, url, "--samples", "3", "--judge-batch-size", "2")
        proc = subprocess.Popen([str(CLI), "-q", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (not cache.exists() or cache.read_text().count("\n") < 4):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kept = cache.read_text().count("\n")
        assert not killed.exists(), "the run should have been killed while judging"
        before = len(fj.asks)
        assert run_cli(*args).returncode == 0
        resumed = len(fj.asks) - before
        assert run_cli(*prefer_args(tiny_model_dir, items, whole, url, "--samples", "3")).returncode == 0
    s = summary_of(killed)
    assert 4 <= kept < s["judgements"] and resumed == s["judgements"] - kept  # only what the cache lacked
    assert kept <= before <= kept + 2  # a kill loses at most the batch in flight (--judge-batch-size 2)
    assert killed.read_text() == whole.read_text() and s["pairs"] > 0


@pytest.mark.integration
def test_a_server_judge_is_asked_judge_batch_size_at_a_time(tmp_path, tiny_model_dir):
    items = make_set(tmp_path, 6)
    now = peak = 0
    lock = threading.Lock()

    def busy(ask: Ask) -> str:
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        time.sleep(0.2)
        with lock:
            now -= 1
        return shorter(ask)

    out = tmp_path / "pairs.jsonl"
    with FakeJudge(busy) as url:
        result = run_cli(
            *prefer_args(tiny_model_dir, items, out, url, "--samples", "4", "--judge-batch-size", "12")
        )
    assert result.returncode == 0, result.stderr
    assert summary_of(out)["judgements_asked"] >= 24 and peak == 12


@pytest.mark.integration
def test_expert_iteration_keeps_the_answer_the_judge_prefers(tmp_path, tiny_model_dir):
    items = make_set(tmp_path, 3)
    out = tmp_path / "sft.jsonl"
    with FakeJudge(shorter) as url:
        result = run_cli(
            *prefer_args(tiny_model_dir, items, out, url, "--samples", "3", "--expert-iteration")
        )
    assert result.returncode == 0, result.stderr
    answers = answers_of(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["t0", "t1", "t2"]
    for r in rows:
        assert set(r) >= {"instruction", "input", "output"}
        assert len(r["output"].strip()) == min(len(a.strip()) for a in answers[r["id"]])
        assert r["output"] == answers[r["id"]][r["chosen"]]


@pytest.mark.integration
def test_expert_iteration_keeps_the_answer_the_reward_model_scores_highest(tmp_path, tiny_model_dir):
    import torch
    from transformers import LlamaForSequenceClassification

    from alpaca_forge import get_format, save_model

    from conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = build_tiny_model(tokenizer).config
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.config.architectures = ["LlamaForSequenceClassification"]
    reward = save_model(model, tokenizer, tmp_path / "rm", get_format("alpaca"))
    items = make_set(tmp_path, 3)
    out = tmp_path / "sft.jsonl"
    result = run_cli(
        "prefer", "--model", str(tiny_model_dir), "--input", str(items), "--output", str(out),
        "--max-new-tokens", "10", "--samples", "4", "--expert-iteration", "--reward-model", str(reward),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers = answers_of(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert len(r["scores"]) == 4 and r["scores"][r["chosen"]] == max(r["scores"])
        assert r["output"] == answers[r["id"]][r["chosen"]] and r["chosen_by"] == str(reward)
    assert summary_of(out)["records"] == 3


# ---------------------------------------------------------------------------------------------
# People's verdicts


@pytest.mark.integration
def test_ratings_of_eval_rate_become_pairs_where_the_raters_agree(tmp_path):
    from alpaca_forge.eval.rate import Rating, RatingStore

    items = make_set(tmp_path, 4)
    systems = {}
    for name, answers in (("x", ["x0", "x1", "x2", "same"]), ("y", ["y0", "y1", "y2", "same"])):
        systems[name] = tmp_path / f"{name}.jsonl"
        systems[name].write_text(
            "".join(json.dumps({"id": f"t{k}", "output": a}) + "\n" for k, a in enumerate(answers))
        )
    folder = tmp_path / "rate"
    folder.mkdir()
    with RatingStore(folder / "ratings.jsonl") as store:
        at = "2026-01-01T00:00:00+00:00"
        # t0: both raters prefer x (in either order); t1: they disagree; t2: one rater, a tie
        store.add(Rating("ann", "t0", "x", "y", "A", at))
        store.add(Rating("bob", "t0", "y", "x", "B", at))
        store.add(Rating("ann", "t1", "x", "y", "A", at))
        store.add(Rating("bob", "t1", "x", "y", "B", at))
        store.add(Rating("ann", "t2", "y", "x", "A", at))
        store.undo("ann")  # ... taken back: y, shown first, did win
        store.add(Rating("ann", "t2", "y", "x", "A", at))
        store.add(Rating("ann", "t3", "x", "y", "A", at))
    out = tmp_path / "pairs.jsonl"
    result = run_cli(
        "prefer", "--from-ratings", str(folder), "--input", str(items), "--a", f"x={systems['x']}",
        "--b", f"y={systems['y']}", "--output", str(out), "--model", str(tmp_path / "no-such-model"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["chosen"], r["rejected"], r["judge"]) for r in rows] == [
        ("t0:x>y", "x0", "y0", "human:ann+bob"),
        ("t2:y>x", "y2", "x2", "human:ann"),
    ]
    assert {v["rater"] for v in rows[0]["verdicts"]} == {"ann", "bob"}
    s = summary_of(out)
    assert (
        s["dropped"] == {"identical": 1, "tie": 0, "inconsistent": 1, "unreadable": 0} and s["ratings"] == 6
    )
    assert len(read_pairs(out)) == 2


# ---------------------------------------------------------------------------------------------
# Bad input: named, with a fix, before any model loads (the model named here does not exist)


@pytest.mark.integration
def test_bad_input_is_named_before_any_model_loads(tmp_path):
    items = make_set(tmp_path, 2)
    out = str(tmp_path / "pairs.jsonl")
    base = ["prefer", "--model", str(tmp_path / "no-such-model"), "--output", out]
    cases = [
        ([*base, "--input", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        ([*base, "--input", str(items), "--samples", "1"], "--samples"),
        ([*base, "--input", str(items), "--flip-rate", "0.6"], "--flip-rate"),
        ([*base, "--input", str(items), "--temperature", "0"], "--temperature 0"),
        ([*base, "--input", str(items), "--a", "x.jsonl"], "--from-ratings"),
        ([*base, "--input", str(items), "--reward-model", str(tmp_path)], "--expert-iteration"),
        (
            [
                *base,
                "--input",
                str(items),
                "--from-ratings",
                str(tmp_path),
                "--a",
                "a.jsonl",
                "--b",
                "b.jsonl",
            ],
            "ratings.jsonl",
        ),
        ([*base, "--input", str(items), "--from-ratings", str(tmp_path)], "--from-ratings needs --a"),
        (["prefer", "--model", "m", "--input", str(items), "--output", str(tmp_path)], str(tmp_path)),
        (["prefer", "--model", "m", "--input", str(items), "--output", str(items)], "--output"),
    ]
    (tmp_path / "bad.jsonl").write_text('{"instruction": ""}\n')
    cases.append(([*base, "--input", str(tmp_path / "bad.jsonl")], "bad.jsonl:1"))
    for args, needle in cases:
        assert_user_error(run_cli(*args), needle)
    assert not Path(out).exists()
