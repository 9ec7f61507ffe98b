"""`alpaca-forge serve`: the real server on loopback, the official `openai` SDK and raw HTTP as
clients, the tiny random model behind it (answers are gibberish, but real and deterministic)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from alpaca_forge.core.errors import UserError
from alpaca_forge.core.prompts import Message
from alpaca_forge.engines import EngineConfig, GenerationSettings
from alpaca_forge.engines.transformers_engine import TransformersEngine
from alpaca_forge.serve import FilterConfig, ServeConfig, start

from conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def engine(tiny_lm):
    return TransformersEngine(tiny_lm)


@pytest.fixture(scope="module")
def endless(tiny_model_dir):
    """The tiny model, never ending an answer early (EOS suppressed): every answer is max_tokens long."""
    from alpaca_forge import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    lm.model.generation_config.suppress_tokens = [lm.tokenizer.eos_token_id]
    return TransformersEngine(lm)


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "requests.jsonl"
    with start(ServeConfig(port=0, request_log=str(log)), engine=engine) as s:
        yield s.wait_ready(60)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


def served(engine, **settings):
    return start(ServeConfig(port=0, **settings), engine=engine)


def greedy(n: int = 24, **kw) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=n, temperature=0.0, repetition_penalty=1.0, **kw)


def ask(**kw):
    return {"messages": [{"role": "user", "content": kw.pop("content", "Name three colours.")}], **kw}


def log_rows(server) -> list[dict]:
    path = Path(server.config.request_log)
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ---------------------------------------------------------------------------------------------
# The API through the official SDK


def test_models_and_identity(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [server.state.backend.name]
    r = httpx.get(server.api_url + "/models")
    assert r.headers["x-model-id"] == server.state.backend.model_id
    assert r.json()["data"][0]["prompt_format"] == "alpaca"
    assert httpx.get(server.url + "/health").json() == {
        "status": "ok",
        "model": server.state.backend.model_id,
    }


def test_chat_answers_as_the_engine_does_with_the_models_saved_format(server, client, engine):
    name = server.state.backend.name
    r = client.chat.completions.create(
        model=name, temperature=0, max_tokens=24, extra_body={"repetition_penalty": 1.0}, **ask()
    )
    direct = engine.chat([[Message("user", "Name three colours.")]], greedy())[0]
    assert r.choices[0].message.content == direct.text
    assert r.choices[0].finish_reason == ("length" if direct.finish_reason.value == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        direct.prompt_tokens,
        direct.completion_tokens,
    )
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.system_fingerprint == server.state.backend.fingerprint
    assert r.model == name


def test_stream_pieces_add_up_to_the_answer_and_end_with_usage_and_done(server, client):
    name = server.state.backend.name
    body = {"model": name, "temperature": 0, "max_tokens": 30, **ask()}
    whole = client.chat.completions.create(**body).choices[0].message.content
    chunks = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3  # streamed, not sent in one go
    assert "".join(pieces) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"])
    with httpx.stream("POST", server.api_url + "/chat/completions", json={**body, "stream": True}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_seed_n_and_completions(server, client, engine):
    name = server.state.backend.name
    first = client.chat.completions.create(model=name, temperature=0, max_tokens=30, **ask()).choices[0]
    word = first.message.content.split()[2]
    cut = client.chat.completions.create(
        model=name, temperature=0, max_tokens=30, stop=[word], **ask()
    ).choices[0]
    assert cut.message.content == first.message.content[: first.message.content.find(word)].strip()
    assert cut.finish_reason == "stop"
    sampled = {"model": name, "temperature": 1.0, "top_p": 0.95, "max_tokens": 16, "seed": 7, **ask()}
    a = client.chat.completions.create(**sampled).choices[0].message.content
    assert client.chat.completions.create(**sampled).choices[0].message.content == a  # a seed repeats
    two = client.chat.completions.create(**sampled, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content != two.choices[1].message.content
    text = client.completions.create(model=name, prompt="The sky is", max_tokens=12, temperature=0)
    direct = engine.complete(["The sky is"], greedy(12))[0]
    assert text.choices[0].text == direct.text and text.usage.completion_tokens == direct.completion_tokens
    streamed = client.completions.create(
        model=name, prompt="The sky is", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == direct.text


def test_concurrent_requests_are_batched(server, client):
    name = server.state.backend.name
    batching = server.state.backend.engine
    assert type(batching).__name__ == "BatchingEngine"  # the in-process engine is served batched
    texts = {}

    def one(i):
        r = client.chat.completions.create(
            model=name, temperature=0, max_tokens=40, **ask(content=f"Count to {i}.")
        )
        texts[i] = r.choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(texts) == 6
    assert batching.stats.largest_batch > 1


# ---------------------------------------------------------------------------------------------
# Limits, keys, deadlines


def test_prompt_and_token_limits(engine):
    with served(engine, max_prompt_tokens=20, max_tokens=50) as s:
        s.wait_ready(60)
        name = s.state.backend.name
        long = httpx.post(s.api_url + "/chat/completions", json={"model": name, **ask(content="word " * 50)})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        many = httpx.post(
            s.api_url + "/chat/completions", json={"model": name, "max_tokens": 51, **ask(content="hi")}
        )
        assert many.status_code == 400 and many.json()["error"]["param"] == "max_tokens"
        assert "50" in many.json()["error"]["message"]


def test_api_keys(engine, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# client: key\nalice: sk-alice-1\nbob: sk-bob-2\n")
    log = tmp_path / "log.jsonl"
    with served(engine, api_keys_file=str(keys), request_log=str(log)) as s:
        s.wait_ready(60)
        url, name = s.api_url + "/chat/completions", s.state.backend.name
        none = httpx.post(url, json={"model": name, **ask()})
        assert none.status_code == 401 and none.json()["error"]["code"] == "missing_api_key"
        wrong = httpx.post(url, json={"model": name, **ask()}, headers={"authorization": "Bearer sk-eve"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert httpx.get(s.api_url + "/models").status_code == 401
        ok = openai.OpenAI(base_url=s.api_url, api_key="sk-bob-2").chat.completions.create(
            model=name, max_tokens=5, **ask()
        )
        assert ok.choices[0].message.content is not None
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["key_id"] for r in rows if r["status"] == 200] == ["bob"]
    assert {r["status"] for r in rows} == {200, 401}


def test_no_key_binds_loopback_only(engine, tmp_path):
    with pytest.raises(UserError, match="--insecure-no-auth"):
        ServeConfig(host="0.0.0.0", port=0)
    with served(engine, host="0.0.0.0", insecure_no_auth=True) as s:
        assert s.url.startswith("http://0.0.0.0:")
    bad = tmp_path / "keys.txt"
    bad.write_text("alice sk-1\n")
    with pytest.raises(UserError, match=rf"{bad}:1"):
        served(engine, api_keys_file=str(bad))
    result = run_cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2 and "--api-key" in result.stderr


def test_rate_limit_and_full_queue(engine, endless):
    with served(engine, rate_limit_rpm=2) as s:
        s.wait_ready(60)
        body = {"model": s.state.backend.name, "max_tokens": 2, **ask()}
        codes = [httpx.post(s.api_url + "/chat/completions", json=body).status_code for _ in range(2)]
        third = httpx.post(s.api_url + "/chat/completions", json=body)
        assert codes == [200, 200] and third.status_code == 429
        assert (
            int(third.headers["retry-after"]) >= 1 and third.json()["error"]["code"] == "rate_limit_exceeded"
        )
    with served(endless, max_queue=1, max_tokens=3000) as s:
        s.wait_ready(60)
        body = {"model": s.state.backend.name, "max_tokens": 3000, "stream": True, "temperature": 0, **ask()}
        with httpx.stream("POST", s.api_url + "/chat/completions", json=body) as long:
            lines = long.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            busy = httpx.post(s.api_url + "/chat/completions", json={**body, "stream": False})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "queue_full"
        assert wait_until(lambda: s.state.admission.running + s.state.admission.waiting == 0)
        assert (
            httpx.post(
                s.api_url + "/chat/completions", json={**body, "stream": False, "max_tokens": 2}
            ).status_code
            == 200
        )


def test_deadline(endless):
    # Greedy and unfiltered: a sampled answer of random words could now and then hit a rule
    # and end as content_filter instead (this test is about the deadline).
    with served(
        endless, request_timeout_s=0.3, max_tokens=3000, content_filter=FilterConfig(filter=False)
    ) as s:
        s.wait_ready(60)
        body = {"model": s.state.backend.name, "max_tokens": 3000, "temperature": 0, **ask()}
        late = httpx.post(s.api_url + "/chat/completions", json=body)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", s.api_url + "/chat/completions", json={**body, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert json.loads(events[-1][6:]).get("error", {}).get("code") == "timeout", events[-3:]
        assert wait_until(lambda: s.state.admission.running + s.state.admission.waiting == 0)
        assert wait_until(lambda: s.state.backend.engine.running == 0)


def test_a_client_that_disconnects_frees_its_slot_and_stops_the_engine(endless, tmp_path):
    with served(endless, request_log=str(tmp_path / "log.jsonl")) as s:
        s.wait_ready(60)
        batching = s.state.backend.engine
        body = {"model": s.state.backend.name, "max_tokens": 1000, "stream": True, "temperature": 0, **ask()}
        with httpx.stream("POST", s.api_url + "/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            assert batching.running == 1
        # the connection is closed: the server notices and the engine stops generating for it
        assert wait_until(lambda: batching.running == 0 and s.state.admission.running == 0, 3)
        assert wait_until(lambda: any(r["status"] == 499 for r in log_rows(s)))
        gone = [r for r in log_rows(s) if r["status"] == 499][-1]
        assert gone["finish_reason"] == "cancelled" and 0 < gone["completion_tokens"] < 1000


def test_health_is_503_while_loading(engine):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return engine

    with start(ServeConfig(port=0), engine=slow_load) as s:
        loading = httpx.get(s.url + "/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = httpx.post(s.api_url + "/chat/completions", json={"model": "x", **ask()})
        assert early.status_code == 503 and early.headers["retry-after"]
        gate.set()
        s.wait_ready(30)
        assert httpx.get(s.url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------------
# Monitoring


def test_request_log_and_metrics(server, client):
    name = server.state.backend.name
    before = len(log_rows(server))
    client.chat.completions.create(model=name, max_tokens=8, **ask(content="private words"))
    list(client.chat.completions.create(model=name, max_tokens=8, stream=True, **ask()))
    assert wait_until(lambda: len(log_rows(server)) == before + 2)  # written as each request settles
    last = next(r for r in log_rows(server)[before:] if r["stream"])
    assert last["stream"] is True and last["status"] == 200 and last["key_id"] == "anonymous"
    for field in ("time", "model", "prompt_tokens", "completion_tokens", "queue_s", "ttft_s", "latency_s"):
        assert field in last, field
    assert last["ttft_s"] <= last["latency_s"]
    assert "private words" not in Path(server.config.request_log).read_text()  # no text without --log-text
    text = httpx.get(server.url + "/metrics").text
    assert 'alpaca_forge_requests_total{endpoint="chat/completions",status="200"}' in text
    for name_ in (
        "alpaca_forge_time_to_first_token_seconds_bucket",
        "alpaca_forge_inter_token_seconds_bucket",
        "alpaca_forge_request_seconds_bucket",
        "alpaca_forge_queue_depth",
        "alpaca_forge_running_requests",
        "alpaca_forge_completion_tokens_total",
    ):
        assert name_ in text, name_
    assert f'fingerprint="{server.state.backend.fingerprint}"' in text


def test_log_text(engine, tmp_path):
    log = tmp_path / "log.jsonl"
    with served(engine, request_log=str(log), log_text=True) as s:
        s.wait_ready(60)
        r = httpx.post(
            s.api_url + "/chat/completions", json={"model": s.state.backend.name, "max_tokens": 4, **ask()}
        )
    row = json.loads(log.read_text().splitlines()[-1])
    assert row["prompt"] == [{"role": "user", "content": "Name three colours."}]
    assert row["answer"] == r.json()["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------------------------
# The content filter


def test_a_blocked_prompt_gets_a_refusal_and_never_reaches_the_engine(server, client):
    name = server.state.backend.name
    runs = server.state.backend.engine.stats.rows
    r = client.chat.completions.create(model=name, **ask(content="How do I make a pipe bomb at home?"))
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter"
    assert choice.message.content.startswith("Sorry, I can't help with that.")
    assert r.model_extra["content_filter"]["stage"] == "input"
    category = r.model_extra["content_filter"]["categories"][0]
    assert category in choice.message.content
    assert server.state.backend.engine.stats.rows == runs
    stream = list(
        client.chat.completions.create(model=name, stream=True, **ask(content="how to make a pipe bomb"))
    )
    assert stream[-1].choices[0].finish_reason == "content_filter"
    text = httpx.get(server.url + "/metrics").text
    assert f'alpaca_forge_filter_hits_total{{category="{category}",source="rules",stage="input"}}' in text
    history = client.chat.completions.create(
        model=name, max_tokens=4, temperature=0, **ask(content="What is the history of dynamite?")
    )
    assert history.choices[0].finish_reason != "content_filter"


def test_streamed_output_is_checked_as_it_goes(engine, tmp_path):
    """A rule that hits a word in the middle of the tiny model's answer ends the stream there."""
    answer = engine.chat([[Message("user", "Name three colours.")]], greedy(40))[0].text
    words = answer.split()
    word = max(words[len(words) // 2 :], key=len)
    rules = tmp_path / "rules.yaml"
    quoted = "'" + re.escape(word).replace("'", "''") + "'"  # YAML single quotes keep backslashes
    rules.write_text(f"categories:\n  test-word:\n    - {quoted}\n")
    with served(engine, content_filter=FilterConfig(filter_rules=str(rules))) as s:
        s.wait_ready(60)
        c = openai.OpenAI(base_url=s.api_url, api_key="-")
        body = {
            "model": s.state.backend.name,
            "temperature": 0,
            "max_tokens": 40,
            "extra_body": {"repetition_penalty": 1.0},
        }
        chunks = list(c.chat.completions.create(stream=True, **body, **ask()))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert chunks[-1].model_extra["content_filter"] == {
            "flagged": True,
            "stage": "output",
            "source": "rules",
            "categories": ["test-word"],
        }
        before_hit = answer[: answer.find(word)]
        assert text.startswith(before_hit.strip()[:10]) and "(content filter: test-word)" in text
        assert word not in text.replace("test-word", "")
        whole = c.chat.completions.create(**body, **ask())
        assert whole.choices[0].finish_reason == "content_filter"
        assert wait_until(lambda: s.state.backend.engine.running == 0)


def test_moderations_endpoint(server):
    r = httpx.post(
        server.api_url + "/moderations", json={"input": ["How do I make a pipe bomb?", "Hello there"]}
    )
    results = r.json()["results"]
    assert [x["flagged"] for x in results] == [True, False]
    assert any(results[0]["categories"].values()) and not any(results[1]["categories"].values())


# ---------------------------------------------------------------------------------------------
# Gateway: the safeguards in front of another OpenAI-compatible server (here, a second serve)


def test_gateway_in_front_of_a_second_serve(server, engine, tmp_path, monkeypatch):
    name = server.state.backend.name
    monkeypatch.setenv("UPSTREAM_KEY", "unused")
    log = tmp_path / "gateway.jsonl"
    cfg = ServeConfig(
        port=0,
        api_key=("sk-gateway",),
        request_log=str(log),
        served_model_name="alpaca-gateway",
        max_tokens=5000,  # more than the server behind allows, so that one's 400 is what comes back
        engine=EngineConfig(engine="openai", base_url=server.api_url, model=name, api_key_env="UPSTREAM_KEY"),
    )
    with start(cfg) as gw:
        gw.wait_ready(30)
        c = openai.OpenAI(base_url=gw.api_url, api_key="sk-gateway", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["alpaca-gateway"]
        body = {"temperature": 0, "max_tokens": 20, **ask()}
        through = c.chat.completions.create(model="alpaca-gateway", **body)
        direct = openai.OpenAI(base_url=server.api_url, api_key="-").chat.completions.create(
            model=name, **body
        )
        assert through.choices[0].message.content == direct.choices[0].message.content
        assert through.usage.completion_tokens == direct.usage.completion_tokens
        assert through.system_fingerprint != direct.system_fingerprint
        streamed = c.chat.completions.create(model="alpaca-gateway", stream=True, **body)
        assert (
            "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
            == direct.choices[0].message.content
        )
        blocked = c.chat.completions.create(model="alpaca-gateway", **ask(content="how to make a pipe bomb"))
        assert blocked.choices[0].finish_reason == "content_filter"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gw.api_url, api_key="sk-wrong", max_retries=0).models.list()
        bad = httpx.post(
            gw.api_url + "/chat/completions",
            json={"model": "alpaca-gateway", "max_tokens": 5000, **ask()},
            headers={"authorization": "Bearer sk-gateway"},
        )
        assert bad.status_code == 400  # over the upstream's --max-tokens: its 400 comes back as ours
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["key_id"] for r in rows} == {"default"} and rows[0]["model"] == "alpaca-gateway"


# ---------------------------------------------------------------------------------------------
# The command line


def test_serve_help_explains_every_flag():
    r = run_cli("serve", "--help")
    assert r.returncode == 0
    for flag in (
        "--api-key",
        "--api-keys-file",
        "--max-queue",
        "--rate-limit-rpm",
        "--filter-rules",
        "--judge-model",
    ):
        assert flag in r.stdout


def test_the_command_serves_until_sigterm(tiny_model_dir, tmp_path):
    """The real console script: /health goes 503 -> 200 while it loads, it answers, and SIGTERM
    stops it cleanly (exit 0, a summary line)."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import CLI

    log = tmp_path / "requests.jsonl"
    proc = subprocess.Popen(
        [str(CLI), "serve", "--model", str(tiny_model_dir), "--port", "0", "--request-log", str(log)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        url = None
        for line in proc.stderr:
            sys.stderr.write(line)
            m = re.search(r"listening on (http://\S+?) ", line)
            if m:
                url = m.group(1)
                break
        assert url, "the server never said where it listens"
        health = [httpx.get(url + "/health").status_code]
        assert wait_until(
            lambda: health.append(httpx.get(url + "/health").status_code) or health[-1] == 200, 60
        )
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        assert name == tiny_model_dir.name
        r = httpx.post(url + "/v1/chat/completions", json={"model": name, "max_tokens": 5, **ask()})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(30) == 0, rest
        assert "served 1 request " in rest and "Traceback" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(log.read_text().splitlines()[-1])["status"] == 200


class KeywordJudge:
    """An Engine that judges like a Llama-Guard model would, by a keyword: `unsafe` + category
    for any prompt that carries it, `safe` otherwise (served over HTTP below, as a judge model
    on another machine would be)."""

    name, format_name, multi_turn = "keyword-judge", "chat", True

    def __init__(self, keyword: str, category: str):
        self.keyword, self.category, self.asked = keyword, category, 0

    def _judge(self, text: str):
        from alpaca_forge.engines import Completion, FinishReason

        self.asked += 1
        verdict = f"unsafe\n{self.category}" if self.keyword in text else "safe"
        return Completion(verdict, FinishReason.STOP, 10, 2)

    def chat(self, conversations, settings):
        return [self._judge(c[-1].content) for c in conversations]

    def complete(self, prompts, settings):
        return [self._judge(p) for p in prompts]

    def stream(self, conversation, settings):
        raise NotImplementedError

    def close(self):
        pass


def test_external_moderation_and_an_llm_judge_guard_the_server(engine, tmp_path):
    """Layers 2 and 3: a moderation API (here a second serve's own /v1/moderations, with a rule the
    first lacks) and a judge model behind an OpenAI-compatible server."""
    from openai_server import LoopbackServer

    rules = tmp_path / "moderator.yaml"
    rules.write_text("categories:\n  secret_project:\n    - '\\bproject\\s+nightingale\\b'\n")
    judge = KeywordJudge("purple elephant", "violent_threats")
    with (
        served(engine, content_filter=FilterConfig(filter_rules=str(rules))) as moderator,
        LoopbackServer(judge, model="guard") as judge_url,
    ):
        moderator.wait_ready(60)
        cfg = FilterConfig(
            moderation_url=moderator.api_url + "/moderations", judge_model="guard", judge_base_url=judge_url
        )
        with served(engine, content_filter=cfg) as s:
            s.wait_ready(60)
            c = openai.OpenAI(base_url=s.api_url, api_key="-", max_retries=0)
            name = s.state.backend.name

            def blocked_by(content: str):
                r = c.chat.completions.create(model=name, max_tokens=4, **ask(content=content))
                return r.model_extra.get("content_filter"), r.choices[0].finish_reason

            info, finish = blocked_by("Tell me about Project Nightingale.")
            assert finish == "content_filter" and info["source"] == "moderation_url"
            assert info["categories"] == ["secret_project"]
            info, finish = blocked_by("A purple elephant walks in.")
            assert finish == "content_filter" and (info["source"], info["categories"]) == (
                "judge",
                ["violent_threats"],
            )
            asked = judge.asked
            info, finish = blocked_by("Name three colours.")
            assert info is None and finish in ("stop", "length")
            assert judge.asked > asked  # the judge read the prompt (and the answer) and let them pass
            results = httpx.post(s.api_url + "/moderations", json={"input": "project nightingale"}).json()
            assert results["results"][0]["flagged"] is True


def test_curl_works_unchanged(server):
    """The README's curl lines, run by curl itself: a JSON answer, and a stream ending in [DONE]."""
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed on this machine")
    # Greedy, so the tiny model cannot sample its end-of-text before the 6 tokens counted below.
    body = json.dumps({"model": server.state.backend.name, "max_tokens": 6, "temperature": 0, **ask()})
    url = server.api_url + "/chat/completions"
    args = ["curl", "-sS", url, "-H", "content-type: application/json", "-d"]
    whole = subprocess.run([*args, body], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(whole.stdout)["usage"]["completion_tokens"] == 6
    streamed = subprocess.run(
        ["curl", "-sSN", url, "-H", "content-type: application/json", "-d", body[:-1] + ', "stream": true}'],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert streamed.stdout.rstrip().endswith("data: [DONE]") and streamed.stdout.count("data: {") >= 3


def test_without_keys_only_loopback_names_and_origins_are_answered(server):
    """DNS rebinding (a page on another site whose name resolves to 127.0.0.1) and cross-site
    fetches cannot use a server that has no API key."""
    body = {"model": server.state.backend.name, "max_tokens": 2, **ask()}
    url = server.api_url + "/chat/completions"
    rebound = httpx.post(url, json=body, headers={"host": "evil.example:8000"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    cross = httpx.post(url, json=body, headers={"origin": "https://evil.example"})
    assert cross.status_code == 403 and cross.json()["error"]["code"] == "origin_not_allowed"
    same = httpx.post(url, json=body, headers={"origin": server.url, "host": "localhost"})
    assert same.status_code == 200


def test_a_vanishing_temperature_is_greedy_not_a_crash(server, engine):
    body = {"model": server.state.backend.name, "max_tokens": 12, "temperature": 1e-320, **ask()}
    r = httpx.post(server.api_url + "/chat/completions", json=body)
    assert r.status_code == 200, r.text
    greedy_answer = httpx.post(server.api_url + "/chat/completions", json={**body, "temperature": 0}).json()
    assert r.json()["choices"][0]["message"]["content"] == greedy_answer["choices"][0]["message"]["content"]
