"""Attacks on `alpaca-forge serve`, each sent over real HTTP to a server on loopback: another
site's page (a sandboxed frame's `Origin: null`, a DNS-rebinding `Host`) on every route of a
server without keys, a lone surrogate in every text field, a request log others could read, and a
client that drops a non-streamed request to hold its queue slot."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time

import httpx
import pytest

from alpaca_forge.engines.transformers_engine import TransformersEngine
from alpaca_forge.serve import ServeConfig, start
from test_serve import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def server(tiny_lm, tmp_path_factory):
    log = tmp_path_factory.mktemp("attacks") / "requests.jsonl"
    with start(
        ServeConfig(port=0, request_log=str(log), log_text=True), engine=TransformersEngine(tiny_lm)
    ) as s:
        yield s.wait_ready(60)


def ask(name: str, **kw) -> dict:
    return {"model": name, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}], **kw}


def every_route(server) -> list[tuple[str, str, dict | None]]:
    """(method, path, JSON body) of each route, with a request it would answer."""
    name = server.state.backend.name
    return [
        ("POST", "/v1/chat/completions", ask(name)),
        ("POST", "/v1/completions", {"model": name, "prompt": "Hi", "max_tokens": 2}),
        ("POST", "/v1/moderations", {"input": "Hello there"}),
        ("GET", "/v1/models", None),
        ("GET", "/health", None),
        ("GET", "/metrics", None),
        ("GET", "/", None),
        ("GET", "/static/app.js", None),
    ]


def test_every_route_answers_only_loopback_pages(server):
    """A DNS-rebinding page sends its own Host; a sandboxed frame of any site sends `Origin: null`;
    either gets the same 403 on every route as on the API (the metrics hold request counts, token
    totals, filter hits and the model's fingerprint)."""
    port = server.url.rpartition(":")[2]
    refused = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path, body in every_route(server):
            attacks = {
                "rebinding": ({"host": f"evil.example:{port}"}, "host_not_allowed"),
                "sandboxed frame": ({"origin": "null"}, "origin_not_allowed"),
                "other site": ({"origin": "https://evil.example"}, "origin_not_allowed"),
                "not http": ({"origin": "chrome-extension://abcdef"}, "origin_not_allowed"),
            }
            for what, (headers, code) in attacks.items():
                r = client.request(method, path, json=body, headers=headers)
                if r.status_code != 403 or r.json()["error"]["code"] != code:
                    refused.append(f"{what} on {method} {path}: {r.status_code} {r.text[:120]}")
            ok = client.request(method, path, json=body, headers={"origin": server.url, "host": "localhost"})
            assert ok.status_code == 200, (path, ok.text[:200])
            assert (
                client.request(method, path, json=body, headers={"host": f"[::1]:{port}"}).status_code == 200
            )
    assert not refused, "\n".join(refused)


def test_every_route_has_one_gate(server):
    from fastapi.routing import APIRoute

    from alpaca_forge.serve.app import gates_of, router

    routes = [r for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) == len(router.routes) == len(every_route(server))
    assert all(len(gates_of(r)) == 1 for r in routes)


def _surrogate_cases(name: str) -> list[tuple[str, str, dict]]:
    """(path, the field, a request with a lone surrogate there): every field a request model
    reads as text, and one it ignores."""
    bad = "x\ud800y"
    msg = {"role": "user", "content": "Hi."}
    chat = [
        ("messages[0].content", ask(name, messages=[{"role": "user", "content": bad}])),
        (
            "messages[0].content[0].text",
            ask(name, messages=[{"role": "user", "content": [{"type": "text", "text": bad}]}]),
        ),
        (
            "messages[0].content[0].type",
            ask(name, messages=[{"role": "user", "content": [{"type": bad, "text": "Hi."}]}]),
        ),
        ("messages[0].name", ask(name, messages=[{**msg, "name": bad}])),
        ("messages[0].role", ask(name, messages=[{**msg, "role": bad}])),
        (
            "messages[2].content",
            ask(name, messages=[{"role": "system", "content": "Be kind."}, msg, {**msg, "content": bad}]),
        ),
        ("model", ask(bad)),
        ("stop", ask(name, stop=bad)),
        ("stop[1]", ask(name, stop=["ok", bad])),
        ("user", ask(name, user=bad)),
        ("metadata.note", ask(name, metadata={"note": bad})),  # a field we ignore
        ("x\\udc00", {**ask(name), "x\udc00": 1}),  # and a key
    ]
    text = {"model": name, "prompt": "Hi", "max_tokens": 2}
    completions = [
        ("prompt", {**text, "prompt": bad}),
        ("prompt[1]", {**text, "prompt": ["Hi", bad]}),
        ("model", {**text, "model": bad}),
        ("stop", {**text, "stop": bad}),
        ("user", {**text, "user": bad}),
    ]
    moderations = [
        ("input", {"input": bad}),
        ("input[1]", {"input": ["Hi", bad]}),
        ("model", {"input": "Hi", "model": bad}),
    ]
    return (
        [("/chat/completions", *c) for c in chat]
        + [("/completions", *c) for c in completions]
        + [("/moderations", *c) for c in moderations]
    )


def test_a_lone_surrogate_in_any_text_field_is_a_400(server, caplog):
    """Sent as the raw JSON escape `\\ud800` (UTF-8 cannot carry it): a 400 that names the field,
    never a 500 with a logged traceback."""
    wrong = []
    with caplog.at_level(logging.ERROR, logger="alpaca_forge"), httpx.Client(timeout=30) as client:
        for path, field, body in _surrogate_cases(server.state.backend.name):
            raw = json.dumps(body).encode()  # ensure_ascii: the surrogate goes as its escape
            assert b"\\ud800" in raw or b"\\udc00" in raw
            r = client.post(server.api_url + path, content=raw, headers={"content-type": "application/json"})
            err = r.json().get("error") or {}
            if (
                r.status_code != 400
                or err.get("param") != field
                or "lone UTF-16 surrogate" not in err["message"]
            ):
                wrong.append(f"{path} {field}: {r.status_code} {err}")
    assert not wrong, "\n".join(wrong)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    paired = ask(server.state.backend.name, messages=[{"role": "user", "content": "\U0001f999 llama"}])
    r = httpx.post(
        server.api_url + "/chat/completions",
        content=json.dumps(paired).encode(),  # a surrogate pair, as JSON escapes it: one character
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200, r.text


def test_the_request_log_is_readable_by_its_owner_only(server, tiny_lm, tmp_path, caplog):
    """It holds every prompt with --log-text: created 0600 whatever the umask, and one that
    exists readable by others is narrowed to 0600, with a warning."""
    path = server.config.request_log
    httpx.post(server.api_url + "/chat/completions", json=ask(server.state.backend.name))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    old = tmp_path / "old.jsonl"
    old.write_text("")
    old.chmod(0o644)
    with (
        caplog.at_level(logging.WARNING, logger="alpaca_forge"),
        start(
            ServeConfig(port=0, request_log=str(old), log_text=True), engine=TransformersEngine(tiny_lm)
        ) as s,
    ):
        s.wait_ready(60)
        assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert any("readable by others" in rec.getMessage() for rec in caplog.records)


@pytest.fixture(scope="module")
def endless(tiny_model_dir):
    """The tiny model, never ending an answer early (EOS suppressed): every answer is max_tokens long."""
    from alpaca_forge import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    lm.model.generation_config.suppress_tokens = [lm.tokenizer.eos_token_id]
    return TransformersEngine(lm)


def _gauges(server) -> dict[str, float]:
    """The in-flight gauges of /metrics: requests queued, and being generated."""
    text = httpx.get(server.url + "/metrics").text
    names = ("alpaca_forge_queue_depth", "alpaca_forge_running_requests")
    return {
        n: float(line.split()[1]) for line in text.splitlines() for n in names if line.startswith(n + " ")
    }


def test_a_dropped_plain_request_frees_its_slot_at_once(endless, tmp_path):
    """A client sends a non-streamed request and closes its socket before the answer: the server
    must cancel the generation and free the request's place in a queue of one at once, not when
    --request-timeout-s runs out (a client that drops requests in a loop would lock others out)."""
    log = tmp_path / "requests.jsonl"
    with start(
        ServeConfig(port=0, max_queue=1, max_tokens=3000, request_timeout_s=120, request_log=str(log)),
        engine=endless,
    ) as s:
        s.wait_ready(60)
        name, admission, batching = s.state.backend.name, s.state.admission, s.state.backend.engine
        body = json.dumps({**ask(name), "max_tokens": 3000, "temperature": 0, "stream": False}).encode()
        host, _, port = s.url.removeprefix("http://").rpartition(":")
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            # generating: its first token came (a place counts as running from then)
            assert wait_until(lambda: batching.running == 1 and admission.running == 1, 30)
            assert _gauges(s)["alpaca_forge_running_requests"] == 1
        # the socket is closed; 3,000 tokens take the tiny model far longer than this
        assert wait_until(lambda: admission.running + admission.waiting == 0, 5), "the slot is still held"
        assert wait_until(lambda: batching.running == 0, 5), "the engine still generates for nobody"
        assert _gauges(s) == {"alpaca_forge_queue_depth": 0, "alpaca_forge_running_requests": 0}
        started = time.monotonic()
        after = httpx.post(s.api_url + "/chat/completions", json={**ask(name), "max_tokens": 2}, timeout=60)
        assert after.status_code == 200, after.text
        assert time.monotonic() - started < 30
        rows = lambda: [json.loads(line) for line in log.read_text().splitlines()]  # noqa: E731
        assert wait_until(lambda: any(r["status"] == 499 for r in rows()), 5)
        gone = next(r for r in rows() if r["status"] == 499)
        assert gone["stream"] is False and gone["finish_reason"] == "cancelled"
        assert 0 < gone["completion_tokens"] < 3000


@pytest.fixture(autouse=True, scope="module")
def usual_umask():
    """Files are created as under most logins (0644 unless the code asks for less)."""
    before = os.umask(0o022)
    yield
    os.umask(before)
