"""`generate --method magpie`: the pre-query template of real chat templates, the query and answer
filters, then the real CLI against a scripted completions + chat server on loopback (rows, several
turns, another answerer, the refusals, the cost cap, kill -9 and resume), and one run of the
embedded SmolLM2 on llama.cpp."""

import json
import signal
import subprocess
import time
from collections import Counter

import pytest

from alpaca_forge.core.errors import UserError
from alpaca_forge.core.prompts import ChatFormat, Message, UserAssistantFormat
from alpaca_forge.core.records import read_records
from alpaca_forge.generate import FilterConfig
from alpaca_forge.generate.magpie_steps import (
    DROPS,
    answer_problem,
    cut_query,
    is_repetitive,
    magpie_row,
    pre_query,
    query_problem,
)
from alpaca_forge.generate.magpie_template import read_template
from alpaca_forge.generate.steps import blacklist_pattern
from fake_magpie import LENGTH, FakeMagpieServer, MagpieScript
from llama_server import NEEDS_SERVER, llama_server

from conftest import CLI, TINY_CHAT_TEMPLATE, assert_user_error, build_tiny_tokenizer, run_cli

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
FILTERS = FilterConfig()


def _smollm2_template():
    """SmolLM2's chat template, as its GGUF (the embedded model) carries it."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from alpaca_forge.engines.llamacpp import gguf_path, template_tokenizer

    try:
        path = gguf_path("smollm2-135m-instruct")
    except UserError as e:
        pytest.skip(f"the embedded model is not installed: {e.message}")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return template_tokenizer(llm)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def smollm2_jinja(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "smollm2.jinja"
    path.write_text(_smollm2_template().chat_template, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# pure steps


@pytest.mark.unit
def test_pre_query_of_the_tiny_tokenizers_template_and_after_a_conversation():
    tokenizer, fmt = build_tiny_tokenizer(), ChatFormat()
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    first = pre_query(lambda m: fmt.render(m, tokenizer))
    assert first.text == "<|user|>\n"
    assert first.stops == ("<|assistant|>", "<|user|>")
    later = pre_query(
        lambda m: fmt.render(m, tokenizer), [Message("user", "Name a colour."), Message("assistant", "Blue.")]
    )
    assert later.text == "<|user|>\nName a colour.\n<|assistant|>\nBlue.\n<|user|>\n"


@pytest.mark.unit
def test_pre_query_of_smollm2_has_its_default_system_part_and_stops_at_im_end():
    tokenizer = _smollm2_template()
    place = pre_query(lambda m: ChatFormat().render(m, tokenizer))
    assert place.text == f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    assert place.stops[0] == "<|im_end|>" and "<|im_start|>user" in place.stops
    own = pre_query(lambda m: ChatFormat("Answer in French.").render(m, tokenizer))
    assert own.text == "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\n"
    # the written query is cut where the template ends the user's turn
    assert cut_query("  What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4", place.stops) == "What is 2 + 2?"


@pytest.mark.unit
def test_a_template_with_nothing_before_the_users_words_is_refused():
    with pytest.raises(UserError, match="writes nothing before a user's words"):
        pre_query(lambda m: m[-1].content + "\n### Response:")
    with pytest.raises(UserError, match="cannot find where a user's words go"):
        pre_query(lambda m: "<|user|>\nsomething else")
    assert pre_query(lambda m: UserAssistantFormat().render(m)).text == "<|user|>\n"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("query", "cut_short", "reason"),
    [
        ("", False, "query_empty"),
        ("How do tides form?", True, "query_cut"),
        ("How do tides form?<|im_start|>assistant", False, "query_markup"),
        ("Sure! Here is a question for you.", False, "query_not_a_request"),
        ("Hello, how are you today?", False, "query_not_a_request"),
        ("{} [] 1234 5678 %%% ### @@@ !!", False, "query_garbage"),
        ("tell me more " * 6, False, "query_repetitive"),
        ("Why?", False, "query_too_short"),
        ("Explain " + " ".join(f"topic{i} and" for i in range(80)), False, "query_too_long"),
        ("Draw a map of the old town.", False, "query_blacklisted"),
        ("How do tides form on the coast?", False, None),
    ],
)
def test_query_filters(query, cut_short, reason):
    assert query_problem(query, cut_short, FILTERS, blacklist_pattern(FILTERS.blacklist)) == reason
    assert reason is None or reason in DROPS


@pytest.mark.unit
def test_answer_filters_and_rows():
    assert answer_problem("  ", False, 2) == "answer_empty"
    assert answer_problem("Tides come from the moon", True, 2) == "answer_cut"
    assert answer_problem("Yes.", False, 2) == "answer_too_short"
    assert answer_problem("Yes it is.<|im_end|>", False, 2) == "answer_markup"
    assert answer_problem("I'm sorry for any misunderstanding, but I cannot browse.", False, 2) == "answer_refusal"
    assert answer_problem("As an AI, I have no opinion on pizza.", False, 2) == "answer_refusal"
    assert answer_problem("The moon pulls the sea. I'm sorry it is wet.", False, 2) is None
    assert is_repetitive("a b c " * 5) and not is_repetitive("one two three four five six seven eight nine ten eleven twelve")
    meta = {"request": 3}
    assert magpie_row([("Q?", "A.")], meta) == {"instruction": "Q?", "input": "", "output": "A.", "magpie": meta}
    assert magpie_row([("Q?", "A."), ("Q2?", "A2.")], meta)["messages"] == [
        {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."},
        {"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A2."},
    ]  # fmt: skip


@pytest.mark.unit
def test_a_servers_template_from_a_jinja_file_or_a_model_folder(tmp_path):
    (tmp_path / "t.jinja").write_text(TINY_CHAT_TEMPLATE)
    assert pre_query(lambda m: ChatFormat().render(m, read_template(tmp_path / "t.jinja"))).text == "<|user|>\n"
    folder = tmp_path / "model"
    folder.mkdir()
    config = {"chat_template": "{{ bos_token }}" + TINY_CHAT_TEMPLATE, "bos_token": "<s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert pre_query(lambda m: ChatFormat().render(m, read_template(folder))).text == "<s><|user|>\n"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no chat template"):
        read_template(tmp_path / "empty")


@pytest.mark.unit
def test_answerer_settings_without_an_answer_engine_are_refused():
    from alpaca_forge import ValidationError
    from alpaca_forge.core.config import build_config
    from alpaca_forge.generate import GenerateConfig

    base = {"output": "o.jsonl", "num_instructions": 2, "method": "magpie"}
    with pytest.raises(ValidationError, match="--magpie-answer-model given with no --magpie-answer-engine"):
        build_config(GenerateConfig, {**base, "magpie_answer_model": "other"})
    config = build_config(GenerateConfig, {**base, "magpie_answer_engine": "openai",
                                           "magpie_answer_base_url": "http://127.0.0.1:9/v1",
                                           "magpie_answer_model": "m"})  # fmt: skip
    assert config.magpie.answer.engine == "openai" and config.magpie.turns == 1


# ---------------------------------------------------------------------------------------------
# the CLI against a scripted server


def _magpie(out, url, jinja, *extra):
    """The command for a run against the scripted server (`jinja` None: no --magpie-template)."""
    return [
        "generate", "--method", "magpie", "--output", str(out), "--engine", "openai", "--base-url", url,
        "--model", "fake", "--max-retries", "1", "--timeout-s", "10",
        *(["--magpie-template", str(jinja)] if jinja else []), *extra,
    ]  # fmt: skip


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _summary(out):
    return json.loads(out.with_name(out.name.replace(".jsonl", ".summary.json")).read_text())


@pytest.mark.integration
def test_single_turn_rows_from_raw_completions_answered_by_chat(tmp_path, smollm2_jinja):
    script, out = MagpieScript(), tmp_path / "m.jsonl"
    with FakeMagpieServer(script) as url:
        r = run_cli(*_magpie(out, url, smollm2_jinja, "--num-instructions", "6", "--concurrency", "3"))
    assert r.returncode == 0, r.stderr
    rows = _rows(out)
    assert len(rows) == 6 and len({row["instruction"] for row in rows}) == 6
    assert all(row["input"] == "" and row["output"].startswith("Here is an answer") for row in rows)
    assert sorted(row["magpie"]["request"] for row in rows) == list(range(6))
    queries = [body for path, body in script.seen if path.endswith("/v1/completions")]
    answers = [body for path, body in script.seen if path.endswith("/chat/completions")]
    assert len(queries) == len(answers) == 6
    assert all(b["prompt"] == f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n" for b in queries)
    assert all(b["stop"][0] == "<|im_end|>" and b["max_tokens"] == 96 for b in queries)
    assert {m["content"] for b in answers for m in b["messages"]} == {row["instruction"] for row in rows}
    summary = _summary(out)
    assert summary["method"] == "magpie" and summary["requests"] == 6 and summary["accepted_per_request"] == 1.0
    assert summary["details"]["engine_calls"] == 12
    assert [r.instruction for r in read_records(out)] == [row["instruction"] for row in rows]


@pytest.mark.integration
def test_every_drop_is_counted_by_its_reason(tmp_path, smollm2_jinja):
    good = "How do tides form on the coast?"
    queries = [
        good, "", "Sure! I can help with that.", good, "Why?", f"How do rivers {LENGTH}",
        "How does rain form over the sea?", "Which birds migrate furthest each year?",
    ]  # fmt: skip
    answers = ["The moon pulls the sea.", "x", "x", "The sea rises twice a day.", "x", "x", "", f"Birds such as {LENGTH}"]
    out = tmp_path / "d.jsonl"
    with FakeMagpieServer(MagpieScript(queries=queries, answers=answers)) as url:
        r = run_cli(*_magpie(out, url, smollm2_jinja, "--num-instructions", "5", "--max-requests", "8"))
    assert r.returncode == 0, r.stderr
    assert [row["instruction"] for row in _rows(out)] == [good]
    summary = _summary(out)
    assert summary["dropped"] == {
        "query_empty": 1, "query_not_a_request": 1, "query_similar": 1, "query_too_short": 1,
        "query_cut": 1, "answer_empty": 1, "answer_cut": 1,
    }  # fmt: skip
    assert summary["requests"] == 8 and summary["stopped_by"] == "request_limit"
    # a query that fails is not answered: 8 queries, answers only for the 4 that passed
    assert summary["details"]["engine_calls"] == 12
    logged = _rows(tmp_path / "d.requests.jsonl")
    assert logged[2]["dropped_text"] == "Sure! I can help with that."  # to tune the filters by
    assert logged[7]["dropped_text"] == "Birds such as"


@pytest.mark.integration
def test_several_turns_each_query_drawn_after_the_conversation_so_far(tmp_path, smollm2_jinja):
    script, out = MagpieScript(), tmp_path / "t.jsonl"
    with FakeMagpieServer(script) as url:
        r = run_cli(*_magpie(out, url, smollm2_jinja, "--num-instructions", "2", "--magpie-turns", "3"))
    assert r.returncode == 0, r.stderr
    rows = _rows(out)
    assert len(rows) == 2
    assert all([m["role"] for m in row["messages"]] == ["user", "assistant"] * 3 for row in rows)
    prompts = [body["prompt"] for path, body in script.seen if path.endswith("/v1/completions")]
    first = rows[0]["messages"]
    assert prompts[1].endswith(
        f"<|im_start|>user\n{first[0]['content']}<|im_end|>\n<|im_start|>assistant\n{first[1]['content']}"
        "<|im_end|>\n<|im_start|>user\n"
    )
    records = read_records(out)
    assert all(r.is_conversation and len(r.messages) == 6 for r in records)


@pytest.mark.integration
def test_another_server_answers(tmp_path, smollm2_jinja):
    writer, answerer, out = MagpieScript(), MagpieScript(answers=["Answered elsewhere: {query}"]), tmp_path / "a.jsonl"
    with FakeMagpieServer(writer) as url, FakeMagpieServer(answerer) as other:
        r = run_cli(*_magpie(out, url, smollm2_jinja, "--num-instructions", "3", "--magpie-answer-engine", "openai",
                             "--magpie-answer-base-url", other, "--magpie-answer-model", "judge-ish"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert {path for path, _ in writer.seen} == {"/v1/completions"}
    assert {path for path, _ in answerer.seen} == {"/v1/chat/completions"}
    rows = _rows(out)
    assert all(row["output"] == f"Answered elsewhere: {row['instruction']}" for row in rows)
    assert rows[0]["magpie"]["answerer"].startswith("judge-ish @ ")


@pytest.mark.integration
def test_refusals_before_any_request(tmp_path, tiny_model_dir, smollm2_jinja):
    script = MagpieScript()
    with FakeMagpieServer(script) as url:
        r = run_cli(*_magpie(tmp_path / "a.jsonl", url, None, "--num-instructions", "2"))
        assert_user_error(r, "needs the server model's chat template", "--magpie-template")
        r = run_cli(*_magpie(tmp_path / "b.jsonl", url, smollm2_jinja, "--num-instructions", "2",
                             "--seeds", "package:demo-seeds.jsonl"))  # fmt: skip
        assert_user_error(r, "reads no seeds")
        # a model with no chat template (the tiny model is saved with the Alpaca format)
        r = run_cli("generate", "--method", "magpie", "--output", str(tmp_path / "c.jsonl"), "--num-instructions",
                    "2", "--engine", "transformers", "--model", str(tiny_model_dir), "--device", "cpu")  # fmt: skip
        assert_user_error(r, "needs an aligned chat model", "single-turn 'alpaca' format")
        r = run_cli("generate", "--method", "magpie", "--output", str(tmp_path / "e.jsonl"), "--num-instructions",
                    "2", "--engine", "transformers", "--model", str(tiny_model_dir), "--device", "cpu",
                    "--format", "user-assistant", "--magpie-template", str(smollm2_jinja))  # fmt: skip
        assert_user_error(r, "--magpie-template is for --engine openai")
        # several turns answered by a single-turn model
        r = run_cli(*_magpie(tmp_path / "d.jsonl", url, smollm2_jinja, "--num-instructions", "2", "--magpie-turns",
                             "2", "--magpie-answer-engine", "transformers", "--magpie-answer-model",
                             str(tiny_model_dir), "--magpie-answer-device", "cpu"))  # fmt: skip
        assert_user_error(r, "--magpie-turns 2 needs an answerer that reads several turns")
    assert script.seen == []
    assert not any((tmp_path / n).exists() for n in ("a.jsonl", "b.jsonl", "c.jsonl", "d.jsonl", "e.jsonl"))


@pytest.mark.integration
def test_a_server_without_raw_completions_is_refused_at_its_first_reply(tmp_path, smollm2_jinja):
    script = MagpieScript(no_completions=True)
    with FakeMagpieServer(script) as url:
        r = run_cli(*_magpie(tmp_path / "n.jsonl", url, smollm2_jinja, "--num-instructions", "5"))
    assert_user_error(r, "the server cannot continue raw text", "HTTP 404", "--magpie-answer-engine openai")
    assert [path for path, _ in script.seen] == ["/v1/completions"]


@pytest.mark.integration
def test_a_model_in_this_process_writes_queries_from_its_template(tmp_path, tiny_model_dir):
    """The tiny random model (its user-assistant template) writes noise: every request is asked
    and counted, nothing bad is kept."""
    out = tmp_path / "p.jsonl"
    r = run_cli("generate", "--method", "magpie", "--output", str(out), "--num-instructions", "2",
                "--max-requests", "3", "--engine", "transformers", "--model", str(tiny_model_dir), "--device",
                "cpu", "--format", "user-assistant", "--magpie-query-max-new-tokens", "16",
                "--max-new-tokens", "16")  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = _summary(out)
    assert summary["requests"] == 3 and summary["details"]["pre_query"] == "<|user|>\n"
    assert summary["accepted"] + sum(summary["dropped"].values()) == 3
    assert summary["completion_tokens"] > 0


@pytest.mark.integration
def test_cost_cap(tmp_path, smollm2_jinja):
    out = tmp_path / "c.jsonl"
    with FakeMagpieServer(MagpieScript()) as url:
        r = run_cli(*_magpie(out, url, smollm2_jinja, "--num-instructions", "100",
                             "--price-prompt-per-1m", "100000", "--max-cost-usd", "5"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = _summary(out)
    assert summary["stopped_by"] == "cost_limit" and summary["requests"] < 100
    assert summary["cost_usd"] == pytest.approx(summary["prompt_tokens"] * 0.1, abs=1e-6)


@pytest.mark.integration
def test_kill_9_then_resume_writes_what_an_uninterrupted_run_writes(tmp_path, smollm2_jinja):
    with FakeMagpieServer(MagpieScript(latency_s=0.02)) as url:
        whole = tmp_path / "whole.jsonl"
        r = run_cli(*_magpie(whole, url, smollm2_jinja, "--num-instructions", "40"))
        assert r.returncode == 0, r.stderr
        out = tmp_path / "killed.jsonl"
        args = _magpie(out, url, smollm2_jinja, "--num-instructions", "40")
        proc = subprocess.Popen([str(CLI), *args], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 8):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert 8 <= out.read_bytes().count(b"\n") < 40
        log = out.with_name("killed.requests.jsonl")
        lines = log.read_bytes().splitlines(keepends=True)
        log.write_bytes(b"".join(lines[:-1]))  # a record written, its log line not (a kill between)
        with open(out, "ab") as f:
            f.write(b'{"instruction": "cut off mid-wri')  # a kill during a write
        r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert max(Counter(row["magpie"]["request"] for row in _rows(out)).values()) == 1


# ---------------------------------------------------------------------------------------------
# the embedded model


@pytest.mark.real_model
@pytest.mark.llamacpp
def test_the_embedded_smollm2_writes_and_answers_its_own_queries(tmp_path):
    """Two short requests on llama.cpp: what the small model writes is its business (the yield
    per request is printed; its answers run past 96 tokens, and at the default 768 it kept 7 of
    8); that each request drew its query from SmolLM2's template, was answered or dropped for a
    counted reason, and that nothing kept holds template tokens, is ours."""
    out = tmp_path / "s.jsonl"
    r = run_cli(
        "generate", "--method", "magpie", "--engine", "llamacpp", "--model", "smollm2-135m-instruct",
        "--context-tokens", "1024", "--output", str(out), "--num-instructions", "2", "--max-requests", "2",
        "--magpie-query-max-new-tokens", "48", "--max-new-tokens", "96",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary, rows = _two_requests_from_smollm2s_template(out)
    assert summary["details"]["query_temperature"] == 0.7
    assert len(rows) == summary["accepted"]
    print(f"magpie on SmolLM2: {len(rows)} kept of 2 asked; dropped {summary['dropped']}")


def _two_requests_from_smollm2s_template(out) -> tuple[dict, list[dict]]:
    """The summary and records of two requests that each drew a query from SmolLM2's template and
    were answered or dropped for a counted reason; nothing kept holds a template token."""
    summary = _summary(out)
    assert summary["requests"] == 2 and summary["accepted"] + sum(summary["dropped"].values()) == 2
    assert 2 <= summary["details"]["engine_calls"] <= 4 and summary["completion_tokens"] > 0
    assert summary["details"]["pre_query"].endswith("<|im_start|>user\n")
    rows = _rows(out) if out.exists() else []
    assert not any("<|" in row["instruction"] + row["output"] for row in rows)
    return summary, rows


@pytest.mark.real_model
@pytest.mark.llamacpp
@NEEDS_SERVER
def test_magpie_against_llama_cpps_own_server_draws_queries_from_the_named_template(tmp_path, smollm2_jinja):
    """The server path against a server nobody here wrote: llama.cpp's `python -m llama_cpp.server`
    on the embedded GGUF. Queries go to its /v1/completions with the pre-query text of the template
    named by --magpie-template, answers to its /v1/chat/completions; both reach the model."""
    from alpaca_forge.engines.llamacpp import gguf_path

    out = tmp_path / "srv.jsonl"
    with llama_server(gguf_path("smollm2-135m-instruct"), "smollm2") as url:
        r = run_cli(
            "generate", "--method", "magpie", "--engine", "openai", "--base-url", url, "--model", "smollm2",
            "--magpie-template", str(smollm2_jinja), "--output", str(out), "--num-instructions", "2",
            "--max-requests", "2", "--magpie-query-max-new-tokens", "48", "--max-new-tokens", "64",
            "--magpie-query-temperature", "0.7",
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    _two_requests_from_smollm2s_template(out)
