"""A scripted OpenAI-compatible server on loopback for `generate --method magpie`: /v1/completions
writes a user's query after a chat template's pre-query text (then the end-of-turn marker and a new
turn, which the request's `stop` cuts off, as a real server does), /v1/chat/completions answers it.

What it writes is a function of the request's `seed` (the request number is `seed // 32` for run
seed 0), so a resumed run gets the replies an uninterrupted one got. Scriptable: latency, no
/v1/completions at all (404, as a chat-only API), fixed queries or answers cycled by request
number, and "<<LENGTH>>" for a reply cut at its token limit.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field

from fake_teacher import invented_word
from loopback import JsonHandler, Loopback, completion, send_json

END_OF_TURN = "<|im_end|>"
LENGTH = "<<LENGTH>>"


@dataclass
class MagpieScript:
    latency_s: float = 0.0
    no_completions: bool = False  # /v1/completions answers 404
    queries: list[str] | None = None  # cycled by request number; None: invented questions
    answers: list[str] | None = None  # cycled by request number; None: invented answers
    seen: list[tuple[str, dict]] = field(default_factory=list)  # (path, body), in order of arrival
    lock: threading.Lock = field(default_factory=threading.Lock)


def invented_query(rng: random.Random) -> str:
    words = " ".join(invented_word(rng) for _ in range(6))
    return f"Why do {words} grow?"  # few words in common: distinct queries stay far apart under ROUGE-L


class FakeMagpieServer(Loopback):
    """`with FakeMagpieServer(MagpieScript(...)) as url:` gives the API base."""

    def __init__(self, script: MagpieScript | None = None):
        self.script = script or MagpieScript()
        s = self.script

        class Handler(JsonHandler):
            def do_POST(self):
                body = self.json_body()
                with s.lock:
                    s.seen.append((self.path, body))
                time.sleep(s.latency_s)
                chat = self.path.endswith("/chat/completions")
                if not chat and s.no_completions:
                    return send_json(
                        self, 404, {"error": {"message": "This is a chat model, not a completions one"}}
                    )
                seed = int(body.get("seed", 0))
                rng = random.Random(seed)
                request = seed // 32
                if chat:
                    asked = body["messages"][-1]["content"]
                    text = (
                        s.answers[request % len(s.answers)]
                        if s.answers
                        else f"Here is an answer to that: {' '.join(invented_word(rng) for _ in range(10))}."
                    )
                    text = text.replace("{query}", asked)
                else:
                    query = s.queries[request % len(s.queries)] if s.queries else invented_query(rng)
                    text = f"{query}{END_OF_TURN}\n<|im_start|>assistant\nSure."
                finish = "stop"
                if LENGTH in text:
                    text, finish = text.replace(LENGTH, "").split(END_OF_TURN)[0], "length"
                cuts = [i for i in (text.find(t) for t in body.get("stop") or []) if i >= 0]
                text = text[: min(cuts)] if cuts else text
                prompt = json.dumps(body.get("messages") or body.get("prompt"))
                send_json(self, 200, completion(body, text, prompt, id=f"x-{seed}", finish=finish))

        super().__init__(Handler)
