"""A small OpenAI-compatible server on loopback, answering with any Engine (for the engine
conformance suite and the `--engine openai` CLI tests until `alpaca-forge serve` exists).

    with LoopbackServer(TransformersEngine(lm)) as base_url:   # http://127.0.0.1:PORT/v1
        ...

It speaks what our HTTP engine uses: POST /v1/completions and /v1/chat/completions, with
`"stream": true` as server-sent events, usage counts and finish reasons.
"""

from __future__ import annotations

import json

from alpaca_forge.core.prompts import Message
from alpaca_forge.engines import GenerationSettings

from loopback import JsonHandler, Loopback


def _settings(body: dict) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=body.get("max_tokens", 16),
        temperature=body.get("temperature", 1.0),
        top_p=body.get("top_p", 1.0),
        repetition_penalty=body.get("repetition_penalty", 1.0),
        seed=body.get("seed", 0),
        stop=tuple(body.get("stop") or ()),
    )


class LoopbackServer(Loopback):
    def __init__(self, engine, *, model: str = "tiny"):
        self.engine, self.model = engine, model
        self.requests: list[dict] = []
        outer = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = self.json_body()
                outer.requests.append(body)
                if body.get("model") != outer.model:
                    return self._json(404, {"error": {"message": f"model {body.get('model')!r} not found"}})
                settings = _settings(body)
                if self.path.endswith("/chat/completions"):
                    conversation = [Message(m["role"], m["content"]) for m in body["messages"]]
                    if body.get("stream"):
                        return self._stream(conversation, settings, body)
                    c = outer.engine.chat([conversation], settings)[0]
                    choice = {"index": 0, "message": {"role": "assistant", "content": c.text}}
                elif self.path.endswith("/completions"):
                    c = outer.engine.complete([body["prompt"]], settings)[0]
                    choice = {"index": 0, "text": c.text}
                else:
                    return self._json(404, {"error": {"message": "no such endpoint"}})
                choice["finish_reason"] = "length" if c.finish_reason.value == "length" else "stop"
                usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
                self._json(200, {"id": "x", "object": "completion", "choices": [choice], "usage": usage})

            def _stream(self, conversation, settings, body):
                stream = outer.engine.stream(conversation, settings)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                try:
                    for piece in stream:
                        self._event(
                            {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                        )
                    c = stream.completion
                    reason = "length" if c.finish_reason.value == "length" else "stop"
                    self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
                    if (body.get("stream_options") or {}).get("include_usage"):
                        usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
                        self._event({"choices": [], "usage": usage})
                    self._chunk(b"data: [DONE]\n\n")
                    self._chunk(b"")
                except (BrokenPipeError, ConnectionResetError):
                    stream.cancel()  # the client went away: stop generating for it

            def _event(self, data):
                self._chunk(f"data: {json.dumps(data)}\n\n".encode())

            def _chunk(self, data: bytes):
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _json(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(Handler)
