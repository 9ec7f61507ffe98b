"""A scripted rating judge on loopback (an OpenAI-compatible chat endpoint) for `data score`: it
reads the record out of our rubric and replies as `policy(instruction, output)` says, after
`delay_s`, counting the requests it holds at once. Tests and bench/bench_score.py use it.

    with RatingJudge(lambda instruction, output: "Accuracy: 4\nHelpfulness: 5") as url:
        ... data score FILE --output OUT --judge-engine openai --judge-base-url url --judge-model rater
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from loopback import JsonHandler, Loopback, completion, send_json

_RECORD = re.compile(
    r"### Instruction:\n(?P<instruction>.*?)\n(?:\n### Input:\n(?P<input>.*?)\n)?\n### Response:\n(?P<output>.*?)\n\n"
    r"Rate the response\.",
    re.DOTALL,
)


class RatingJudge(Loopback):
    """An OpenAI-compatible chat server that reads the record out of our rubric and replies as
    `policy(instruction, output)` says; it counts the requests it holds at once."""

    def __init__(self, policy: Callable[[str, str], str], delay_s: float = 0.0):
        self.asked: list[str] = []
        self.turns: list[int] = []  # messages per request: a retry adds two turns
        self.most_in_flight = 0
        now = [0]
        lock = threading.Lock()
        outer = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = self.json_body()
                prompt = body["messages"][0]["content"]  # a retry adds turns after the rubric
                m = _RECORD.search(prompt)
                assert m, prompt[:300]
                with lock:
                    outer.asked.append(m["instruction"])
                    outer.turns.append(len(body["messages"]))
                    now[0] += 1
                    outer.most_in_flight = max(outer.most_in_flight, now[0])
                time.sleep(delay_s)
                reply = policy(m["instruction"], m["output"])
                with lock:
                    now[0] -= 1
                send_json(self, 200, completion(body, reply, prompt, id="x"))

        super().__init__(Handler)
