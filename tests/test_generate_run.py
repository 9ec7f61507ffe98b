"""`alpaca-forge generate` end to end: the real CLI against a real HTTP teacher on loopback
(in this process, except where the process itself is the point: kill -9)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

from alpaca_forge import EngineConfig, Record, write_records
from alpaca_forge.core.rouge import rouge_l
from alpaca_forge.generate import GenerateConfig, GenerateResult, StopReason, run
from alpaca_forge.generate.steps import Pool
from alpaca_forge.generate.teacher_prompt import MAX_TASKS_PER_REPLY

from conftest import CLI, assert_user_error, run_cli
from fake_teacher import FakeTeacher, Script


@pytest.fixture
def seeds(tmp_path):
    """Twelve short seed tasks (the real 175 are used where the shared data is at hand)."""
    rows = [
        Record(f"Explain the idea number {w} in simple words.", "", f"Idea {w} means ...")
        for w in "abcdefghijkl"
    ]
    return write_records(tmp_path / "seeds.jsonl", rows)


def _generate(seeds, out, url, *extra):
    return [
        "generate", "--seeds", str(seeds), "--output", str(out), "--engine", "openai", "--base-url", url,
        "--model", "fake", "--max-retries", "2", "--timeout-s", "10", *extra,
    ]  # fmt: skip


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.integration
def test_a_run_accepts_exactly_n_with_accounting(tmp_path, seeds):
    script = Script(fail_first=2, fail_status=503)
    with FakeTeacher(script) as url:
        r = run_cli(*_generate(seeds, tmp_path / "gen.jsonl", url, "--num-instructions", "60", "--concurrency", "4",
                               "--price-prompt-per-1m", "2", "--price-completion-per-1m", "8"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = _rows(tmp_path / "gen.jsonl")
    assert len(rows) == 60 and len({row["instruction"] for row in rows}) == 60
    assert not any("most_similar_instructions" in row or "avg_similarity_score" in row for row in rows)
    summary = json.loads((tmp_path / "gen.summary.json").read_text())
    assert summary["accepted"] == 60 and summary["stop_reason"] == "done" and summary["retries"] >= 2
    assert summary["cost_usd"] == pytest.approx(
        (summary["prompt_tokens"] * 2 + summary["completion_tokens"] * 8) / 1e6, abs=1e-6
    )
    assert summary["requests"] <= 6, "no more requests than the target needs"
    assert "60 of 60 accepted" in r.stderr and "$" in r.stderr
    assert all(body["messages"][0]["content"].endswith("4. Instruction:") for body in script.seen)


@pytest.mark.integration
def test_similarity_details_add_alpacas_neighbour_fields_to_the_same_records(tmp_path, seeds):
    runs = {}
    with FakeTeacher(Script()) as url:
        for name, extra in (("plain", ()), ("details", ("--similarity-details",))):
            out = tmp_path / f"{name}.jsonl"
            r = run_cli(*_generate(seeds, out, url, "--num-instructions", "40", *extra))
            assert r.returncode == 0, r.stderr
            runs[name] = _rows(out)
    plain, details = runs["plain"], runs["details"]
    assert [row["instruction"] for row in details] == [row["instruction"] for row in plain]
    assert all(
        len(row["most_similar_instructions"]) == 10 and 0 <= row["avg_similarity_score"] < 0.7 for row in details
    )
    first = details[0]  # against the seeds alone: its scores are rouge_l's, highest first
    seed_texts = [f"Explain the idea number {w} in simple words." for w in "abcdefghijkl"]
    best = sorted((rouge_l(first["instruction"], t) for t in seed_texts), reverse=True)[:10]
    assert list(first["most_similar_instructions"].values()) == pytest.approx(best, abs=1e-6)


@pytest.mark.integration
def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path, seeds):
    out = tmp_path / "gen.jsonl"
    with FakeTeacher(Script(latency_s=0.05)) as url:
        args = _generate(seeds, out, url, "--num-instructions", "500", "--concurrency", "2")
        proc = subprocess.Popen([str(CLI), *args], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 60):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = out.read_bytes()
        assert 60 <= before.count(b"\n") < 500
        with open(out, "ab") as f:
            f.write(b'{"instruction": "cut off mid-wri')  # as a kill during a write would leave it
        r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "resuming:" in r.stderr
    rows = _rows(out)
    assert len(rows) == 500
    assert max(Counter(row["instruction"] for row in rows).values()) == 1
    assert out.read_bytes().startswith(before[: before.rfind(b"\n") + 1])
    assert json.loads((tmp_path / "gen.summary.json").read_text())["accepted"] == 500


@pytest.mark.integration
def test_near_duplicates_within_one_completion_are_dropped(tmp_path, seeds):
    with FakeTeacher(Script(repeat_task=True)) as url:
        r = run_cli(
            *_generate(seeds, tmp_path / "g.jsonl", url, "--num-instructions", "5", "--max-requests", "2")
        )
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "g.summary.json").read_text())
    # 16 alike per request (the stop strings end each reply before task 20): 1 kept, 15 dropped
    assert summary["accepted"] == 2 and summary["dropped"]["rouge_similar"] == 30
    assert "request limit reached" in summary["stop_reason"]


@pytest.mark.integration
def test_chat_preamble_and_the_completions_api(tmp_path, seeds):
    with FakeTeacher(Script(chat_style=True)) as url:
        r = run_cli(*_generate(seeds, tmp_path / "a.jsonl", url, "--num-instructions", "10"))
        assert r.returncode == 0 and len(_rows(tmp_path / "a.jsonl")) == 10, r.stderr
    script = Script()
    with FakeTeacher(script) as url:
        r = run_cli(
            *_generate(
                seeds, tmp_path / "b.jsonl", url, "--num-instructions", "10", "--teacher-api", "completions"
            )
        )
    assert r.returncode == 0 and len(_rows(tmp_path / "b.jsonl")) == 10, r.stderr
    assert "prompt" in script.seen[0] and "messages" not in script.seen[0]


@pytest.mark.integration
def test_cost_limit_stops_cleanly(tmp_path, seeds):
    with FakeTeacher(Script()) as url:
        r = run_cli(*_generate(seeds, tmp_path / "c.jsonl", url, "--num-instructions", "1000",
                               "--price-completion-per-1m", "100000", "--max-cost-usd", "10"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "c.summary.json").read_text())
    assert summary["stop_reason"].startswith("cost limit reached") and summary["requests"] == 1
    assert len(_rows(tmp_path / "c.jsonl")) == summary["accepted"] > 0


@pytest.mark.integration
def test_teacher_failures_are_clear_errors(tmp_path, seeds):
    with FakeTeacher(Script(always_status=401)) as url:
        assert_user_error(
            run_cli(*_generate(seeds, tmp_path / "x.jsonl", url, "--num-instructions", "5")),
            "HTTP 401",
            "API key",
        )
    with FakeTeacher(Script(garbage=True)) as url:
        r = run_cli(
            *_generate(seeds, tmp_path / "y.jsonl", url, "--num-instructions", "5", "--max-retries", "1")
        )
        assert_user_error(r, "not an OpenAI-compatible chat/completions response", "failed 2 times")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli(
        *_generate(
            seeds,
            tmp_path / "z.jsonl",
            f"http://127.0.0.1:{port}/v1",
            "--num-instructions",
            "5",
            "--max-retries",
            "0",
        )
    )
    assert_user_error(r, "cannot connect")


@pytest.mark.integration
def test_bad_seeds_and_unwritable_output(tmp_path, seeds):
    bad = tmp_path / "bad_seeds.jsonl"
    bad.write_text(
        '{"instruction": "ok", "instances": [{"input": "", "output": "x"}]}\n{"instruction": "", "instances": []}\n'
    )
    r = run_cli(
        "generate",
        "--seeds",
        str(bad),
        "--output",
        str(tmp_path / "o.jsonl"),
        "--num-instructions",
        "5",
        "--engine",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "m",
    )
    assert_user_error(r, f"{bad}:2:")
    (tmp_path / "file").write_text("")
    with FakeTeacher(Script()) as url:
        r = run_cli(*_generate(seeds, tmp_path / "file" / "o.jsonl", url, "--num-instructions", "5"))
    assert_user_error(r, f"{tmp_path / 'file'} is a file, so nothing can be written under it")


@pytest.mark.unit
def test_pool_scores_are_rouge_l():
    texts = ["Give three tips for staying healthy.", "Name the capital of France.", ""]
    pool = Pool(texts)
    query = "Give three tips for staying very healthy."
    assert pool.scores(query).tolist() == [rouge_l(query, t) for t in texts]


@pytest.mark.integration
def test_the_embedded_model_as_teacher(tmp_path, dataset):
    """SmolLM2 writes messy tasks; the parser copes and the run ends on its own."""
    out = tmp_path / "smol.jsonl"
    r = run_cli(
        "generate", "--seeds", str(dataset.seed_file), "--output", str(out),
        "--num-instructions", "5", "--max-requests", "2", "--max-new-tokens", "160",
        env={"HF_HUB_OFFLINE": "1"}, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "smol.summary.json").read_text())
    assert summary["requests"] == 2 and summary["teacher"] == "smollm2-135m-instruct"
    assert summary["completion_tokens"] > 0
    assert (
        summary["accepted"] == len(out.read_text().splitlines()) if out.exists() else summary["accepted"] == 0
    )
    assert os.path.exists(tmp_path / "smol.requests.jsonl")


@pytest.mark.integration
def test_an_output_that_generate_did_not_write_is_refused(tmp_path, seeds):
    foreign = tmp_path / "other.jsonl"
    foreign.write_text('{"text": "something else"}\n')
    with FakeTeacher(Script()) as url:
        r = run_cli(*_generate(seeds, foreign, url, "--num-instructions", "5"))
    assert_user_error(r, f"{foreign}:1: not a line that `alpaca-forge generate` wrote")
    assert foreign.read_text() == '{"text": "something else"}\n'


@pytest.mark.integration
def test_a_teacher_slower_than_the_timeout_fails_clearly(tmp_path, seeds):
    with FakeTeacher(Script(latency_s=3)) as url:
        r = run_cli(
            *_generate(
                seeds,
                tmp_path / "t.jsonl",
                url,
                "--num-instructions",
                "5",
                "--timeout-s",
                "0.5",
                "--max-retries",
                "1",
            )
        )
    assert_user_error(r, "no answer within 0.5 s", "failed 2 times")


@pytest.mark.unit
def test_backoff_doubles_with_jitter_up_to_a_cap_and_honours_retry_after():
    import random as _random

    from alpaca_forge.engines.openai_http import RetryPolicy

    policy, rng = RetryPolicy(base_delay_s=1.0, max_delay_s=10.0), _random.Random(0)
    for attempt, full in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 10.0)]:
        delays = {policy.delay_s(attempt, None, rng) for _ in range(50)}
        assert all(full * 0.5 <= d <= full for d in delays) and len(delays) > 40  # jittered, never in step
    assert policy.delay_s(0, "3", rng) == 3.0 and policy.delay_s(0, "99", rng) == 10.0


# ---------------------------------------------------------------------------------------------
# The cap, the requests as sent, the stop reasons, the Python API


@pytest.mark.integration
def test_a_reply_holds_at_most_16_new_tasks_and_requests_are_sent_as_before(tmp_path, seeds):
    """A teacher that writes 25 tasks is cut at "\\n20" by the server (as a real one honours
    `stop`): 16 tasks per reply. The body is what the original sent: no repetition_penalty."""
    script = Script(tasks_per_reply=25)
    with FakeTeacher(script) as url:
        r = run_cli(
            *_generate(seeds, tmp_path / "g.jsonl", url, "--num-instructions", "100", "--max-requests", "2")
        )
    assert r.returncode == 0, r.stderr
    assert all(text.count(". Output:") == 25 for text in script.raw_texts)
    logged = _rows(tmp_path / "g.requests.jsonl")
    assert [row["parsed"] for row in logged] == [MAX_TASKS_PER_REPLY] * 2 == [16, 16]
    body = script.seen[0]
    assert body.keys() == {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "messages"}
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (3072, 1.0, 1.0)
    assert body["stop"] == ["\n20", "20.", "20 ."]
    assert sorted(b["seed"] for b in script.seen) == [0, 1]  # --seed 0: request k samples with seed k


@pytest.mark.integration
def test_a_teacher_that_yields_nothing_stops_the_run_with_status_1(tmp_path, seeds):
    with FakeTeacher(Script(no_tasks=True)) as url:
        r = run_cli(
            *_generate(
                seeds, tmp_path / "b.jsonl", url, "--num-instructions", "5", "--max-barren-requests", "3"
            )
        )
    assert r.returncode == 1, r.stderr
    summary = json.loads((tmp_path / "b.summary.json").read_text())
    assert summary["stopped_by"] == "barren" and summary["requests"] == 3 and summary["accepted"] == 0
    assert summary["stop_reason"] == "the last 3 requests gave no acceptable record"
    assert "Traceback" not in r.stderr


@pytest.mark.integration
def test_run_from_python_returns_a_typed_result_with_per_request_retries(tmp_path, seeds):
    from alpaca_forge.engines.openai_http import OpenAIEngine, RetryPolicy

    with FakeTeacher(Script(fail_first=2)) as url:
        engine = OpenAIEngine(url, "fake", retry=RetryPolicy(max_retries=3, base_delay_s=0.01))
        config = GenerateConfig(
            seeds=str(seeds), output=str(tmp_path / "p.jsonl"), num_instructions=40, max_requests=2,
            engine=EngineConfig(engine="openai", base_url=url, model="fake"),
        )  # fmt: skip
        result = run(config, progress=False, engine=engine)
        engine.close()
    assert (
        isinstance(result, GenerateResult)
        and result.stop is StopReason.REQUEST_LIMIT
        and result.stop.as_asked
    )
    assert (result.requests, result.retries, result.accepted) == (2, 2, 32)
    assert [row["retries"] for row in _rows(tmp_path / "p.requests.jsonl")] == [2, 0]
    assert json.loads(result.summary_path.read_text()) == result.to_dict()
    assert result.to_dict()["stop_reason"] == "request limit reached (2)"


@pytest.mark.integration
@pytest.mark.parametrize("case", ["folder", "under_a_file", "the_seeds", "missing_folder", "name_too_long"])
def test_outputs_are_checked_before_any_request(tmp_path, seeds, case):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder").mkdir()
    out = {
        "folder": tmp_path / "a_folder",
        "under_a_file": tmp_path / "a_file" / "g.jsonl",
        "the_seeds": seeds,
        "missing_folder": tmp_path / "new" / "deeper" / "g.jsonl",
        "name_too_long": tmp_path / ("x" * 300 + ".jsonl"),
    }[case]
    script = Script()
    with FakeTeacher(script) as url:
        r = run_cli(*_generate(seeds, out, url, "--num-instructions", "3"))
    if case == "missing_folder":
        assert r.returncode == 0 and len(_rows(out)) == 3, r.stderr
        return
    assert_user_error(
        r, *([str(out), "File name too long"] if case == "name_too_long" else [f"--output {out}"])
    )
    assert script.seen == [], "no request before the outputs are checked"


@pytest.mark.integration
def test_every_numeric_flag_is_range_checked_all_at_once(tmp_path, seeds):
    bad = {
        "--num-instructions": "0", "--seed": "-1", "--concurrency": "0", "--repetition-penalty": "0",
        "--price-prompt-per-1m": "-1", "--price-completion-per-1m": "-0.5", "--max-cost-usd": "0",
        "--max-requests": "0", "--max-barren-requests": "0", "--min-words": "0", "--max-words": "0",
        "--rouge-threshold": "2", "--timeout-s": "0", "--max-retries": "-1", "--max-new-tokens": "0",
        "--temperature": "-1", "--top-p": "0",
    }  # fmt: skip
    r = run_cli(
        "generate",
        "--seeds",
        str(seeds),
        "--output",
        str(tmp_path / "o.jsonl"),
        *(x for kv in bad.items() for x in kv),
    )
    assert_user_error(r, *(f"{flag}: must be" for flag in bad), f"{len(bad)} problems")
    assert not (tmp_path / "o.jsonl").exists()
    r = run_cli("generate", "--seeds", str(seeds), "--output", str(tmp_path / "o.jsonl"), "--num-instructions", "3",
                "--min-words", "10", "--max-words", "5")  # fmt: skip
    assert_user_error(r, "--max-words: is 5, below --min-words 10")


@pytest.mark.integration
def test_settings_from_a_yaml_file_with_nested_sections(tmp_path, seeds):
    script = Script()
    with FakeTeacher(script) as url:
        config = tmp_path / "gen.yaml"
        config.write_text(
            f"# alpaca-forge generate --config gen.yaml\n"
            f"seeds: {seeds}\noutput: {tmp_path / 'y.jsonl'}\nnum_instructions: 20\n"
            f"engine:\n  engine: openai\n  base_url: {url}\n  model: fake\n"
            f"filters:\n  min_words: 3\n  blacklist: [image, video]\n"
            f"max_new_tokens: 512\n"
        )
        r = run_cli("generate", "--config", str(config), "--concurrency", "2")
    assert r.returncode == 0, r.stderr
    assert len(_rows(tmp_path / "y.jsonl")) == 20
    assert script.seen[0]["max_tokens"] == 512 and script.seen[0]["model"] == "fake"
    config.write_text(
        f"seeds: {seeds}\noutput: o.jsonl\nnum_instructions: 0\nfilters:\n  rouge_threshold: 3\n"
    )
    assert_user_error(
        run_cli("generate", "--config", str(config)), f"{config}:3:", f"{config}:5:", "2 problems"
    )


@pytest.mark.integration
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_an_in_process_teacher(tmp_path, seeds, tiny_model_dir, api):
    """The tiny random model writes nonsense; the run still ends where it was told, accounted."""
    out = tmp_path / "t.jsonl"
    r = run_cli(
        "generate", "--seeds", str(seeds), "--output", str(out), "--num-instructions", "3",
        "--model", str(tiny_model_dir), "--device", "cpu", "--teacher-api", api,
        "--max-requests", "2", "--max-new-tokens", "24",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "t.summary.json").read_text())
    assert summary["requests"] == 2 and summary["stopped_by"] in ("request_limit", "done")
    assert tiny_model_dir.name in summary["teacher"]
    logged = _rows(tmp_path / "t.requests.jsonl")
    assert [row["request"] for row in logged] == [0, 1]
    assert all(0 < row["completion_tokens"] <= 24 and row["prompt_tokens"] > 100 for row in logged)


@pytest.mark.integration
def test_with_no_engine_named_a_gguf_teacher_runs_in_llama_cpp_or_says_why_not(
    tmp_path, seeds, tiny_gguf, monkeypatch
):
    """The summary records the settings used: the in-process defaults, in llama.cpp when it is
    installed; without it, transformers, and one line on stderr that says how to install it."""
    pytest.importorskip("llama_cpp")

    def generate(name, *extra):
        args = ["--num-instructions", "3", "--max-requests", "1", "--model", str(tiny_gguf), *extra]
        r = run_cli("generate", "--seeds", str(seeds), "--output", str(tmp_path / f"{name}.jsonl"), *args)
        assert r.returncode == 0, r.stderr
        return json.loads((tmp_path / f"{name}.summary.json").read_text())["teacher_settings"], r.stderr

    in_process = {"api": "completions", "max_new_tokens": 768, "temperature": 0.7, "top_p": 1.0,
                  "repetition_penalty": 1.1}  # fmt: skip
    settings, stderr = generate("llama")
    assert settings == {"engine": "llamacpp", **in_process} and "llama-cpp-python" not in stderr
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if it were not installed
    short = ("--max-new-tokens", "16", "--device", "cpu")  # transformers: a short reply keeps it quick
    settings, stderr = generate("fallback", "--temperature", "0.3", *short)
    assert settings == {"engine": "transformers", **in_process, "max_new_tokens": 16, "temperature": 0.3}
    notes = [line for line in stderr.splitlines() if "llama-cpp-python is not installed" in line]
    assert len(notes) == 1 and "make llamacpp" in notes[0], stderr
    _, stderr = generate("named", "--engine", "transformers", *short)
    assert "llama-cpp-python" not in stderr
