"""`run` with learning from preferences: the fine-tuned model's sampled answers judged into pairs
(prefer), DPO from the fine-tuned model on them (align), the aligned model answering and judged
against the fine-tuned one by the same judge, and the aligned model exported — one recipe, one
report."""

from __future__ import annotations

import json

import pytest

from fake_judge import FakeJudge
from test_run import _actions, _state, write_recipe

from conftest import assert_user_error, run_cli
from fake_teacher import FakeTeacher, Script


def _shorter(ask) -> str:
    """The scripted judge prefers the shorter answer; equal lengths are a tie."""
    if len(ask.a.strip()) == len(ask.b.strip()):
        return "tie"
    return "A" if len(ask.a.strip()) < len(ask.b.strip()) else "B"


@pytest.fixture(scope="module")
def servers():
    with FakeTeacher(Script()) as teacher, FakeJudge(_shorter) as judge:
        yield teacher, judge


def _aligning_recipe(folder, model, teacher, judge, **changes):
    settings = dict(
        stages__train__method="lora",
        stages__train__learning_rate=1.0e-2,
        stages__prefer={
            "input": str(folder / "instructions.jsonl"),
            "samples": 3,
            "max_new_tokens": 12,
            "temperature": 1.0,
            "judge_model": "rule:shorter",  # eval's judge is the scripted one on loopback
        },
        stages__align={
            "method": "dpo",
            "learning_rate": 5.0e-3,
            "epochs": 2,
            "batch_size": 4,
            "max_seq_len": 128,
            "save_steps": 2,
            "logging_steps": 1,
        },
    )
    return write_recipe(folder, model, teacher, judge, **{**settings, **changes})


def _instructions(folder, n=12):
    rows = [{"instruction": f"Name one thing about the number {i}.", "input": "", "output": ""} for i in range(n)]
    (folder / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.integration
@pytest.mark.llamacpp
def test_a_recipe_that_aligns_judges_the_aligned_model_and_exports_it(tmp_path, tiny_model_dir, servers):
    teacher, judge = servers
    _instructions(tmp_path)
    recipe = _aligning_recipe(tmp_path, tiny_model_dir, teacher, judge)
    first = run_cli("run", str(recipe))
    assert first.returncode == 0, first.stderr
    assert set(_actions(first)) == {"generate", "data", "train", "prefer", "align", "infer", "eval", "export"}
    run_dir = tmp_path / "run"
    state = _state(run_dir)
    assert all(s["status"] == "done" for s in state["stages"].values())

    prefer = state["stages"]["prefer"]["figures"]
    pairs = [json.loads(x) for x in (run_dir / "prefer" / "pairs.jsonl").read_text().splitlines()]
    assert prefer["pairs"] == len(pairs) > 0
    for p in pairs:  # the scripted judge's preference, both orders
        assert len(p["chosen"].split()) < len(p["rejected"].split())
    # the policy that answered is the fine-tuned model, and align starts from it
    align = state["stages"]["align"]["figures"]["summary"]
    assert align["config"]["model"] == str(run_dir / "train")
    assert align["config"]["data"] == str(run_dir / "prefer" / "pairs.jsonl")
    assert align["method"] == "dpo" and "rewards/accuracies" in align["metrics"]

    aligned_answers = run_dir / "infer" / "aligned.jsonl"
    assert len(aligned_answers.read_text().splitlines()) == 4  # infer's limit
    report = json.loads((run_dir / "eval" / "aligned" / "report.json").read_text())
    assert report["a"] == "aligned" and report["b"] == "fine-tuned"
    # judged by the judge whose preferences the model learned; the fine-tuned model against its
    # base by the recipe's eval judge
    assert report["judge"] == "rule:shorter"
    assert json.loads((run_dir / "eval" / "report.json").read_text())["judge"] == "fake-judge"
    # the exported file is the aligned model, merged: its adapter came from the align stage
    export = state["stages"]["export"]["figures"]
    assert export["merge"]["output"] == str(run_dir / "export" / "merged")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["export"]["settings"]["configs"]["merge"]["adapter"] == str(run_dir / "align")

    page = (run_dir / "report.html").read_text()
    assert "Learning from preferences" in page
    assert "Aligned against fine-tuned, by the same judge" in page
    assert "preference accuracy, training / held-out" in page

    again = run_cli("run", str(recipe))  # nothing changed: every stage skipped
    assert again.returncode == 0, again.stderr
    assert set(_actions(again).values()) == {"skipped"}


@pytest.mark.integration
def test_an_align_stage_without_prefer_or_with_wired_fields_is_named(tmp_path, tiny_model_dir):
    with FakeTeacher(Script()) as teacher, FakeJudge(_shorter) as judge:
        _instructions(tmp_path)
        recipe = _aligning_recipe(
            tmp_path, tiny_model_dir, teacher, judge, stages__prefer=None, stages__align__data="mine.jsonl"
        )
        result = run_cli("run", str(recipe), "--dry-run")
    assert_user_error(result, "stages.align", "'data' is set by the recipe", "stage 'align' reads the output of a 'prefer' stage")


@pytest.mark.integration
def test_the_dry_run_plans_prefer_and_align_between_train_and_infer(tmp_path, tiny_model_dir):
    with FakeTeacher(Script()) as teacher, FakeJudge(_shorter) as judge:
        _instructions(tmp_path)
        result = run_cli("run", str(_aligning_recipe(tmp_path, tiny_model_dir, teacher, judge)), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert list(_actions(result)) == ["generate", "data", "train", "prefer", "align", "infer", "eval", "export"]
