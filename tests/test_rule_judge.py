"""Rule judges (`--judge-model rule:shorter`): a known preference with no model, read back as any
judge's reply is, in every command that judges."""

from __future__ import annotations

import json

import pytest

from alpaca_forge.engines import EngineConfig, GenerationSettings
from alpaca_forge.judging import Item, JudgementCache, RuleJudge, Task, judge_all, open_judge, parse_verdict

from conftest import assert_user_error, run_cli


@pytest.mark.unit
@pytest.mark.parametrize(
    ("rule", "a", "b", "verdict"),
    [
        ("shorter", "one two", "one two three", "A"),
        ("shorter", "one two three", "one", "B"),
        ("shorter", "same words", "other words", "tie"),
        ("shorter", "", "a long answer", "B"),  # an empty answer loses, even to a longer one
        ("longer", "one two", "one two three", "B"),
        ("longer", "a long answer here", "", "A"),
        ("longer", "", "  ", "tie"),
    ],
)
def test_a_rule_judges_reply_reads_back_as_its_verdict(rule, a, b, verdict):
    assert parse_verdict(RuleJudge(rule).reply(a, b)) == verdict


@pytest.mark.unit
def test_judge_all_asks_a_rule_judge_and_caches_it_like_a_model(tmp_path):
    item = Item("1", "Say something.", "")
    tasks = [Task(item, "x", "y", "a b c", "a"), Task(item, "y", "x", "a", "a b c")]
    cache = JudgementCache(tmp_path / "j.jsonl")
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0)
    judge = open_judge(EngineConfig(model="rule:shorter"))
    judged, asked = judge_all(tasks, lambda: judge, judge.name, settings, cache, progress=False)
    assert asked == 2 and [j.verdict for j in judged] == ["B", "A"]  # "y" wins in both orders
    again, asked = judge_all(tasks, lambda: judge, judge.name, settings, JudgementCache(tmp_path / "j.jsonl"), progress=False)
    assert asked == 0 and [j.verdict for j in again] == ["B", "A"]


@pytest.mark.integration
def test_eval_with_a_rule_judge_and_an_unknown_rule_named_before_anything_runs(tmp_path):
    rows_a = [{"instruction": f"Task {i}", "output": "short"} for i in range(6)]
    rows_b = [{"instruction": f"Task {i}", "output": "a much longer answer than the other"} for i in range(6)]
    for name, rows in (("a", rows_a), ("b", rows_b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--set", str(tmp_path / "a.jsonl"), "--a", f"short={tmp_path / 'a.jsonl'}", "--b", f"long={tmp_path / 'b.jsonl'}"]
    done = run_cli("eval", "pairwise", *common, "--output", str(tmp_path / "out"), "--judge-model", "rule:shorter")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["judge"] == "rule:shorter" and report["wins"] == 6 and report["position_consistency"] == 1.0
    wrong = run_cli("eval", "pairwise", *common, "--output", str(tmp_path / "o2"), "--judge-model", "rule:kinder")
    assert_user_error(wrong, "--judge-model", "rule:kinder", "rule:shorter")
    assert not (tmp_path / "o2").exists()
