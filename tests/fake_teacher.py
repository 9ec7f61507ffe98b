"""A real OpenAI-compatible HTTP server on loopback, for tests and benchmarks of `generate`.

It answers /v1/chat/completions and /v1/completions with 19 new tasks (or `tasks_per_reply`) in
the layout the prompt asks for, continuing from the number the prompt ends on, and honours
`stop` as a real server does: the text ends before the first stop string (which is not
returned). Each instruction is made of invented words drawn at random, so distinct tasks stay
far apart under ROUGE-L. Behaviour can be scripted: fail the first N requests with a status,
always refuse with 401, answer garbage or nothing usable, add latency.
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field

from loopback import JsonHandler, Loopback, completion, send_json, send_text

_SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vi", "po", "de", "nu", "fa", "zo", "bre", "ti", "gul"]
_VERBS = [
    "Explain",
    "Describe",
    "Compare",
    "Summarise",
    "List",
    "Classify",
    "Rewrite",
    "Suggest",
    "Evaluate",
    "Outline",
]


def invented_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3))


def tasks_text(
    first_number: int, rng: random.Random, count: int = 19, *, with_label: bool = False, repeat: bool = False
) -> str:
    """`count` tasks numbered from `first_number`; the first without its label, as a continuation."""
    blocks = []
    fixed = " ".join(invented_word(rng) for _ in range(6))
    for k in range(count):
        n = first_number + k
        words = fixed if repeat else " ".join(invented_word(rng) for _ in range(6))
        instruction = f"{rng.choice(_VERBS)} how {words} works."
        inp = "<noinput>" if rng.random() < 0.5 else f"The {invented_word(rng)} of {invented_word(rng)}."
        head = f"{n}. Instruction: {instruction}" if k or with_label else f" {instruction}"
        blocks.append(
            f"{head}\n{n}. Input:\n{inp}\n{n}. Output:\n{' '.join(invented_word(rng) for _ in range(8))}."
        )
    return "\n###\n".join(blocks)


@dataclass
class Script:
    latency_s: float = 0.0  # added to every answer
    fail_first: int = 0  # the first N requests get `fail_status`
    fail_status: int = 503
    always_status: int | None = None  # e.g. 401: every request refused
    garbage: bool = False  # 200 with a body that is not the API's shape
    chat_style: bool = False  # a chat preamble and labelled first task
    repeat_task: bool = False  # every task of a completion is the same one (tests within-batch dedupe)
    tasks_per_reply: int = 19  # tasks written before any stop string applies
    no_tasks: bool = False  # a well-formed answer with no task in it (a teacher not following)
    raw_texts: list[str] = field(default_factory=list)  # what was written, before the stop strings
    seen: list[dict] = field(default_factory=list)  # request bodies, in order of arrival
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeTeacher(Loopback):
    """`with FakeTeacher(Script(...)) as url:` gives the API base, e.g. http://127.0.0.1:PORT/v1."""

    def __init__(self, script: Script | None = None):
        self.script = script or Script()
        script_ref = self.script

        class Handler(JsonHandler):
            def do_POST(self):
                body = self.json_body()
                with script_ref.lock:
                    script_ref.seen.append(body)
                    number = len(script_ref.seen)
                time.sleep(script_ref.latency_s)
                status = script_ref.always_status or (
                    script_ref.fail_status if number <= script_ref.fail_first else 200
                )
                if status != 200:
                    return send_json(self, status, {"error": {"message": f"scripted {status}"}})
                if script_ref.garbage:
                    return send_text(self, 200, "<html>502 Bad Gateway from a proxy</html>", "text/html")
                prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
                first = int(re.search(r"(\d+)\. Instruction:\s*$", prompt).group(1))
                rng = random.Random(body.get("seed", number))
                text = tasks_text(
                    first,
                    rng,
                    script_ref.tasks_per_reply,
                    with_label=script_ref.chat_style,
                    repeat=script_ref.repeat_task,
                )
                if script_ref.chat_style:
                    text = "Sure! Here are more tasks:\n\n" + text
                if script_ref.no_tasks:
                    text = "I would rather not write tasks today."
                with script_ref.lock:
                    script_ref.raw_texts.append(text)
                cuts = [i for i in (text.find(s) for s in body.get("stop") or []) if i >= 0]
                text = text[: min(cuts)] if cuts else text
                send_json(self, 200, completion(body, text, prompt, id=f"cmpl-{number}"))

        super().__init__(Handler)
