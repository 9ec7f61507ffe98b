"""Everything a careless or hostile client can send gets the right status and a clear message in
OpenAI's error shape, while a good stream running at the same time completes untouched."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from alpaca_forge.engines.transformers_engine import TransformersEngine
from alpaca_forge.serve import ServeConfig, start

pytestmark = pytest.mark.integration

KEY = "sk-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from alpaca_forge import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    lm.model.generation_config.suppress_tokens = [
        lm.tokenizer.eos_token_id
    ]  # the good stream runs its length
    cfg = ServeConfig(port=0, api_key=(KEY,), body_timeout_s=1.0, max_tokens=1000)
    with start(cfg, engine=TransformersEngine(lm)) as s:
        yield s.wait_ready(60)


def _good(name: str, **kw) -> dict:
    return {"model": name, "messages": [{"role": "user", "content": "Say something."}], **kw}


def _cases(name: str) -> list[tuple[str, dict, int, str]]:
    """(what, request, expected status, a fragment of the message). `request` holds `json` or
    raw `content`, and optional `headers` (the key is added unless given)."""
    good = _good(name)
    msg = [{"role": "user", "content": "hi"}]
    return [
        ("invalid JSON", {"content": b'{"model": "x", "messages": ['}, 400, "not valid JSON"),
        ("invalid UTF-8", {"content": b'{"model": "\xff\xfe"}'}, 400, "not valid UTF-8"),
        ("empty body", {"content": b""}, 400, "empty"),
        ("not an object", {"json": [1, 2, 3]}, 400, "JSON object"),
        ("deeply nested", {"content": b"[" * 200_000 + b"]" * 200_000}, 400, "nests too deeply"),
        ("wrong types", {"json": {"model": 5, "messages": "hi"}}, 400, "model"),
        ("missing messages", {"json": {"model": name}}, 400, "messages: Field required"),
        ("empty messages", {"json": {"model": name, "messages": []}}, 400, "messages"),
        (
            "unknown role",
            {"json": {"model": name, "messages": [{"role": "wizard", "content": "x"}]}},
            400,
            "messages[0].role",
        ),
        (
            "no user message",
            {"json": {"model": name, "messages": [{"role": "system", "content": "x"}]}},
            400,
            "role 'user'",
        ),
        (
            "image content",
            {"json": {"model": name, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}},
            400,
            "messages[0].content",
        ),
        (
            "ends with the assistant",
            {"json": {"model": name, "messages": [*msg, {"role": "assistant", "content": "x"}]}},
            400,
            "must end with",
        ),
        (
            "a 5,000-digit number",
            {"content": b'{"model": "x", "seed": 1' + b"0" * 5000 + b"}"},
            400,
            "cannot be read",
        ),
        (
            "prompts x n over the queue",
            {"json": {"model": name, "prompt": ["a"] * 32, "n": 8}, "path": "/completions"},
            400,
            "answers",
        ),
        ("10,000 messages", {"json": {"model": name, "messages": msg * 10_000}}, 400, "at most 1024"),
        ("unknown model", {"json": {**good, "model": "gpt-7"}}, 404, "does not exist"),
        ("missing key", {"json": good, "headers": {}}, 401, "API key"),
        ("wrong key", {"json": good, "headers": {"authorization": "Bearer sk-nope"}}, 401, "not valid"),
        ("negative max_tokens", {"json": {**good, "max_tokens": -5}}, 400, "max_tokens"),
        ("absurd max_tokens", {"json": {**good, "max_tokens": 10**12}}, 400, "max_tokens"),
        ("temperature too high", {"json": {**good, "temperature": 9}}, 400, "temperature"),
        ("temperature a string", {"json": {**good, "temperature": "hot"}}, 400, "temperature"),
        ("top_p zero", {"json": {**good, "top_p": 0}}, 400, "top_p"),
        ("top_p above 1", {"json": {**good, "top_p": 1.5}}, 400, "top_p"),
        ("1,000 stop strings", {"json": {**good, "stop": [f"s{i}" for i in range(1000)]}}, 400, "stop"),
        ("n too large", {"json": {**good, "n": 1000}}, 400, "n"),
        ("negative seed", {"json": {**good, "seed": -1}}, 400, "seed"),
        ("frequency penalty", {"json": {**good, "frequency_penalty": 1.5}}, 400, "not supported"),
        ("50 MB body", {"content": b'{"model": "' + b"x" * 50_000_000 + b'"}'}, 413, "at most"),
        (
            "completions: prompt list too long",
            {"json": {"model": name, "prompt": ["a"] * 500}, "path": "/completions"},
            400,
            "prompt",
        ),
        (
            "completions: echo",
            {"json": {"model": name, "prompt": "a", "echo": True}, "path": "/completions"},
            400,
            "echo",
        ),
        ("moderations: no input", {"json": {}, "path": "/moderations"}, 400, "input"),
        ("unknown endpoint", {"json": good, "path": "/engines/davinci"}, 404, "no such endpoint"),
    ]


def _send(client: httpx.Client, base: str, request: dict) -> httpx.Response:
    headers = request.get("headers", AUTH)
    url = base + request.get("path", "/chat/completions")
    if "json" in request:
        return client.post(url, json=request["json"], headers=headers)
    return client.post(
        url, content=request["content"], headers={**headers, "content-type": "application/json"}
    )


def _half_request(host: str, port: int) -> bytes:
    """Headers promising 1,000 bytes of body, 10 sent, then silence: the server must give up."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {KEY}\r\ncontent-length: 1000\r\n\r\n".encode()
            + b'{"model": '
        )
        reply = b""
        while chunk := s.recv(65536):  # the server answers, then closes the connection
            reply += chunk
        return reply


def test_bad_requests_while_a_good_stream_runs(server):
    name = server.state.backend.name
    good_stream: dict = {}

    def stream_one() -> None:
        c = openai.OpenAI(base_url=server.api_url, api_key=KEY, max_retries=0)
        chunks = list(
            c.chat.completions.create(
                **_good(name, max_tokens=1000, temperature=0),
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        good_stream["usage"], good_stream["ended"] = chunks[-1].usage, time.perf_counter()
        good_stream["finish"] = [
            ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason
        ]

    runner = threading.Thread(target=stream_one)
    runner.start()
    host, port = server.url.removeprefix("http://").split(":")
    half: dict = {}
    hanger = threading.Thread(target=lambda: half.setdefault("reply", _half_request(host, int(port))))
    hanger.start()
    failures = []
    first_answered = None
    with httpx.Client(timeout=30) as client:
        for what, request, status, fragment in _cases(name):
            try:
                r = _send(client, server.api_url, request)
                first_answered = first_answered or time.perf_counter()
            except httpx.HTTPError as e:
                failures.append(f"{what}: {type(e).__name__}: {e}")
                continue
            try:
                err = r.json()["error"]
            except (json.JSONDecodeError, KeyError, TypeError):
                failures.append(f"{what}: {r.status_code} not OpenAI's error shape: {r.text[:200]}")
                continue
            if (
                r.status_code != status
                or fragment not in err["message"]
                or set(err) != {"message", "type", "param", "code"}
            ):
                failures.append(f"{what}: want {status} with {fragment!r}, got {r.status_code} {err}")
    hanger.join(15)
    runner.join(120)
    assert not failures, "\n".join(failures)
    assert b" 408 " in half["reply"].split(b"\r\n")[0] and b"did not arrive" in half["reply"]
    assert good_stream["finish"] == ["length"] and good_stream["usage"].completion_tokens == 1000
    assert good_stream["ended"] > first_answered  # the bad requests came while it ran
    assert server.state.admission.running == server.state.admission.waiting == 0
    after = openai.OpenAI(base_url=server.api_url, api_key=KEY).chat.completions.create(
        **_good(name, max_tokens=4)
    )
    assert after.choices[0].message.content is not None
