"""The engine conformance suite: every engine answers the same calls the same way.

Run against the in-process transformers engine (tiny random model, and the real SmolLM2) and the
OpenAI-compatible HTTP engine (against a loopback server answering with the tiny model). Then the
commands that make text (`infer`, `chat`) are run on both engines and must agree.
"""

import dataclasses
import json
import threading

import pytest
import torch

from alpaca_forge import FinishReason, GenerationSettings, Message, UserError, load_model
from alpaca_forge.engines import (
    Engine,
    ModelIdentity,
    SamplingDefaults,
    StopStringFilter,
    Stream,
    cut_at_stop,
    tokens_per_s,
)
from alpaca_forge.engines.batching import BatchingEngine
from alpaca_forge.engines.llamacpp import LlamaCppEngine, gguf_path
from alpaca_forge.engines.openai_http import OpenAIEngine
from alpaca_forge.engines.transformers_engine import TransformersEngine

from conftest import run_cli
from loopback import JsonHandler, Loopback
from openai_server import LoopbackServer

GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# Stop strings (shared by every engine)


@pytest.mark.unit
def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("Paris.\n### Instruction:\nmore", ["### Instruction:", "\n"]) == ("Paris.", True)
    assert cut_at_stop("no stop here", ["###"]) == ("no stop here", False)


@pytest.mark.unit
@pytest.mark.parametrize("split", [1, 2, 3, 5, 100])
def test_stop_filter_holds_back_partial_stop_strings(split):
    text = "The answer is 4.\n### Instruction:\nWhat is 2+3?"
    f = StopStringFilter(["### Instruction:"])
    out = "".join(f.push(text[i : i + split]) for i in range(0, len(text), split)) + f.flush()
    assert out == "The answer is 4.\n"
    assert f.stopped


@pytest.mark.unit
def test_stop_filter_releases_a_false_alarm():
    f = StopStringFilter(["### Instruction:"])
    assert f.push("Use ##") == "Use "  # could be the start of the stop string: held
    assert f.push("# headings") == "### headings"
    assert f.flush() == ""
    assert not f.stopped


@pytest.mark.unit
def test_settings_are_validated_together():
    with pytest.raises(UserError) as e:
        GenerationSettings(max_new_tokens=0, temperature=-1, top_p=1.5)
    assert (
        "--max-new-tokens" in str(e.value) and "--temperature" in str(e.value) and "--top-p" in str(e.value)
    )


# ---------------------------------------------------------------------------------------------
# Conformance: the same calls on every engine


@pytest.fixture(scope="module")
def tiny_engine(tiny_lm):
    return TransformersEngine(tiny_lm)


@pytest.fixture(scope="module")
def loopback(tiny_engine):
    with LoopbackServer(tiny_engine) as url:
        yield url


@pytest.fixture(scope="module")
def smollm2_engine():
    return TransformersEngine(load_model("smollm2-135m-instruct", device="cpu"))


@pytest.fixture(scope="module")
def tiny_llamacpp(tiny_gguf):
    engine = LlamaCppEngine(tiny_gguf, context_tokens=1024)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def smollm2_llamacpp():
    engine = LlamaCppEngine(gguf_path("smollm2-135m-instruct"), context_tokens=1024)
    yield engine
    engine.close()


@pytest.fixture(
    # Each engine's tier: the tiny model in this process is a unit test, a server on loopback or
    # llama.cpp an integration test, the embedded SmolLM2 a real-model one.
    params=[
        pytest.param("transformers", marks=pytest.mark.unit),
        pytest.param("openai", marks=pytest.mark.integration),
        pytest.param("llamacpp", marks=[pytest.mark.integration, pytest.mark.llamacpp]),
        pytest.param("smollm2", marks=pytest.mark.real_model),
        pytest.param("smollm2-llamacpp", marks=[pytest.mark.real_model, pytest.mark.llamacpp]),
    ]
)
def engine(request):
    if request.param == "transformers":
        yield request.getfixturevalue("tiny_engine")
    elif request.param == "smollm2":
        yield request.getfixturevalue("smollm2_engine")
    elif request.param == "llamacpp":
        yield request.getfixturevalue("tiny_llamacpp")
    elif request.param == "smollm2-llamacpp":
        yield request.getfixturevalue("smollm2_llamacpp")
    else:
        http = OpenAIEngine(request.getfixturevalue("loopback"), "tiny")
        yield http
        http.close()


def _conversations():
    return [
        [Message.from_record("What is the capital of France?")],
        [Message.from_record("Translate to French.", "the cat sat on the mat, and then the cat sat again")],
        [Message.from_record("Hi")],
    ]


def test_a_batch_answers_as_one_at_a_time(engine):
    """Left padding (or concurrent requests) must not change what each prompt gets (greedy)."""
    batched = engine.chat(_conversations(), GREEDY)
    alone = [engine.chat([c], GREEDY)[0] for c in _conversations()]
    assert batched == alone
    assert all(c.completion_tokens > 0 and c.prompt_tokens > 0 for c in batched)
    assert all(isinstance(c.finish_reason, FinishReason) for c in batched)


def test_complete_continues_a_raw_prompt(engine):
    prompts = ["the cat sat on the", "What is the capital of"]
    got = engine.complete(prompts, GREEDY)
    assert len(got) == 2 and got == [engine.complete([p], GREEDY)[0] for p in prompts]


def test_length_limit_is_reported(engine):
    settings = GenerationSettings(max_new_tokens=3, temperature=0.0, repetition_penalty=1.0)
    c = engine.chat(_conversations()[:1], settings)[0]
    if c.finish_reason != FinishReason.LENGTH:  # the model happened to emit EOS within 3 tokens
        pytest.skip("the model stopped early for this prompt")
    assert c.completion_tokens == 3


def test_stop_string_cuts_generation(engine):
    conv = _conversations()[:1]
    full = engine.chat(conv, GREEDY)[0]
    assert len(full.text) > 6, full
    stop = full.text[3:6]
    cut = engine.chat(conv, dataclasses.replace(GREEDY, stop=(stop,)))[0]
    assert cut.text == full.text[: full.text.index(stop)].strip()
    assert cut.finish_reason == FinishReason.STOP
    assert cut.completion_tokens < full.completion_tokens


def test_sampling_is_seeded(engine):
    conv = _conversations()[:1]
    s = GenerationSettings(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    assert engine.chat(conv, s) == engine.chat(conv, s)
    others = {engine.chat(conv, dataclasses.replace(s, seed=k))[0].text for k in range(5)}
    assert len(others) > 1


def test_stream_yields_the_same_answer_as_chat(engine):
    conv = _conversations()[1]
    stream = engine.stream(conv, GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces).strip() == stream.completion.text == engine.chat([conv], GREEDY)[0].text
    assert tokens_per_s(stream) > 0


@pytest.mark.integration
@pytest.mark.parametrize("cls", [TransformersEngine, OpenAIEngine, LlamaCppEngine, BatchingEngine])
def test_every_engine_class_defines_every_declared_member(cls):
    """The same, read off the classes, so the llama.cpp engine is held to it where
    llama-cpp-python is not installed: a member is on the class (a method, a property, a class
    attribute) or set by its `__init__` (an attribute name `__init__` stores)."""
    declared = {n for n in vars(Engine) if not n.startswith("_")} | set(Engine.__annotations__)
    assert {"stream_prompt", "render", "count_tokens", "identity", "upstream", "context_tokens"} <= declared
    assert "generation_defaults" in declared
    missing = [m for m in declared if not hasattr(cls, m) and m not in cls.__init__.__code__.co_names]
    assert not missing, f"{cls.__name__} lacks {missing}"


def test_every_declared_member_answers(engine):
    """What the `Engine` protocol declares is what callers read (serve, generate): every engine
    has all of it, so no caller probes an engine with hasattr. An engine with a server behind
    (`upstream`) says so, and its prompt, count, context and digest are None."""
    assert isinstance(engine, Engine)
    conv = _conversations()[0]
    assert isinstance(engine.name, str) and isinstance(engine.format_name, str)
    assert isinstance(engine.multi_turn, bool) and isinstance(engine.upstream, bool)
    assert engine.last_retries == 0
    identity = engine.identity()
    assert isinstance(identity, ModelIdentity) and identity.model
    assert engine.identity() == identity  # the same model, the same identity
    prompt = engine.render(conv, GREEDY.max_new_tokens)
    raw = engine.count_tokens("The sky is", chat=False)
    defaults = engine.generation_defaults()
    assert isinstance(defaults, SamplingDefaults)
    if engine.upstream:
        assert prompt is None and raw is None and engine.context_tokens is None
        assert identity.digest is None
        assert defaults == SamplingDefaults()  # the server behind applies its own
    else:
        assert "capital of France" in prompt
        assert engine.count_tokens(prompt, chat=True) == engine.chat([conv], GREEDY)[0].prompt_tokens
        assert raw == engine.complete(["The sky is"], GREEDY)[0].prompt_tokens > 0
        assert engine.context_tokens > GREEDY.max_new_tokens
        assert identity.model == engine.name and len(identity.digest) == 32  # sha256
    stream = engine.stream_prompt("The sky is", GREEDY)
    assert isinstance(stream, Stream)
    text = "".join(stream)
    assert text.strip() == stream.completion.text == engine.complete(["The sky is"], GREEDY)[0].text
    assert stream.queue_s is None or stream.queue_s >= 0
    chat_stream = engine.stream(conv, GREEDY)
    assert isinstance(chat_stream, Stream)
    chat_stream.cancel()
    assert chat_stream.completion.finish_reason == FinishReason.CANCELLED


def test_stream_cancel_stops_generation_early(engine):
    settings = GenerationSettings(max_new_tokens=3000, temperature=1.0, repetition_penalty=1.0)
    stream = engine.stream(_conversations()[0], settings)
    got = False
    for _ in stream:
        got = True
        stream.cancel()
        break
    assert got
    assert stream.completion.finish_reason == FinishReason.CANCELLED
    assert stream.completion.completion_tokens < 3000


def test_concurrent_callers_get_what_they_would_alone(engine):
    """Threads sharing one engine (a server's) each get the answer they get alone: no shared
    tokenizer state, no RNG one call leaks into another."""
    calls = [
        (c, GenerationSettings(max_new_tokens=12, temperature=1.0, seed=k))
        for k, c in enumerate(_conversations() * 2)
    ]
    alone = [engine.chat([c], s)[0] for c, s in calls]
    together: list = [None] * len(calls)

    def ask(i: int) -> None:
        together[i] = engine.chat([calls[i][0]], calls[i][1])[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_a_conversation_must_end_with_the_user(engine):
    with pytest.raises(UserError, match="must end in a user message"):
        engine.chat([[Message("user", "Hi"), Message("assistant", "Hello")]], GREEDY)


@pytest.mark.unit
def test_the_global_rng_is_left_alone(tiny_engine):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_engine.chat(_conversations()[:1], GenerationSettings(max_new_tokens=8, temperature=1.0, seed=5))
    assert torch.equal(torch.rand(3), expected)
    assert tiny_engine.lm.tokenizer.padding_side == "right"  # never flipped for left padding


@pytest.mark.integration
def test_tokenizers_without_a_pad_token_still_batch(tiny_model_dir):
    """Llama-2 and GPT-2 style tokenizers have no pad token: padding falls back to EOS."""
    lm = load_model(str(tiny_model_dir), device="cpu")
    lm.tokenizer.pad_token = None
    assert lm.tokenizer.pad_token_id is None
    engine = TransformersEngine(lm)
    assert engine.chat(_conversations(), GREEDY) == [engine.chat([c], GREEDY)[0] for c in _conversations()]


# ---------------------------------------------------------------------------------------------
# The commands on both engines


def _instructions(path, with_input: bool = True):
    rows = [
        {
            "instruction": f"Question {i}: what is the capital of France?",
            "input": f"ctx {i}" if with_input and i % 2 else "",
        }
        for i in range(5)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.integration
def test_infer_gives_the_same_answers_on_both_engines(tmp_path, tiny_model_dir, loopback):
    # Without inputs: a server receives a record as one message (instruction, then input), so only
    # in-process can the Alpaca template put an input under its own "### Input:" heading.
    _instructions(tmp_path / "in.jsonl", with_input=False)
    common = (
        "--input",
        str(tmp_path / "in.jsonl"),
        "--max-new-tokens",
        "10",
        "--batch-size",
        "3",
        "--repetition-penalty",
        "1.1",
    )
    local = run_cli(
        "infer", "--model", str(tiny_model_dir), "--output", str(tmp_path / "local.jsonl"), *common
    )
    assert local.returncode == 0, local.stderr
    http = run_cli(
        "infer",
        "--engine",
        "openai",
        "--base-url",
        loopback,
        "--model",
        "tiny",
        "--output",
        str(tmp_path / "http.jsonl"),
        *common,
    )
    assert http.returncode == 0, http.stderr
    rows = {
        name: [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        for name in ("local", "http")
    }
    assert [r["output"] for r in rows["local"]] == [r["output"] for r in rows["http"]]
    assert rows["http"][0]["model"] == f"tiny @ {loopback}" and rows["http"][0]["prompt_format"] == "server"
    assert [r["finish_reason"] for r in rows["local"]] == [r["finish_reason"] for r in rows["http"]]


@pytest.mark.integration
def test_chat_gives_the_same_answers_on_both_engines(tiny_model_dir, loopback):
    lines = "What is the capital of France?\nAnd of Spain?\n"
    common = ("--temperature", "0", "--max-new-tokens", "10", "--no-stats", "--repetition-penalty", "1.1")
    local = run_cli("chat", "--model", str(tiny_model_dir), *common, input=lines)
    http = run_cli(
        "chat", "--engine", "openai", "--base-url", loopback, "--model", "tiny", *common, input=lines
    )
    assert local.returncode == 0 and http.returncode == 0, (local.stderr, http.stderr)
    assert local.stdout == http.stdout and len(local.stdout.splitlines()) == 2


@pytest.mark.integration
def test_the_repetition_penalty_default_depends_on_the_engine(tmp_path, tiny_model_dir):
    """In-process 1.1 (small models loop without it); a server is sent none, since OpenAI's own
    API rejects the parameter; an explicit value is sent as asked."""
    _instructions(tmp_path / "in.jsonl")
    common = ("--input", str(tmp_path / "in.jsonl"), "--max-new-tokens", "4", "--limit", "2")
    assert (
        run_cli(
            "infer", "--model", str(tiny_model_dir), "--output", str(tmp_path / "l.jsonl"), *common
        ).returncode
        == 0
    )
    local = json.loads((tmp_path / "l.jsonl").read_text().splitlines()[0])
    assert local["generation"]["repetition_penalty"] == 1.1
    server = LoopbackServer(TransformersEngine(load_model(str(tiny_model_dir), device="cpu")))
    with server as url:
        http = ("--engine", "openai", "--base-url", url, "--model", "tiny", *common)
        assert run_cli("infer", *http, "--output", str(tmp_path / "h.jsonl")).returncode == 0
        assert (
            run_cli(
                "infer", *http, "--output", str(tmp_path / "h2.jsonl"), "--repetition-penalty", "1.3"
            ).returncode
            == 0
        )
    bodies = server.requests
    assert len(bodies) == 4
    assert all("repetition_penalty" not in body for body in bodies[:2])
    assert all(body["repetition_penalty"] == 1.3 for body in bodies[2:])
    assert (
        json.loads((tmp_path / "h.jsonl").read_text().splitlines()[0])["generation"]["repetition_penalty"]
        == 1.0
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--engine", "openai"], ["--base-url", "--model"]),
        (["--engine", "openai", "--base-url", "127.0.0.1:8000"], ["not an http(s) URL", "--model"]),
        (["--base-url", "http://127.0.0.1:8000/v1"], ["--base-url is for --engine openai"]),
        (
            ["--engine", "openai", "--base-url", "http://x/v1", "--model", "m", "--format", "alpaca"],
            ["--format applies"],
        ),
        (["--engine", "vllm"], ["--engine", "transformers", "openai"]),
    ],
)
def test_a_bad_engine_combination_names_what_is_missing(tmp_path, flags, needles):
    from conftest import assert_user_error

    _instructions(tmp_path / "in.jsonl")
    r = run_cli("infer", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"), *flags)
    assert_user_error(r, *needles)
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.integration
def test_a_server_that_does_not_know_the_model(tmp_path, loopback):
    from conftest import assert_user_error

    _instructions(tmp_path / "in.jsonl")
    r = run_cli(
        "infer", "--engine", "openai", "--base-url", loopback, "--model", "other",
        "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"),
    )  # fmt: skip
    assert_user_error(r, "HTTP 404", "--model")


@pytest.mark.unit
def test_a_key_an_http_header_cannot_carry_is_a_clear_error(monkeypatch):
    from alpaca_forge import EngineConfig, open_engine

    monkeypatch.setenv("MY_KEY", "clé ")
    with pytest.raises(UserError, match=r"\$MY_KEY") as e:
        open_engine(
            EngineConfig(engine="openai", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="MY_KEY")
        )
    assert "MY_KEY" in e.value.fix


@pytest.mark.unit
def test_a_negative_retry_after_waits_not_at_all():
    import random

    from alpaca_forge.engines.openai_http import RetryPolicy

    assert RetryPolicy().delay_s(0, "-5", random.Random(0)) == 0.0
    assert RetryPolicy(max_delay_s=60).delay_s(0, "600", random.Random(0)) == 60


@pytest.mark.integration
def test_a_stream_the_server_cuts_off_is_a_clear_error():
    """A server that dies mid-answer: chat ends with an error naming the server, no traceback,
    and the part of the answer that arrived was shown."""

    from conftest import assert_user_error

    class CutOff(JsonHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            event = b'data: {"choices": [{"index": 0, "delta": {"content": "Half an answer"}}]}\n\n'
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            self.wfile.flush()
            self.close_connection = True  # gone, without the closing chunk

    with Loopback(CutOff) as url:
        r = run_cli(
            "chat", "--engine", "openai", "--base-url", url, "--model", "m", "--no-stats", input="Hi\n"
        )
    assert_user_error(r, "cut the answer off mid-stream", url)
    assert "Half an answer" in r.stdout
