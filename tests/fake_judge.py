"""A scripted LLM judge on loopback (an OpenAI-compatible chat endpoint): it reads the two
responses out of our judging prompt and answers as its `policy` says, so a test knows every
verdict in advance.

    with FakeJudge(lambda ask: "A" if "good" in ask.a else "B") as url:
        ... --judge-engine openai --judge-base-url url --judge-model fake-judge
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from loopback import Loopback

_PROMPT = re.compile(
    r"### Instruction:\n(?P<instruction>.*?)\n(?:\n### Input:\n(?P<input>.*?)\n)?\n### Response A:\n(?P<a>.*?)\n\n"
    r"### Response B:\n(?P<b>.*?)\n\nQuestion:",
    re.DOTALL,
)


@dataclass(frozen=True)
class Ask:
    """One judging request, as the judge sees it."""

    instruction: str
    input: str
    a: str  # Response A, as shown
    b: str
    number: int  # 1 for the first request the server got


class FakeJudge(Loopback):
    def __init__(self, policy: Callable[[Ask], str]):
        self.policy = policy
        self.asks: list[Ask] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                prompt = body["messages"][-1]["content"]
                m = _PROMPT.search(prompt)
                assert m, f"not our judging prompt: {prompt[:200]!r}"
                with outer.lock:
                    ask = Ask(m["instruction"], m["input"] or "", m["a"], m["b"], len(outer.asks) + 1)
                    outer.asks.append(ask)
                reply = outer.policy(ask)
                data = json.dumps(
                    {
                        "id": f"chatcmpl-{ask.number}",
                        "object": "chat.completion",
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": reply},
                            }
                        ],
                        "usage": {
                            "prompt_tokens": len(prompt.split()),
                            "completion_tokens": len(reply.split()),
                        },
                    }
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(Handler)
