"""What `serve` gives a request that leaves sampling out (issue 22): the model's own
generation_config.json, as vLLM does, else serve's --default-* flags; a gateway sends nothing the
client left out, so the server behind applies its own. The real server on loopback, real HTTP,
the tiny random model saved with and without a generation config."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from alpaca_forge import UserError, load_model
from alpaca_forge.engines import GenerationSettings, SamplingDefaults
from alpaca_forge.engines.openai_http import OpenAIEngine
from alpaca_forge.engines.transformers_engine import TransformersEngine
from alpaca_forge.serve import ServeConfig, start

from openai_server import LoopbackServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # tiers: per test

EOS = 2  # the tiny tokenizer's </s>
SENT = ("temperature", "top_p", "max_tokens", "repetition_penalty", "seed")


@pytest.fixture(scope="module")
def configured(tiny_model_dir, tmp_path_factory):
    """The tiny model saved with a generation config its "authors" set: greedy, 7 tokens, no
    repetition penalty, EOS suppressed (so every answer runs its full length)."""
    folder = tmp_path_factory.mktemp("configured") / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": 1,
                "eos_token_id": EOS,
                "pad_token_id": 0,
                "do_sample": False,
                "temperature": 0.0,
                "max_new_tokens": 7,
                "repetition_penalty": 1.0,
                "suppress_tokens": [EOS],
            }
        )
    )
    return TransformersEngine(load_model(str(folder), device="cpu"))


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    """The tiny model as `save_model` wrote it (a generation config of ids only), EOS suppressed."""
    lm = load_model(str(tiny_model_dir), device="cpu")
    lm.model.generation_config.suppress_tokens = [EOS]
    return TransformersEngine(lm)


def chat(server, **fields) -> dict:
    body = {"model": server.state.backend.name, "messages": [{"role": "user", "content": "Hi there."}]}
    r = httpx.post(server.api_url + "/chat/completions", json={**body, **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def completion(server, **fields) -> dict:
    body = {"model": server.state.backend.name, "prompt": "The sky is"}
    r = httpx.post(server.api_url + "/completions", json={**body, **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def card(server) -> dict:
    return httpx.get(server.api_url + "/models").json()["data"][0]


@pytest.mark.integration
def test_a_request_without_settings_gets_the_models_generation_config(configured):
    assert configured.generation_defaults() == SamplingDefaults(
        temperature=0.0, repetition_penalty=1.0, max_new_tokens=7
    )
    with start(ServeConfig(port=0), engine=configured) as s:
        server = s.wait_ready(60)
        bare = chat(server)
        assert bare["usage"]["completion_tokens"] == 7 and bare["choices"][0]["finish_reason"] == "length"
        explicit = chat(server, temperature=0, max_tokens=7, repetition_penalty=1.0)
        assert [chat(server)["choices"][0]["message"]["content"] for _ in range(2)] == [
            explicit["choices"][0]["message"]["content"]
        ] * 2  # greedy, as the model's config says: the same answer every time
        assert completion(server)["usage"]["completion_tokens"] == 7  # not OpenAI's 16
        # the model sets no top_p: serve's default fills it
        assert card(server)["defaults"] == {
            "temperature": 0.0,
            "top_p": 0.9,
            "repetition_penalty": 1.0,
            "max_tokens": 7,
        }
        assert card(server)["generation_config"] == {
            "temperature": 0.0,
            "repetition_penalty": 1.0,
            "max_tokens": 7,
        }


@pytest.mark.integration
def test_settings_a_request_gives_override_the_models(configured):
    with start(ServeConfig(port=0), engine=configured) as s:
        server = s.wait_ready(60)
        assert chat(server, max_tokens=3)["usage"]["completion_tokens"] == 3
        assert chat(server, max_completion_tokens=4)["usage"]["completion_tokens"] == 4
        assert completion(server, max_tokens=5)["usage"]["completion_tokens"] == 5
        greedy = chat(server)["choices"][0]["message"]["content"]
        sampled = {
            chat(server, temperature=2.0, max_tokens=7, seed=k)["choices"][0]["message"]["content"]
            for k in range(6)
        }
        assert sampled - {greedy}  # temperature 2 samples: not the model's greedy answer every time


@pytest.mark.integration
def test_without_a_generation_config_serves_own_defaults_apply(plain):
    assert plain.generation_defaults() == SamplingDefaults()  # ids only: nothing the authors set
    cfg = ServeConfig(port=0, default_temperature=0, default_max_tokens=5, default_repetition_penalty=1.3)
    with start(cfg, engine=plain) as s:
        server = s.wait_ready(60)
        bare = chat(server)
        assert bare["usage"]["completion_tokens"] == 5
        explicit = chat(server, temperature=0, max_tokens=5, repetition_penalty=1.3)
        assert bare["choices"][0]["message"]["content"] == explicit["choices"][0]["message"]["content"]
        assert card(server)["defaults"] == {
            "temperature": 0.0,
            "top_p": 0.9,
            "repetition_penalty": 1.3,
            "max_tokens": 5,
        }
        assert card(server)["generation_config"] == {}
    with start(ServeConfig(port=0, max_tokens=4), engine=plain) as s:  # the default stays within the cap
        server = s.wait_ready(60)
        assert chat(server)["usage"]["completion_tokens"] == 4
        assert card(server)["defaults"]["max_tokens"] == 4


@pytest.mark.integration
def test_the_gateway_sends_nothing_the_client_left_out(plain):
    upstream = LoopbackServer(plain)  # records every request body it is sent
    with upstream as url, start(ServeConfig(port=0), engine=OpenAIEngine(url, "tiny")) as s:
        server = s.wait_ready(60)
        assert card(server)["defaults"] == {} and card(server)["generation_config"] == {}
        chat(server)
        completion(server)
        stream = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "Hi."}]}
        with httpx.stream("POST", server.api_url + "/chat/completions", json=stream, timeout=60) as r:
            assert r.status_code == 200 and [x for x in r.iter_lines() if x][-1] == "data: [DONE]"
        assert len(upstream.requests) == 3
        for body in upstream.requests:
            assert not set(SENT) & set(body), body  # the server behind applies its own defaults
        upstream.requests.clear()
        asked = {"temperature": 0.5, "top_p": 0.8, "max_tokens": 6, "repetition_penalty": 1.2, "seed": 3}
        chat(server, **asked)
        assert {k: upstream.requests[0].get(k) for k in SENT} == asked


@pytest.mark.unit
def test_model_values_out_of_range_are_left_out_not_a_failed_request():
    d = SamplingDefaults.from_values(
        {"temperature": 0.6, "top_p": 0.0, "repetition_penalty": "high", "max_new_tokens": 2.5}, "x"
    )
    assert d == SamplingDefaults(temperature=0.6)
    assert d.over(SamplingDefaults(top_p=0.9, temperature=1.0)) == SamplingDefaults(
        temperature=0.6, top_p=0.9
    )


@pytest.mark.unit
def test_settings_records_are_unchanged_unless_something_is_left_to_a_server():
    assert "left_to_server" not in GenerationSettings().to_dict()
    assert GenerationSettings(left_to_server=("seed",)).to_dict()["left_to_server"] == ["seed"]
    with pytest.raises(UserError, match="unknown settings"):
        GenerationSettings(left_to_server=("top_k",))
