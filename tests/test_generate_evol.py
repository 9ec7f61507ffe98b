"""`generate --method evol`: the pure steps (prompts, reading a rewrite, elimination rules,
lineage), then the real CLI against a scripted teacher on loopback (tests/fake_evol_teacher.py),
kill -9 and resume, and one run with the embedded model."""

import json
import signal
import subprocess
import time
from collections import Counter

import pytest

from alpaca_forge import Record, write_records
from alpaca_forge.core.records import read_records
from alpaca_forge.generate import FilterConfig
from alpaca_forge.generate.evol import root_ids
from alpaca_forge.generate.evol_config import OPERATIONS
from alpaca_forge.generate.evol_steps import (
    DIRECTIVES,
    EXAMPLES,
    answer_prompt,
    answer_reason,
    choose_operation,
    evolve_prompt,
    evolved_reason,
    new_words,
    read_evolved,
)
from alpaca_forge.generate.steps import blacklist_pattern
from fake_evol_teacher import EvolScript, FakeEvolTeacher

from conftest import CLI, assert_user_error, run_cli

TOPICS = [
    "Give three tips for staying healthy in winter.",
    "Explain why the sky looks blue to a young child.",
    "Summarise the causes of the French Revolution briefly.",
    "Suggest a name for a bakery that sells sourdough.",
    "Describe how a bicycle gear system transfers power.",
    "Compare renting and buying a home for a student.",
    "Classify these animals as mammals or reptiles.",
    "Rewrite the sentence in the passive voice.",
]


@pytest.fixture
def seeds(tmp_path):
    rows = [Record(t, "Snake, whale, lizard." if "Classify" in t else "", "An answer.") for t in TOPICS]
    rows[7] = Record(TOPICS[7], "The dog chased the ball across the park.", "The ball was chased.")
    return write_records(tmp_path / "seeds.jsonl", rows)


def _evol(seeds, out, url, *extra):
    return [
        "generate", "--method", "evol", "--seeds", str(seeds), "--output", str(out), "--engine", "openai",
        "--base-url", url, "--model", "fake", "--max-retries", "2", "--timeout-s", "10", *extra,
    ]  # fmt: skip


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- pure steps ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_operation_is_a_seeded_choice_among_those_asked():
    picks = [choose_operation(0, f"seed-{k}", r, OPERATIONS) for k in range(40) for r in (1, 2, 3)]
    assert set(picks) == set(OPERATIONS), "every operation comes up"
    assert picks == [choose_operation(0, f"seed-{k}", r, OPERATIONS) for k in range(40) for r in (1, 2, 3)]
    assert picks != [choose_operation(1, f"seed-{k}", r, OPERATIONS) for k in range(40) for r in (1, 2, 3)]
    assert {choose_operation(0, f"s{k}", 1, ("deepen", "breadth")) for k in range(30)} == {
        "deepen",
        "breadth",
    }


@pytest.mark.unit
def test_each_prompt_shows_the_task_and_its_own_directive_and_ends_where_the_rewrite_begins():
    task = "Give three tips for staying healthy."
    prompts = {op: evolve_prompt(op, task) for op in OPERATIONS}
    assert len(set(prompts.values())) == len(OPERATIONS)
    for op, prompt in prompts.items():
        assert f"Task:\n{task}\n\nNew task:" in prompt and prompt.endswith("New task:")
        assert op == "breadth" or DIRECTIVES[op] in prompt
        assert prompt.index(EXAMPLES[op][1]) < prompt.index(task), "one worked example, before the task"
    assert "same subject area" in prompts["breadth"] and "more skill" not in prompts["breadth"]
    assert answer_prompt(task) == f"Task:\n{task}\n\nA complete and helpful answer:\n"


@pytest.mark.unit
@pytest.mark.parametrize(
    "reply",
    [
        "List three winter health tips for night-shift nurses.",
        "New task: List three winter health tips for night-shift nurses.",
        "Sure! Here is the new task:\n**Rewritten instruction:** List three winter health tips for night-shift nurses.",
        '"List three winter health tips for night-shift nurses."',
        "The new task is: List three winter health tips for night-shift nurses.",
        "### New Task:\nList three winter health tips for night-shift nurses.\n\nAnswer: Sleep well, eat well.",
    ],
)
def test_a_rewrite_is_read_without_preamble_label_quotes_or_answer(reply):
    assert read_evolved(reply) == "List three winter health tips for night-shift nurses."


@pytest.mark.unit
def test_evolutions_are_eliminated_for_copied_prompt_text_no_gain_and_the_filters():
    parent = "Give three tips for staying healthy."
    f, bl = FilterConfig(), blacklist_pattern(FilterConfig().blacklist)

    def why(child):
        return evolved_reason(child, parent, min_new_words=3, filters=f, blacklist=bl)

    assert why("Give three tips for staying healthy, each under ten words, for office workers.") is None
    assert (
        why(read_evolved("#Rewritten Prompt#: Give five tips for staying healthy at sea.")) == "copied_prompt"
    )
    assert why("Rewrite the given prompt: give tips for staying healthy at sea.") == "copied_prompt"
    assert why(parent) == "no_information_gain"
    assert why("Give three tips for staying very healthy.") == "no_information_gain"  # one word added
    assert why("Staying healthy: give three tips.") == "no_information_gain"  # reordered, trimmed
    assert why("") == "empty"
    assert why("Draw a map of healthy habits for three new office workers.") == "blacklisted"
    assert new_words("a b c d e", "a b c") == 2 and new_words("a b", "") == 2


@pytest.mark.unit
def test_an_in_depth_evolution_that_drops_its_parent_is_not_a_rewrite():
    f, bl = FilterConfig(), blacklist_pattern(FilterConfig().blacklist)
    parent = "Summarise the causes of the French Revolution briefly."
    answered = "The French Revolution began in 1789, caused by debt, hunger and the ideas of the age."
    deeper = "Summarise the economic and social causes of the French Revolution briefly, ranking them."
    for child, kept, reason in ((answered, 0.5, "not_a_rewrite"), (answered, 0.0, None), (deeper, 0.5, None)):
        assert (
            evolved_reason(child, parent, min_new_words=3, filters=f, blacklist=bl, min_kept=kept) == reason
        )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("answer", "finish", "reason"),
    [
        ("Wear layers, drink water, and sleep eight hours a night.", "stop", None),
        ("I'm sorry, I don't know how to do that.", "stop", "cannot_answer"),
        ("Yes.", "stop", "cannot_answer"),
        ("... !!! ---", "stop", "cannot_answer"),
        ("It is the and of the.", "stop", "cannot_answer"),
        ("As an AI language model, I do not give health advice to anyone here.", "stop", "refusal"),
        ("I can’t provide that kind of plan, it is beyond what I do.", "stop", "refusal"),
        ("Wear layers, drink water, and then", "length", "answer_truncated"),
    ],
)
def test_answers_that_show_the_teacher_cannot_answer_eliminate_the_evolution(answer, finish, reason):
    assert answer_reason(answer, finish, min_words=3) == reason


@pytest.mark.unit
def test_roots_are_the_seeds_ids_when_distinct():
    assert root_ids([Record("a", id="t1"), Record("b", id="t2")]) == ["t1", "t2"]
    assert root_ids([Record("a", id="t1"), Record("b", id="t1")]) == ["seed-0", "seed-1"]
    assert root_ids([Record("a"), Record("b")]) == ["seed-0", "seed-1"]


# -- a run against a scripted teacher -----------------------------------------------------------


def _check_lineage(rows, seeds_path, rounds):
    """Every record's parent is its seed or the record its chain kept last, rounds increase."""
    seed_text = {
        f"seed-{k}": r.instruction for k, r in enumerate(read_records(seeds_path, require_output=False))
    }
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), "ids are unique"
    last_of_chain: dict[str, tuple[str, int]] = {}
    for row in rows:
        lin = row["evol"]
        assert set(lin) == {"parent", "round", "operation", "root"} and lin["operation"] in OPERATIONS
        assert lin["root"] in seed_text and 1 <= lin["round"] <= rounds and row["input"] == ""
        parent, parent_round = last_of_chain.get(lin["root"], (lin["root"], 0))
        assert lin["parent"] == parent and lin["round"] > parent_round
        if lin["operation"] != "breadth":  # in-depth: the parent's text grows
            before = seed_text[parent] if parent in seed_text else by_id[parent]["instruction"]
            assert row["instruction"].startswith(before.split("\n")[0])
        last_of_chain[lin["root"]] = (row["id"], lin["round"])


@pytest.mark.integration
def test_evol_runs_every_round_keeps_lineage_and_counts_each_elimination(tmp_path, seeds):
    script = EvolScript(
        copy_rate=0.15, leak_rate=0.1, refuse_rate=0.1, short_rate=0.1, preamble=True, fail_first=1
    )
    out = tmp_path / "evol.jsonl"
    with FakeEvolTeacher(script) as url:
        r = run_cli(*_evol(seeds, out, url, "--num-instructions", "1000", "--evol-rounds", "3", "--concurrency", "4",
                           "--price-prompt-per-1m", "1", "--price-completion-per-1m", "2"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "every seed evolved for 3 rounds" in r.stderr
    rows = _rows(out)
    _check_lineage(rows, seeds, 3)
    assert [r.instruction for r in read_records(out)] == [row["instruction"] for row in rows], "data reads it"
    s = json.loads((tmp_path / "evol.summary.json").read_text())
    d = s["details"]
    assert s["method"] == "evol" and s["accepted"] == len(rows) > 0 and s["retries"] >= 1
    assert d["evolve_requests"] == 8 * 3, "every chain tries every round"
    assert d["answer_requests"] == d["rewrites_passed"] and s["requests"] == 24 + d["answer_requests"]
    assert sum(d["kept_by_round"].values()) == len(rows) == sum(d["kept_by_operation"].values())
    assert d["kept_per_request"] == s["accepted_per_request"] == round(len(rows) / s["requests"], 3)
    dropped = s["dropped"]
    assert {"no_information_gain", "copied_prompt", "cannot_answer"} <= set(dropped), dropped
    assert sum(dropped.values()) == s["requests"] - len(rows) - d["rewrites_passed"], "one outcome each"
    log = _rows(tmp_path / "evol.requests.jsonl")
    answers = [e for e in log if e["request"].startswith("answer/")]
    assert sum(e["accepted"] for e in answers) == len(rows)
    # every seed's text reached the teacher; answers are asked as plain questions
    asked = [b["messages"][0]["content"] for b in script.seen]
    assert all(any(t in a for a in asked) for t in TOPICS)
    assert any(a == rows[0]["instruction"] for a in asked)


@pytest.mark.integration
def test_num_instructions_stops_early_and_the_completions_api_uses_its_layout(tmp_path, seeds):
    script = EvolScript()
    with FakeEvolTeacher(script) as url:
        r = run_cli(
            *_evol(
                seeds, tmp_path / "e.jsonl", url, "--num-instructions", "5", "--teacher-api", "completions"
            )
        )
    assert r.returncode == 0, r.stderr
    rows = _rows(tmp_path / "e.jsonl")
    assert len(rows) == 5 and {row["evol"]["round"] for row in rows} == {1}, "round 1 first, seed by seed"
    s = json.loads((tmp_path / "e.summary.json").read_text())
    assert s["stop_reason"] == "done" and s["requests"] == 10
    prompts = [b["prompt"] for b in script.seen]
    assert all(p.endswith("New task:") or p.endswith("A complete and helpful answer:\n") for p in prompts)


@pytest.mark.integration
def test_the_cost_cap_and_a_teacher_that_never_rewrites_stop_the_run(tmp_path, seeds):
    with FakeEvolTeacher(EvolScript()) as url:
        r = run_cli(*_evol(seeds, tmp_path / "c.jsonl", url, "--num-instructions", "100",
                           "--price-prompt-per-1m", "1000", "--max-cost-usd", "0.5"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "c.summary.json").read_text())
    assert s["stopped_by"] == "cost_limit" and 0.5 <= s["cost_usd"] < 0.5 + 0.2 and s["accepted"] < 16
    with FakeEvolTeacher(EvolScript(copy_rate=1.0)) as url:
        r = run_cli(
            *_evol(seeds, tmp_path / "b.jsonl", url, "--num-instructions", "5", "--max-barren-requests", "6")
        )
    assert r.returncode == 1, r.stderr
    s = json.loads((tmp_path / "b.summary.json").read_text())
    assert s["stopped_by"] == "barren" and s["requests"] == 6 and s["dropped"] == {"no_information_gain": 6}


@pytest.mark.integration
def test_kill_9_then_resume_writes_the_same_bytes_as_an_uninterrupted_run(tmp_path, seeds):
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    script = EvolScript(latency_s=0.02, copy_rate=0.1, refuse_rate=0.1)
    with FakeEvolTeacher(script) as url:
        common = ("--num-instructions", "1000", "--evol-rounds", "3")
        assert run_cli(*_evol(seeds, whole, url, *common)).returncode == 0
        args = _evol(seeds, cut, url, *common)
        proc = subprocess.Popen([str(CLI), *args], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not cut.exists() or cut.read_text().count("\n") < 6):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = cut.read_bytes()
        assert 6 <= before.count(b"\n") < whole.read_bytes().count(b"\n")
        with open(cut, "ab") as f:
            f.write(b'{"id": "seed-3.e2", "instruct')  # as a kill during a write would leave it
        r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "resuming:" in r.stderr
    assert cut.read_bytes() == whole.read_bytes()
    a, b = (json.loads((tmp_path / f"{n}.summary.json").read_text()) for n in ("whole", "cut"))
    assert a["accepted"] == b["accepted"] and a["details"]["kept_by_round"] == b["details"]["kept_by_round"]


@pytest.mark.integration
def test_a_resume_in_flight_loses_and_duplicates_nothing(tmp_path, seeds):
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    with FakeEvolTeacher(EvolScript(latency_s=0.03, copy_rate=0.1)) as url:
        common = ("--num-instructions", "1000", "--evol-rounds", "3", "--concurrency", "6")
        assert run_cli(*_evol(seeds, whole, url, *common)).returncode == 0
        r = run_cli(*_evol(seeds, cut, url, *common, "--max-requests", "13"))
        assert r.returncode == 0 and "request limit reached (13)" in r.stderr, r.stderr
        r = run_cli(*_evol(seeds, cut, url, *common))
    assert r.returncode == 0, r.stderr
    assert sorted(cut.read_text().splitlines()) == sorted(whole.read_text().splitlines())
    assert max(Counter(row["id"] for row in _rows(cut)).values()) == 1


@pytest.mark.integration
def test_bad_settings_and_a_foreign_output_are_clear_errors(tmp_path, seeds):
    with FakeEvolTeacher() as url:
        r = run_cli(
            *_evol(
                seeds,
                tmp_path / "a.jsonl",
                url,
                "--num-instructions",
                "3",
                "--evol-operations",
                "deepen,shout",
            )
        )
        assert_user_error(r, "shout", "--evol-operations")
        first = tmp_path / "first.jsonl"
        assert run_cli(*_evol(seeds, first, url, "--num-instructions", "2")).returncode == 0
        other = write_records(
            tmp_path / "other.jsonl", [Record("Name a colour of the rainbow now.", "", "Red.")]
        )
        r = run_cli(*_evol(other, first, url, "--num-instructions", "4"))
        assert_user_error(r, "not an evolution of these seeds")


# -- the embedded model -------------------------------------------------------------------------


@pytest.mark.real_model
def test_evol_with_the_embedded_model(tmp_path):
    """SmolLM2-135M in llama.cpp rewrites and answers 2 seed tasks for one round; the yield per
    request is printed (run with -s to see it)."""
    pytest.importorskip("llama_cpp", reason="the embedded model runs in llama.cpp here")
    seeds = write_records(tmp_path / "s.jsonl", [Record(t, "", "-") for t in TOPICS[:2]])
    out = tmp_path / "smol.jsonl"
    r = run_cli(
        "generate", "--method", "evol", "--seeds", str(seeds), "--output", str(out), "--num-instructions", "3",
        "--evol-rounds", "1", "--max-new-tokens", "128", timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "smol.summary.json").read_text())
    assert s["teacher"] == "smollm2-135m-instruct" and s["details"]["evolve_requests"] == 2
    assert s["accepted"] == (len(_rows(out)) if out.exists() else 0)
    print(f"\nembedded model: {s['accepted']} kept of {s['requests']} requests "
          f"({s['accepted_per_request']} per request), dropped {s['dropped']}, {s['wall_time_s_this_run']} s")  # fmt: skip
