"""The batch teacher (`--engine openai --batch-dir DIR`): requests written in the OpenAI Batch API's
format, a provider played by the test (it reads DIR/requests*.jsonl and writes a results file as
OpenAI's batch output and vLLM's `run_batch` do), the same command rerun to pick the results up.
Failed result lines come back as new requests; a results file of other requests is refused."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from alpaca_forge.core.errors import UserError
from alpaca_forge.core.prompts import Message
from alpaca_forge.engines import GenerationSettings
from alpaca_forge.engines.batch import EXIT_WAITING, BatchEngine, BatchPending, request_id
from alpaca_forge.engines.config import EngineConfig

from conftest import assert_user_error, run_cli

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


# ---------------------------------------------------------------------------------------------
# The provider, played here


def check_request_line(line: dict) -> None:
    """A request line as the Batch API takes it; its body checked against the `openai` SDK's own
    request types where the SDK is installed."""
    assert set(line) == {"custom_id", "method", "url", "body"} and line["method"] == "POST"
    assert line["url"] in (CHAT, COMPLETIONS) and line["custom_id"] == request_id(line["url"], line["body"])
    body = line["body"]
    assert body["model"] and isinstance(body["seed"], int)
    try:
        import pydantic
        from openai.types import batch_create_params, completion_create_params
        from openai.types.chat import completion_create_params as chat_params
    except ImportError:
        return
    endpoints = batch_create_params.BatchCreateParams.__annotations__["endpoint"]
    assert line["url"] in str(endpoints)
    kind = chat_params if line["url"] == CHAT else completion_create_params
    params = kind.CompletionCreateParamsNonStreaming
    known = set().union(*(getattr(c, "__annotations__", {}) for c in params.__mro__))
    assert set(body) <= known, set(body) - known
    if params not in _ADAPTERS:  # built once: building one takes ~0.1 s
        _ADAPTERS[params] = pydantic.TypeAdapter(params)
    _ADAPTERS[params].validate_python(body)


_ADAPTERS: dict = {}


def play_provider(
    folder: Path,
    answer: Callable[[dict], str],
    *,
    fail: Callable[[dict], bool] = lambda body: False,
    name: str = "results.jsonl",
) -> int:
    """Answer every request in `folder`'s requests files that has no result yet, into
    `folder/results/NAME`; `fail` picks the requests that come back failed. Returns how many."""
    done = set()
    for path in (folder / "results").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["error"] is None and row["response"]["status_code"] == 200:
                done.add(row["custom_id"])
    out = []
    for path in sorted(folder.glob("requests*.jsonl")):
        for text in path.read_text().splitlines():
            line = json.loads(text)
            check_request_line(line)
            if line["custom_id"] in done:
                continue
            done.add(line["custom_id"])
            body = line["body"]
            if fail(body):
                out.append(
                    {"id": f"batch_req_{len(out)}", "custom_id": line["custom_id"], "response": None,
                     "error": {"code": "server_error", "message": "the model crashed"}}
                )  # fmt: skip
                continue
            text = answer(body)
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if line["url"] == CHAT
                else {"index": 0, "text": text, "finish_reason": "stop"}
            )
            result = {
                "id": "chatcmpl-1", "object": "chat.completion" if line["url"] == CHAT else "text_completion",
                "created": 0, "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
            }  # fmt: skip
            out.append(
                {"id": f"batch_req_{len(out)}", "custom_id": line["custom_id"],
                 "response": {"status_code": 200, "request_id": "r", "body": result}, "error": None}
            )  # fmt: skip
    (folder / "results").mkdir(exist_ok=True)
    with open(folder / "results" / name, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    return len(out)


def request_lines(folder: Path, name: str = "requests.jsonl") -> list[dict]:
    path = folder / name
    return [json.loads(t) for t in path.read_text().splitlines()] if path.exists() else []


def prompt_of(body: dict) -> str:
    return body["messages"][-1]["content"] if "messages" in body else body["prompt"]


# ---------------------------------------------------------------------------------------------
# The engine alone


@pytest.mark.unit
def test_requests_are_written_once_answered_from_results_and_failures_requeued(tmp_path):
    folder = tmp_path / "batch"
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0, seed=3, stop=("###",))
    chats = [[Message("user", f"question {k}")] for k in range(3)]

    engine = BatchEngine(folder, "m")
    with pytest.raises(BatchPending, match="3 of 3 requests wait"):
        engine.chat(chats, settings)
    with pytest.raises(BatchPending):  # asked again in the same run: not written twice
        engine.chat(chats[:1], settings)
    waiting = engine.pending_error()
    engine.close()
    assert waiting is not None and waiting.exit_status == EXIT_WAITING
    assert "3 requests wait for batch results (3 in " in waiting.message and "run_batch" in waiting.fix
    lines = request_lines(folder)
    assert len(lines) == 3 and len({line["custom_id"] for line in lines}) == 3
    assert lines[0]["body"]["seed"] == 3 and lines[0]["body"]["stop"] == ["###"]
    assert lines[0]["body"]["messages"] == [{"role": "user", "content": "question 0"}]

    # A rerun before any result writes nothing new and still says where the requests wait.
    engine = BatchEngine(folder, "m")
    with pytest.raises(BatchPending):
        engine.chat(chats, settings)
    assert str(folder / "requests.jsonl") in engine.pending_error().message
    engine.close()
    assert len(request_lines(folder)) == 3 and not (folder / "requests-2.jsonl").exists()

    # Results: question 1 failed; the others are answered (stop strings cut, usage counted).
    play_provider(folder, lambda b: prompt_of(b) + " answered ### extra", fail=lambda b: "1" in prompt_of(b))
    engine = BatchEngine(folder, "m")
    (got,) = engine.chat(chats[:1], settings)
    assert (got.text, got.prompt_tokens, got.completion_tokens) == ("question 0 answered", 100, 10)
    with pytest.raises(BatchPending):
        engine.chat(chats, settings)
    waiting = engine.pending_error()
    engine.close()
    assert "1 requests wait" in waiting.message and "1 re-queued after 1 failed results" in waiting.message
    assert "the model crashed" in waiting.message
    requeued = request_lines(folder, "requests-2.jsonl")  # never appended to a file already handed over
    assert [prompt_of(line["body"]) for line in requeued] == ["question 1"]

    play_provider(folder, lambda b: "late answer", name="second.jsonl")
    engine = BatchEngine(folder, "m")
    assert [c.text for c in engine.chat(chats, settings)][1] == "late answer"
    assert engine.pending_error() is None
    engine.close()


@pytest.mark.unit
def test_completions_go_to_their_own_file_and_streaming_is_refused(tmp_path):
    engine = BatchEngine(tmp_path, "m")
    settings = GenerationSettings(max_new_tokens=4)
    with pytest.raises(BatchPending):
        engine.complete(["once upon"], settings)
    with pytest.raises(BatchPending):
        engine.chat([[Message("user", "hi")]], settings)
    with pytest.raises(UserError, match="cannot stream"):
        engine.stream([Message("user", "hi")], settings)
    engine.close()
    assert [line["url"] for line in request_lines(tmp_path, "requests.completions.jsonl")] == [COMPLETIONS]
    assert [line["url"] for line in request_lines(tmp_path)] == [CHAT]
    play_provider(tmp_path, lambda b: " a time")
    engine = BatchEngine(tmp_path, "m")
    assert engine.complete(["once upon"], settings)[0].text == "a time"
    engine.close()


@pytest.mark.unit
def test_a_results_file_of_other_requests_is_refused_naming_its_line(tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    for folder, text in ((mine, "mine"), (other, "other")):
        engine = BatchEngine(folder, "m")
        with pytest.raises(BatchPending):
            engine.chat([[Message("user", text)]], GenerationSettings())
        engine.close()
    play_provider(other, lambda b: "x")
    (mine / "results").mkdir()
    (mine / "results" / "out.jsonl").write_text((other / "results" / "results.jsonl").read_text())
    with pytest.raises(UserError) as e:
        BatchEngine(mine, "m")
    assert f"{mine / 'results' / 'out.jsonl'}:1: field 'custom_id'" in str(e.value)
    assert "does not belong to these requests" in str(e.value) and "move out.jsonl out of" in str(e.value)
    (mine / "results" / "out.jsonl").write_text('{"custom_id": "af-1", "response"\n')
    with pytest.raises(UserError, match=r"out.jsonl:1: not JSON"):
        BatchEngine(mine, "m")


@pytest.mark.unit
def test_the_settings_are_checked():
    with pytest.raises(UserError, match="--batch-dir is for --engine openai"):
        EngineConfig(engine="transformers", batch_dir="b")
    assert EngineConfig(engine="openai", model="m", batch_dir="b").base_url is None  # none needed
    with pytest.raises(UserError, match="--batch-discount"):
        EngineConfig(engine="openai", model="m", batch_dir="b", batch_discount=1.5)


# ---------------------------------------------------------------------------------------------
# Stages, through the command line


def judge_reply(body: dict) -> str:
    """Prefers the answer with "good" in it, whichever slot it is shown in."""
    m = re.search(r"### Response A:\n(.*?)\n\n### Response B:\n(.*?)\n\nQuestion:", prompt_of(body), re.S)
    assert m, prompt_of(body)[:200]
    return "A\nIt is better." if "good" in m.group(1) else "B\nIt is better."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.integration
def test_eval_pairwise_round_trip_with_a_failed_line(tmp_path):
    n = 4
    write_jsonl(tmp_path / "set.jsonl", [{"id": f"t{k}", "instruction": f"Task {k}."} for k in range(n)])
    write_jsonl(tmp_path / "x.jsonl", [{"id": f"t{k}", "instruction": f"Task {k}.", "output": f"good {k}"} for k in range(n)])
    write_jsonl(tmp_path / "y.jsonl", [{"id": f"t{k}", "instruction": f"Task {k}.", "output": f"bad {k}"} for k in range(n)])
    folder = tmp_path / "batch"
    args = [
        "eval", "pairwise", "--set", str(tmp_path / "set.jsonl"), "--a", str(tmp_path / "x.jsonl"),
        "--b", str(tmp_path / "y.jsonl"), "--output", str(tmp_path / "out"), "--judge-engine", "openai",
        "--judge-model", "gpt-4o-mini", "--judge-batch-dir", str(folder), "--bootstrap-samples", "200",
    ]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == EXIT_WAITING, first.stderr
    assert f"{2 * n} requests wait for batch results" in first.stderr and "then rerun this same command" in first.stderr
    assert "Traceback" not in first.stderr and len(request_lines(folder)) == 2 * n

    play_provider(folder, judge_reply, fail=lambda b: "Task 0." in prompt_of(b) and "good 0\n\n### Response B" in prompt_of(b))
    second = run_cli(*args)
    assert second.returncode == EXIT_WAITING and "1 requests wait" in second.stderr, second.stderr
    assert "re-queued after 1 failed results" in second.stderr and len(request_lines(folder, "requests-2.jsonl")) == 1

    play_provider(folder, judge_reply, name="again.jsonl")
    third = run_cli(*args)
    assert third.returncode == 0, third.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["wins"], report["losses"]) == (n, 0)


@pytest.mark.integration
def test_a_foreign_results_file_stops_eval_naming_file_and_line(tmp_path):
    write_jsonl(tmp_path / "set.jsonl", [{"id": "t0", "instruction": "Task 0."}])
    for name in ("x", "y"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"id": "t0", "instruction": "Task 0.", "output": name}])
    folder = tmp_path / "batch"
    (folder / "results").mkdir(parents=True)
    (folder / "results" / "stray.jsonl").write_text(
        json.dumps({"id": "b", "custom_id": "request-7", "response": {"status_code": 200, "body": {}}, "error": None}) + "\n"
    )
    result = run_cli(
        "eval", "pairwise", "--set", str(tmp_path / "set.jsonl"), "--a", str(tmp_path / "x.jsonl"),
        "--b", str(tmp_path / "y.jsonl"), "--output", str(tmp_path / "out"), "--judge-engine", "openai",
        "--judge-model", "m", "--judge-batch-dir", str(folder),
    )  # fmt: skip
    assert_user_error(result, "stray.jsonl:1: field 'custom_id' 'request-7'", "does not belong")


@pytest.mark.integration
def test_prefer_answers_and_judge_by_batch(tmp_path):
    items = write_jsonl(tmp_path / "items.jsonl", [{"instruction": f"Name a colour ({k})."} for k in range(2)])
    out = tmp_path / "pairs.jsonl"
    answers, judge = tmp_path / "answers", tmp_path / "judge"
    args = [
        "prefer", "--engine", "openai", "--model", "policy", "--batch-dir", str(answers),
        "--input", str(items), "--output", str(out), "--samples", "2", "--max-new-tokens", "16",
        "--judge-engine", "openai", "--judge-model", "judge", "--judge-batch-dir", str(judge),
    ]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == EXIT_WAITING and "4 requests wait" in first.stderr, first.stderr
    seeds = {line["body"]["seed"] for line in request_lines(answers)}
    assert len(seeds) == 4  # each answer its own seed, as the live engine would send
    play_provider(answers, lambda b: f"{'good' if b['seed'] % 2 else 'plain'} colour {b['seed']}")
    second = run_cli(*args)
    assert second.returncode == EXIT_WAITING, second.stderr
    assert not (answers / "requests-2.jsonl").exists() and request_lines(judge)
    play_provider(judge, judge_reply)
    third = run_cli(*args)
    assert third.returncode == 0, third.stderr
    assert out.exists()


@pytest.mark.integration
def test_generate_writes_max_requests_as_one_batch_then_takes_the_results(tmp_path):
    from fake_teacher import tasks_text

    seeds = write_jsonl(
        tmp_path / "seeds.jsonl",
        [{"instruction": f"Explain the idea number {w} in simple words.", "input": "", "output": f"Idea {w}."}
         for w in "abcdefgh"],
    )  # fmt: skip
    out, folder = tmp_path / "gen.jsonl", tmp_path / "batch"
    args = [
        "generate", "--seeds", str(seeds), "--output", str(out), "--engine", "openai", "--model", "gpt-4o-mini",
        "--batch-dir", str(folder), "--num-instructions", "20", "--concurrency", "4",
        "--price-prompt-per-1m", "2", "--price-completion-per-1m", "8",
    ]  # fmt: skip
    assert_user_error(run_cli(*args), "needs --max-requests")
    first = run_cli(*args, "--max-requests", "5")
    assert first.returncode == EXIT_WAITING, first.stderr
    assert "5 requests wait for batch results" in first.stderr and "Traceback" not in first.stderr
    lines = request_lines(folder)
    assert len({line["body"]["seed"] for line in lines}) == 5 and not (out.exists() and out.read_text())
    waited = json.loads((tmp_path / "gen.summary.json").read_text())
    assert (waited["stopped_by"], waited["stop_reason"]) == ("batch_waiting", "5 requests wait for their batch results")

    def teacher(body: dict) -> str:  # a continuation of the prompt's numbered list, as a model writes it
        first_number = int(re.search(r"(\d+)\. Instruction:\s*$", prompt_of(body)).group(1))
        return tasks_text(first_number, random.Random(body["seed"]), count=8)

    play_provider(folder, teacher)
    second = run_cli(*args, "--max-requests", "5")
    assert second.returncode == 0, second.stderr
    rows = [json.loads(t) for t in out.read_text().splitlines()]
    summary = json.loads((tmp_path / "gen.summary.json").read_text())
    assert len(rows) == 20 == summary["accepted"] and summary["teacher_settings"]["price_factor"] == 0.5
    n = summary["requests"]
    assert 3 <= n <= 5 and summary["cost_usd"] == pytest.approx((n * 100 * 2 + n * 10 * 8) / 1e6 * 0.5)
    assert len(request_lines(folder)) == 5 and not (folder / "requests-2.jsonl").exists()


@pytest.mark.integration
def test_data_score_rates_by_batch(tmp_path):
    data = write_jsonl(
        tmp_path / "data.jsonl",
        [{"instruction": f"Add {k} and {k}.", "input": "", "output": f"{2 * k}" if k % 2 else "no idea"}
         for k in range(4)],
    )  # fmt: skip
    out, folder = tmp_path / "scored.jsonl", tmp_path / "batch"
    args = [
        "data", "score", str(data), "--output", str(out), "--judge-engine", "openai",
        "--judge-model", "gpt-4o", "--judge-batch-dir", str(folder),
    ]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == EXIT_WAITING and "4 requests wait" in first.stderr, first.stderr
    assert not out.exists()

    def rater(body: dict) -> str:
        good = "no idea" not in prompt_of(body)
        return f"Accuracy: {5 if good else 1}\nHelpfulness: {4 if good else 1}\nThe sum is right." if good else (
            "Accuracy: 1\nHelpfulness: 1\nIt does not answer."
        )

    play_provider(folder, rater)
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    scores = [json.loads(t)["score"] for t in out.read_text().splitlines()]
    assert [s["overall"] for s in scores] == [1.0, 4.5, 1.0, 4.5]



@pytest.mark.integration
def test_generate_evol_goes_round_by_round_through_the_batch(tmp_path):
    from fake_evol_teacher import EvolScript, handle

    seeds = write_jsonl(
        tmp_path / "seeds.jsonl",
        [{"instruction": f"Explain why the sky of planet {w} looks blue at noon.", "input": "", "output": "x"}
         for w in "abc"],
    )  # fmt: skip
    out, folder = tmp_path / "evol.jsonl", tmp_path / "batch"
    args = [
        "generate", "--method", "evol", "--seeds", str(seeds), "--output", str(out), "--engine", "openai",
        "--model", "gpt-4o-mini", "--batch-dir", str(folder), "--evol-rounds", "2", "--num-instructions", "100",
    ]  # fmt: skip
    trips = 0
    while (result := run_cli(*args)).returncode == EXIT_WAITING:
        assert "requests wait for batch results" in result.stderr
        trips += 1
        assert trips <= 6, result.stderr
        play_provider(folder, lambda body: handle(EvolScript(), body, 1)[1])
    assert result.returncode == 0, result.stderr
    rows = [json.loads(t) for t in out.read_text().splitlines()]
    assert rows and {row["evol"]["round"] for row in rows} >= {1, 2} and trips >= 2
    written = [line["custom_id"] for path in folder.glob("requests*.jsonl") for line in request_lines(folder, path.name)]
    assert len(written) == len(set(written))  # nothing asked twice, over all the round trips


@pytest.mark.integration
def test_generate_magpie_queries_then_answers_by_batch(tmp_path):
    from conftest import TINY_CHAT_TEMPLATE
    from fake_teacher import invented_word

    (tmp_path / "chat.jinja").write_text(TINY_CHAT_TEMPLATE)
    out, folder = tmp_path / "magpie.jsonl", tmp_path / "batch"
    args = [
        "generate", "--method", "magpie", "--output", str(out), "--engine", "openai", "--model", "m",
        "--magpie-template", str(tmp_path / "chat.jinja"), "--batch-dir", str(folder),
        "--num-instructions", "3", "--max-requests", "3",
    ]  # fmt: skip

    def model(body: dict) -> str:  # a query after the template's user prefix, or an answer to one
        rng = random.Random(body["seed"])
        words = " ".join(invented_word(rng) for _ in range(5))
        if "prompt" in body:
            assert body["prompt"].endswith("<|user|>\n")
            return f"How does the {words} work, and why does it matter?\n<|assistant|>\nIt"
        return f"Here is an answer about {words}: " + " ".join(invented_word(rng) for _ in range(20)) + "."

    first = run_cli(*args)
    assert first.returncode == EXIT_WAITING and "3 requests wait" in first.stderr, first.stderr
    assert [line["url"] for line in request_lines(folder, "requests.completions.jsonl")] == [COMPLETIONS] * 3
    play_provider(folder, model)
    second = run_cli(*args)  # the queries are in: their answers are asked, in a file of their own
    assert second.returncode == EXIT_WAITING and "3 answered from" in second.stderr, second.stderr
    assert [line["url"] for line in request_lines(folder, "requests-2.jsonl")] == [CHAT] * 3
    play_provider(folder, model)
    third = run_cli(*args)
    assert third.returncode == 0, third.stderr
    rows = [json.loads(t) for t in out.read_text().splitlines()]
    assert len(rows) == 3 and all(row["output"].startswith("Here is an answer about") for row in rows)


@pytest.mark.unit
def test_a_request_that_keeps_failing_stops_the_run_naming_the_error(tmp_path):
    from alpaca_forge.engines.batch import MAX_FAILED_RESULTS

    chat = [[Message("user", "refused every time")]]
    for k in range(MAX_FAILED_RESULTS):
        engine = BatchEngine(tmp_path, "m")
        with pytest.raises(BatchPending):
            engine.chat(chat, GenerationSettings())
        engine.close()
        play_provider(tmp_path, lambda b: "", fail=lambda b: True, name=f"r{k}.jsonl")
    assert len(list(tmp_path.glob("requests*.jsonl"))) == MAX_FAILED_RESULTS  # each failure re-queued once
    with pytest.raises(UserError, match=f"failed in {MAX_FAILED_RESULTS} batch results.*the model crashed"):
        BatchEngine(tmp_path, "m").chat(chat, GenerationSettings())


@pytest.mark.unit
def test_serve_refuses_a_batch_engine_before_it_starts():
    from alpaca_forge.core.errors import ValidationError
    from alpaca_forge.engines import EngineConfig
    from alpaca_forge.serve.config import ServeConfig

    with pytest.raises(ValidationError) as e:
        ServeConfig(engine=EngineConfig(engine="openai", model="m", batch_dir="batch"))
    assert "answers requests hours later" in str(e.value) and "drop --batch-dir" in str(e.value)
