"""The stages on `--engine llamacpp`: infer, chat, serve and generate run a GGUF file through
llama-cpp-python and answer as the transformers engine does; careless input is a clear error.

The tiny random Llama is exported as an f32 GGUF (`tiny_gguf`), so llama.cpp's greedy choices are
transformers'. The repetition penalty is 1.0 wherever answers are compared: llama.cpp's looks
back 64 tokens, transformers' over the whole text, so with a penalty the two may part ways.
"""

from __future__ import annotations

import json
import os
import sys

import httpx
import openai
import pytest

from alpaca_forge import GenerationSettings, Message
from alpaca_forge.engines import EngineConfig
from alpaca_forge.engines.llamacpp import LlamaCppEngine
from alpaca_forge.serve import FilterConfig, ServeConfig, start

from conftest import VENDORED_DATA, assert_user_error, run_cli

pytestmark = [pytest.mark.llamacpp, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

NO_PENALTY = ("--repetition-penalty", "1.0")


def _write_instructions(path, rows: list[tuple[str, str]]) -> str:
    path.write_text("".join(json.dumps({"instruction": i, "input": x}) + "\n" for i, x in rows))
    return str(path)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# infer and chat: the same answers on both in-process engines


# Five instructions, two with inputs (the test after draws a <unk> token mid-answer).
INSTRUCTIONS = [
    ("Question 0: what is the capital of France?", ""),
    ("Question 1: what is the capital of France?", "ctx 1"),
    ("Hi", ""),
    ("Summarize the text.", "Paris is the capital. the cat sat on the mat."),
    ("Name three colours.", ""),
]


def _infer_on_both(tmp_path, tiny_model_dir, tiny_gguf, rows) -> tuple[list[dict], list[dict]]:
    """The rows `infer` writes with the transformers engine, then with llama.cpp (greedy)."""
    instructions = _write_instructions(tmp_path / "in.jsonl", rows)
    common = ("--input", instructions, "--max-new-tokens", "12", "--batch-size", "2", *NO_PENALTY)
    hf = run_cli("infer", "--model", str(tiny_model_dir), "--output", str(tmp_path / "hf.jsonl"), *common)
    assert hf.returncode == 0, hf.stderr
    cpp = run_cli(
        "infer", "--engine", "llamacpp", "--model", str(tiny_gguf),
        "--output", str(tmp_path / "cpp.jsonl"), *common,
    )  # fmt: skip
    assert cpp.returncode == 0, cpp.stderr
    return _rows(tmp_path / "hf.jsonl"), _rows(tmp_path / "cpp.jsonl")


def _answers(rows: list[dict]) -> list[tuple]:
    return [(r["instruction"], r["input"], r["output"], r["finish_reason"], r["num_tokens"]) for r in rows]


@pytest.mark.integration
def test_infer_on_llamacpp_answers_as_transformers_does(tmp_path, tiny_model_dir, tiny_gguf):
    # Inputs too: both engines render the Alpaca template here, "### Input:" heading and all.
    hf_rows, cpp_rows = _infer_on_both(tmp_path, tiny_model_dir, tiny_gguf, INSTRUCTIONS)
    assert len(cpp_rows) == len(INSTRUCTIONS)
    assert _answers(cpp_rows) == _answers(hf_rows)
    assert all(r["output"] and r["num_tokens"] > 0 for r in cpp_rows)
    assert {r["prompt_format"] for r in hf_rows + cpp_rows} == {"alpaca"}
    assert {r["model"] for r in cpp_rows} == {str(tiny_gguf)}
    assert cpp_rows[0]["generation"] == hf_rows[0]["generation"]


@pytest.mark.integration
def test_a_token_without_text_does_not_end_a_llamacpp_answer(tmp_path, tiny_model_dir, tiny_gguf):
    # Greedy, the tiny model's 4th token here is <unk> (id 3, not an end-of-generation token):
    # transformers skips its text and goes on to 12 tokens; llama.cpp's engine stops at it.
    rows = [("Describe the cat.", "a black cat"), ("Translate to French.", "the cat sat on the mat")]
    hf_rows, cpp_rows = _infer_on_both(tmp_path, tiny_model_dir, tiny_gguf, rows)
    assert [r["finish_reason"] for r in hf_rows] == ["length", "length"]
    assert _answers(cpp_rows) == _answers(hf_rows)


@pytest.mark.integration
def test_chat_on_llamacpp_answers_as_transformers_does(tiny_model_dir, tiny_gguf):
    lines = "Name three colours.\nWhat is the capital of Spain?\n"  # answers without <unk>
    common = ("--temperature", "0", "--max-new-tokens", "10", "--no-stats", *NO_PENALTY)
    hf = run_cli("chat", "--model", str(tiny_model_dir), *common, input=lines)
    cpp = run_cli("chat", "--engine", "llamacpp", "--model", str(tiny_gguf), *common, input=lines)
    assert hf.returncode == 0 and cpp.returncode == 0, (hf.stderr, cpp.stderr)
    assert cpp.stdout == hf.stdout
    assert len(cpp.stdout.splitlines()) == 2


# ---------------------------------------------------------------------------------------------
# serve on llamacpp: a real server on loopback


@pytest.fixture(scope="module")
def cpp_server(tiny_gguf):
    cfg = ServeConfig(
        port=0,
        max_prompt_tokens=64,
        engine=EngineConfig(engine="llamacpp", model=str(tiny_gguf), context_tokens=512),
        content_filter=FilterConfig(filter=False),  # random words could hit a rule
    )
    with start(cfg) as s:
        yield s.wait_ready(60)


def _ask(content: str = "Name three colours.", **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], **kw}


@pytest.mark.integration
def test_serve_on_llamacpp_answers_as_the_engine_does(cpp_server, tiny_gguf):
    name = cpp_server.state.backend.name
    assert name == tiny_gguf.stem  # `tiny.f32.gguf` is served as `tiny.f32`
    client = openai.OpenAI(base_url=cpp_server.api_url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [name]
    assert httpx.get(cpp_server.api_url + "/models").json()["data"][0]["prompt_format"] == "alpaca"

    body = {"model": name, "temperature": 0, "max_tokens": 16, "extra_body": {"repetition_penalty": 1.0}}
    whole = client.chat.completions.with_raw_response.create(**body, **_ask())
    r = whole.parse()
    engine = LlamaCppEngine(tiny_gguf, context_tokens=512)
    try:
        settings = GenerationSettings(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0)
        direct = engine.chat([[Message("user", "Name three colours.")]], settings)[0]
    finally:
        engine.close()
    assert r.choices[0].message.content == direct.text and direct.text
    assert r.choices[0].finish_reason == direct.finish_reason.value
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        direct.prompt_tokens,
        direct.completion_tokens,
    )
    assert r.usage.prompt_tokens > 0

    chunks = list(client.chat.completions.create(**body, stream=True, **_ask()))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # streamed, not sent in one go
    assert "".join(pieces) == direct.text

    again = client.chat.completions.with_raw_response.create(**body, **_ask(content="Hi"))
    assert whole.headers["x-model-id"] == again.headers["x-model-id"] == cpp_server.state.backend.model_id
    assert r.system_fingerprint == again.parse().system_fingerprint == cpp_server.state.backend.fingerprint


@pytest.mark.integration
def test_serve_on_llamacpp_refuses_a_prompt_over_max_prompt_tokens(cpp_server):
    url, name = cpp_server.api_url + "/chat/completions", cpp_server.state.backend.name
    long = httpx.post(url, json={"model": name, **_ask(content="word " * 100)}, timeout=60)
    assert long.status_code == 400, long.text
    assert long.json()["error"]["code"] == "context_length_exceeded"
    assert "64" in long.json()["error"]["message"]
    after = httpx.post(url, json={"model": name, "max_tokens": 4, "temperature": 0, **_ask()}, timeout=60)
    assert after.status_code == 200, after.text
    assert after.json()["usage"]["completion_tokens"] > 0


# ---------------------------------------------------------------------------------------------
# generate with the embedded SmolLM2 GGUF as teacher


@pytest.mark.real_model
def test_generate_on_llamacpp_with_the_embedded_model(tmp_path):
    """One short request (the vendored seeds, 16 new tokens): how many tasks survive the filters
    is the model's business; that the run ends as told, on llama.cpp, with its files, is ours."""
    out = tmp_path / "gen.jsonl"
    r = run_cli(
        "generate", "--seeds", str(VENDORED_DATA / "seed_tasks.jsonl"), "--output", str(out),
        "--engine", "llamacpp", "--model", "smollm2-135m-instruct", "--context-tokens", "1024",
        "--num-instructions", "1", "--max-requests", "1", "--max-new-tokens", "16",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "(llama.cpp, 1024-token context" in r.stderr  # the load line names the engine
    summary = json.loads((tmp_path / "gen.summary.json").read_text())
    assert summary["teacher"] == "smollm2-135m-instruct" and summary["requests"] == 1
    assert summary["stopped_by"] in ("request_limit", "done")
    assert 0 < summary["completion_tokens"] <= 16 and summary["prompt_tokens"] > 100
    logged = _rows(tmp_path / "gen.requests.jsonl")
    assert [(row["request"], row["completion_tokens"]) for row in logged] == [
        (0, summary["completion_tokens"])
    ]
    assert summary["accepted"] == (len(_rows(out)) if out.exists() else 0)


@pytest.mark.integration
def test_eval_judges_on_llamacpp_as_on_transformers(tmp_path, tiny_model_dir, tiny_gguf):
    """The judge is an engine like any other: the tiny model judging on llama.cpp writes the same
    replies as on transformers (greedy, f32), and the cache keeps the two judges apart."""
    rows = [{"id": f"q{k}", "instruction": f"Name colour number {k}."} for k in range(3)]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, text in (("a", "Red."), ("b", "Blue, I think.")):
        preds = [{"id": r["id"], "instruction": r["instruction"], "output": text} for r in rows]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    replies = {}
    for engine, model in (("transformers", str(tiny_model_dir)), ("llamacpp", str(tiny_gguf))):
        out = tmp_path / engine
        r = run_cli(
            "eval", "pairwise", "--set", str(tmp_path / "set.jsonl"), "--a", str(tmp_path / "a.jsonl"),
            "--b", str(tmp_path / "b.jsonl"), "--output", str(out), "--judge-engine", engine,
            "--judge-model", model, "--judge-max-new-tokens", "6", "--bootstrap-samples", "200",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "report.json").read_text())["judgements"] == 6
        replies[engine] = [row["reply"] for row in _rows(out / "judgements.jsonl")]
    assert replies["llamacpp"] == replies["transformers"]


# ---------------------------------------------------------------------------------------------
# Careless input


@pytest.mark.integration
def test_threads_are_omp_num_threads_unless_named(monkeypatch, tiny_gguf):
    """A scheduler's or a person's OMP_NUM_THREADS holds for llama.cpp as it does for torch, for
    prompt and decode threads; --cpu-threads wins; without either, llama.cpp's own choice."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    engine = LlamaCppEngine(tiny_gguf)
    assert (engine.llm.n_threads, engine.llm.n_threads_batch) == (1, 1)
    engine.close()
    engine = LlamaCppEngine(tiny_gguf, threads=3)
    assert (engine.llm.n_threads, engine.llm.n_threads_batch) == (3, 3)
    engine.close()
    monkeypatch.delenv("OMP_NUM_THREADS")
    engine = LlamaCppEngine(tiny_gguf)
    assert engine.llm.n_threads_batch == os.cpu_count()
    engine.close()


def _infer(tmp_path, *flags: str):
    instructions = _write_instructions(tmp_path / "in.jsonl", [("What is the capital of France?", "")])
    out = str(tmp_path / "o.jsonl")
    return run_cli("infer", "--input", instructions, "--output", out, "--max-new-tokens", "4", *flags)


@pytest.mark.integration
def test_a_transformers_folder_is_told_to_be_exported_first(tmp_path, tiny_model_dir):
    r = _infer(tmp_path, "--engine", "llamacpp", "--model", str(tiny_model_dir))
    assert_user_error(r, "export it first", "export gguf", str(tiny_model_dir))
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.integration
def test_a_truncated_gguf_names_the_file(tmp_path, tiny_gguf):
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert_user_error(_infer(tmp_path, "--engine", "llamacpp", "--model", str(cut)), str(cut), "cannot load")


@pytest.mark.integration
def test_a_file_that_is_not_gguf_names_the_file(tmp_path):
    fake = tmp_path / "notes.gguf"
    fake.write_text("these are my notes, not a model\n")
    assert_user_error(
        _infer(tmp_path, "--engine", "llamacpp", "--model", str(fake)), str(fake), "not a GGUF file"
    )


@pytest.mark.integration
def test_base_url_is_for_the_openai_engine(tmp_path, tiny_gguf):
    r = _infer(tmp_path, "--engine", "llamacpp", "--model", str(tiny_gguf), "--base-url", "http://x/v1")
    assert_user_error(r, "--base-url is for --engine openai")


@pytest.mark.integration
def test_a_context_below_the_minimum_is_a_range_error(tmp_path, tiny_gguf):
    r = _infer(tmp_path, "--engine", "llamacpp", "--model", str(tiny_gguf), "--context-tokens", "8")
    assert_user_error(r, "--context-tokens: must be at least 16, got 8")


def _infer_long_prompt(tmp_path, tiny_gguf, words: int):
    instructions = _write_instructions(tmp_path / "in.jsonl", [("word " * words, "")])
    return run_cli(
        "infer", "--input", instructions, "--output", str(tmp_path / "o.jsonl"),
        "--engine", "llamacpp", "--model", str(tiny_gguf), "--context-tokens", "16",
    )  # fmt: skip


@pytest.mark.integration
def test_a_prompt_longer_than_the_context_is_a_clear_error(tmp_path, tiny_gguf):
    # ~500 tokens: more than the 256 that llama.cpp makes of --context-tokens 16 (see below).
    r = _infer_long_prompt(tmp_path, tiny_gguf, words=100)
    assert_user_error(r, "--context-tokens", "shorten the prompt")
    assert not (tmp_path / "o.jsonl").read_text()  # the run stopped: no row for this record


@pytest.mark.integration
def test_a_prompt_longer_than_a_small_context_is_a_clear_error(tmp_path, tiny_gguf):
    # ~100 tokens: over the 16 asked for, under the 256 llama.cpp allocates.
    r = _infer_long_prompt(tmp_path, tiny_gguf, words=15)
    assert_user_error(r, "--context-tokens")


# ---------------------------------------------------------------------------------------------
# llama-cpp-python not installed


@pytest.fixture
def without_llama_cpp(monkeypatch):
    """`import llama_cpp` raises ImportError, as where the package is not installed."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


@pytest.mark.integration
def test_infer_without_llama_cpp_says_how_to_install_it(tmp_path, tiny_gguf, without_llama_cpp):
    r = _infer(tmp_path, "--engine", "llamacpp", "--model", str(tiny_gguf))
    assert_user_error(r, "llama-cpp-python", "-DGGML_NATIVE=OFF", "CMAKE_ARGS")


@pytest.mark.integration
def test_export_without_llama_cpp_needs_no_verify(tmp_path, tiny_model_dir, without_llama_cpp):
    out = tmp_path / "x.gguf"
    export = ("export", "gguf", "--model", str(tiny_model_dir), "--output", str(out), "--quant", "q8_0")
    assert_user_error(run_cli(*export), "llama-cpp-python", "--no-verify", "-DGGML_NATIVE=OFF")
    assert not out.exists()
    r = run_cli(*export, "--no-verify")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"GGUF"
    assert not (tmp_path / "x.parity.json").exists()  # nothing was checked, so no report


@pytest.mark.integration
def test_k_quants_without_llama_cpp_name_the_quants_that_need_no_compiler(
    tmp_path, tiny_model_dir, without_llama_cpp
):
    out = tmp_path / "k.gguf"
    r = run_cli(
        "export",
        "gguf",
        "--model",
        str(tiny_model_dir),
        "--output",
        str(out),
        "--quant",
        "q4_k_m",
        "--no-verify",
    )
    assert_user_error(r, "K-quants", "llama-cpp-python", "q4_0/q4_1/q5_0/q5_1")
    assert not out.exists()
