"""`data score` (a judge rates each record, 1-5 for accuracy and helpfulness) and `data clean
--min-score`: a scripted rating server on loopback, the rating read back, the cache and a resume
after kill -9, the histograms, and the rows without a score."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from alpaca_forge.core.records import Record
from alpaca_forge.judging.score import Rating, parse_rating, rule_rating, score_messages
from fake_rater import RatingJudge

from conftest import CLI, assert_user_error, run_cli


def by_digit(instruction: str, output: str) -> str:
    """Rates accuracy by the digit in the instruction ("task 3" -> 3) and helpfulness 5 - 1 for
    outputs of one word."""
    digit = int(re.search(r"\d+", instruction)[0]) % 5 + 1
    return f"**Accuracy:** {digit}/5\nHelpfulness: {4 if len(output.split()) == 1 else 5}\nBecause."


def write_records(path, n: int) -> None:
    rows = [{"instruction": f"task {k}", "input": "", "output": "one" if k % 2 else "two words"} for k in range(n)]
    rows[0]["evol"] = {"round": 1, "parent": "p"}  # extra keys go through
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def judge_args(url: str, *more: str) -> list[str]:
    return ["--judge-engine", "openai", "--judge-base-url", url, "--judge-model", "rater", *more]


# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "reply, rating",
    [
        ("Accuracy: 4\nHelpfulness: 5\nGood.", Rating(4, 5)),
        ("**Accuracy**: 3/5\n**Helpfulness**: 2/5", Rating(3, 2)),
        ("accuracy - 5.0, helpfulness: (1)", Rating(5, 1)),
        ("Accuracy: 4\nHelpfulness: 9", None),  # out of range
        ("Accuracy: 8/10\nHelpfulness: 4", None),  # another scale
        ("Accuracy: 3.5\nHelpfulness: 4", None),  # not a whole number
        ("Accuracy: 4\nHelpfulness: 4\nOn reflection, accuracy: 2", None),  # two that disagree
        ("The response is accurate and helpful.", None),
        ("", None),
    ],
)
def test_a_rating_is_read_only_when_certain(reply, rating):
    assert parse_rating(reply) == rating


@pytest.mark.unit
def test_the_rubric_shows_the_record_and_a_conversation_its_earlier_turns():
    text = score_messages(Record("Add 2 and 3.", "numbers", "5"))[0].content
    assert "### Instruction:\nAdd 2 and 3.\n\n### Input:\nnumbers\n\n### Response:\n5\n" in text
    assert "Accuracy: <1-5>\nHelpfulness: <1-5>" in text
    long = score_messages(Record("x", "", "word " * 50), max_output_chars=100)[0].content
    assert "[... the rest of this response is cut]" in long


@pytest.mark.unit
def test_rule_judges_rate_by_length():
    assert rule_rating("longer", "") == Rating(1, 1)
    assert [rule_rating("longer", "w " * n).overall for n in (1, 10, 30, 100)] == [2, 3, 4, 5]
    assert [rule_rating("shorter", "w " * n).overall for n in (1, 10, 30, 100)] == [5, 4, 3, 2]
    assert rule_rating("shorter", "  ") == Rating(1, 1)


@pytest.mark.integration
def test_a_server_judge_rates_every_record_in_flight_and_a_rerun_asks_nothing(tmp_path):
    data, out = tmp_path / "data.jsonl", tmp_path / "scored.jsonl"
    write_records(data, 12)
    judge = RatingJudge(by_digit, delay_s=0.05)
    with judge as url:
        r = run_cli("data", "score", str(data), "--output", str(out), *judge_args(url, "--judge-batch-size", "4"))
        assert r.returncode == 0, r.stderr
        assert len(judge.asked) == 12 and judge.most_in_flight == 4
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [row["score"]["accuracy"] for row in rows] == [k % 5 + 1 for k in range(12)]
        assert [row["score"]["helpfulness"] for row in rows] == [5 if k % 2 == 0 else 4 for k in range(12)]
        assert rows[3]["score"] == {"accuracy": 4, "helpfulness": 4, "overall": 4.0, "judge": "rater"}
        assert rows[0]["evol"] == {"round": 1, "parent": "p"} and rows[0]["instruction"] == "task 0"
        assert (tmp_path / "scored.scores.png").stat().st_size > 5000
        assert (tmp_path / "scored.cache.jsonl").read_text().count("\n") == 12
        assert "judge tokens:" in r.stderr and re.search(r"mean overall \d\.\d\d", r.stderr)
        first = out.read_bytes()
        again = run_cli("data", "score", str(data), "--output", str(out), *judge_args(url))
        assert again.returncode == 0, again.stderr
        assert len(judge.asked) == 12 and out.read_bytes() == first and "0 asked now, 12 from the cache" in again.stderr


@pytest.mark.integration
def test_unreadable_ratings_are_asked_again_then_left_unrated_and_counted(tmp_path):
    data, out = tmp_path / "data.jsonl", tmp_path / "scored.jsonl"
    write_records(data, 4)
    tries: dict[str, int] = {}

    def flaky(instruction: str, output: str) -> str:
        tries[instruction] = tries.get(instruction, 0) + 1
        if instruction == "task 1" and tries[instruction] < 2:
            return "A fine answer."  # read on the second try
        if instruction == "task 2":
            return "I would rate it highly."  # never readable
        return "Accuracy: 5\nHelpfulness: 5"

    judge = RatingJudge(flaky)
    with judge as url:
        r = run_cli("data", "score", str(data), "--output", str(out), *judge_args(url, "--retries", "2"))
    assert r.returncode == 0, r.stderr
    assert tries == {"task 0": 1, "task 1": 2, "task 2": 3, "task 3": 1}
    # A retry is a follow-up: the rubric, the unreadable reply, and the form asked for again.
    assert sorted(judge.turns) == [1, 1, 1, 1, 3, 3, 3]
    scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    assert scores[2] is None and all(s["overall"] == 5.0 for k, s in enumerate(scores) if k != 2)
    assert "1 records left unrated" in r.stderr


@pytest.mark.integration
def test_a_killed_run_resumes_to_the_same_bytes(tmp_path):
    data = tmp_path / "data.jsonl"
    write_records(data, 24)
    killed, whole = tmp_path / "killed" / "s.jsonl", tmp_path / "whole" / "s.jsonl"
    cache = killed.with_name("s.cache.jsonl")
    judge = RatingJudge(by_digit, delay_s=0.1)
    with judge as url:
        args = ["data", "score", str(data), "--output", str(killed), *judge_args(url, "--judge-batch-size", "2")]
        proc = subprocess.Popen([str(CLI), "-q", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not cache.exists() or cache.read_text().count("\n") < 4):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = cache.read_text().count("\n")
        assert 4 <= done < 24 and not killed.exists()
        before = len(judge.asked)
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
        assert len(judge.asked) - before <= 24 - done + 2  # at most the requests in flight again
        w = run_cli("data", "score", str(data), "--output", str(whole), *judge_args(url))
        assert w.returncode == 0, w.stderr
    assert killed.read_bytes() == whole.read_bytes()


@pytest.mark.integration
def test_clean_min_score_keeps_the_best_rows_as_they_were(tmp_path):
    data, out, best = tmp_path / "data.jsonl", tmp_path / "scored.jsonl", tmp_path / "best.jsonl"
    write_records(data, 10)
    r = run_cli("data", "score", str(data), "--output", str(out), "--judge-model", "rule:longer", "--plot", str(tmp_path / "p.svg"))
    assert r.returncode == 0, r.stderr and (tmp_path / "p.svg").exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["score"]["overall"] for row in rows} == {2.0}  # one or two words: 2
    # Hand-set scores: the filter reads score.overall, and unrated rows go too.
    for k, row in enumerate(rows):
        row["score"] = None if k == 9 else {**row["score"], "overall": [5.0, 4.5, 3.0][k % 3]}
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    c = run_cli("data", "clean", str(out), "--output", str(best), "--min-score", "4.5", "--checks", "none")
    assert c.returncode == 0, c.stderr
    kept = [json.loads(line) for line in best.read_text().splitlines()]
    assert kept == [row for k, row in enumerate(rows) if k != 9 and k % 3 != 2]
    removed = [json.loads(line) for line in (tmp_path / "best.dropped.jsonl").read_text().splitlines()]
    assert {r["index"]: r["checks"] for r in removed} == {2: ["min_score"], 5: ["min_score"], 8: ["min_score"], 9: ["unrated"]}


@pytest.mark.integration
def test_clean_min_score_refuses_rows_never_scored_naming_each_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"instruction": "a", "output": "b", "score": {"overall": 5.0}}) + "\n"
        + json.dumps({"instruction": "c", "output": "d"}) + "\n"
        + json.dumps({"instruction": "e", "output": "f", "score": "high"}) + "\n"
    )
    r = run_cli("data", "clean", str(data), "--output", str(tmp_path / "o.jsonl"), "--min-score", "4")
    assert_user_error(r, f"{data}:2", "never scored", "data score", f"{data}:3", "score.overall")
    assert not (tmp_path / "o.jsonl").exists()
    none = run_cli("data", "clean", str(data), "--output", str(tmp_path / "o.jsonl"), "--checks", "none")
    assert_user_error(none, "--min-score")
    # a file never scored at all is said once, not once per record
    raw = run_cli("data", "clean", "package:demo-seeds.jsonl", "--output", str(tmp_path / "o.jsonl"), "--min-score", "4")
    assert_user_error(raw, "none of its 32 records has a 'score' field", "data score")
    assert raw.stderr.count("never scored") == 1


@pytest.mark.integration
def test_an_unknown_rule_judge_is_refused_before_anything_runs(tmp_path):
    data = tmp_path / "data.jsonl"
    write_records(data, 2)
    r = run_cli("data", "score", str(data), "--output", str(tmp_path / "s.jsonl"), "--judge-model", "rule:best")
    assert_user_error(r, "rule:best", "rule:longer")
    assert not (tmp_path / "s.jsonl").exists()
