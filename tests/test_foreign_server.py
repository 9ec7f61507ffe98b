"""The HTTP engine and `serve --engine openai` against a server nobody here wrote: llama.cpp's own
OpenAI-compatible server (`python -m llama_cpp.server`, llama-cpp-python's `server` extra), on the
tiny model's f32 GGUF, with the official `openai` SDK as the client of our gateway.

Every member the `Engine` protocol declares is called on the HTTP engine pointed at that server:
what the refactor of the protocol (stream_prompt as one piece, identity, upstream, no token
counting on our side) must keep working against a real one, not only against our own fake.
"""

from __future__ import annotations

import openai
import pytest

from alpaca_forge import GenerationSettings, Message
from alpaca_forge.engines import Engine, EngineConfig, FinishReason, open_engine
from alpaca_forge.serve import ServeConfig, start
from llama_server import NEEDS_SERVER
from llama_server import llama_server as start_llama_server

pytestmark = [
    pytest.mark.integration,
    pytest.mark.llamacpp,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    NEEDS_SERVER,
]

GREEDY = GenerationSettings(max_new_tokens=8, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def llama_server(tiny_gguf):
    """llama.cpp's server on loopback, serving the tiny model as `tiny`; its API base."""
    with start_llama_server(tiny_gguf, "tiny") as base:
        yield base


def test_the_http_engine_keeps_the_whole_protocol_against_llama_cpps_server(llama_server):
    engine = open_engine(EngineConfig(engine="openai", base_url=llama_server, model="tiny"))
    try:
        assert isinstance(engine, Engine) and engine.upstream
        assert engine.identity().digest is None and engine.count_tokens("hello", chat=False) is None
        assert engine.render([Message.from_record("Hi")], 8) is None

        (done,) = engine.complete(["the cat sat on the mat"], GREEDY)
        assert done.completion_tokens == 8 and done.finish_reason == FinishReason.LENGTH and done.text

        (chat,) = engine.chat([[Message.from_record("What is the capital of France?")]], GREEDY)
        assert chat.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) and chat.completion_tokens >= 1

        stream = engine.stream([Message.from_record("What is the capital of France?")], GREEDY)
        assert "".join(stream) == chat.text and stream.completion.completion_tokens == chat.completion_tokens

        whole = engine.stream_prompt("the cat sat on the mat", GREEDY)
        assert list(whole) == [done.text] and whole.completion.completion_tokens == 8
        assert whole.queue_s is None and engine.last_retries == 0
    finally:
        engine.close()


def test_our_gateway_in_front_of_llama_cpps_server_answers_the_openai_sdk(llama_server, monkeypatch):
    monkeypatch.setenv("UPSTREAM_KEY", "unused")
    cfg = ServeConfig(
        port=0,
        api_key=("sk-gateway",),
        served_model_name="tiny-gateway",
        engine=EngineConfig(engine="openai", base_url=llama_server, model="tiny", api_key_env="UPSTREAM_KEY"),
    )
    body = {
        "temperature": 0,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Name three colours."}],
    }
    direct = openai.OpenAI(base_url=llama_server, api_key="-", max_retries=0).chat.completions.create(
        model="tiny", **body
    )
    # the answer as a user reads it: without the space the Alpaca template leaves after "### Response:"
    answer = direct.choices[0].message.content.strip()
    with start(cfg) as gw:
        gw.wait_ready(30)
        client = openai.OpenAI(base_url=gw.api_url, api_key="sk-gateway", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-gateway"]
        through = client.chat.completions.create(model="tiny-gateway", **body)
        assert through.choices[0].message.content == answer
        assert through.usage.completion_tokens == direct.usage.completion_tokens
        streamed = client.chat.completions.create(model="tiny-gateway", stream=True, **body)
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
        assert text == answer
        raw = client.completions.create(
            model="tiny-gateway", prompt="the cat sat", max_tokens=4, temperature=0
        )
        assert raw.usage.completion_tokens == 4
        blocked = client.chat.completions.create(
            model="tiny-gateway", messages=[{"role": "user", "content": "how to make a pipe bomb"}]
        )
        assert blocked.choices[0].finish_reason == "content_filter"
