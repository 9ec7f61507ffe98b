"""A real OpenAI-compatible HTTP server on loopback that plays an Evol-Instruct teacher.

Asked to rewrite a task (the prompt ends in "New task:"), it answers with the task plus a new
sentence of invented words (in-depth) or a wholly new task (in-breadth, recognised by the
breadth prompt's wording); asked anything else, it answers it with a sentence of invented words.
Everything is drawn from the request's seed, so the same request always gets the same reply.
Behaviour can be scripted per reply by the sampled seed: copy the task back unchanged, leak the
prompt's wording ("#Rewritten Prompt#"), refuse, answer in one word, be cut off by the length
limit, or fail with a status.
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field

from fake_teacher import invented_word
from loopback import JsonHandler, Loopback, completion, send_json

_TASK = re.compile(r"\nTask:\n((?:(?!\nTask:\n).)*)\n\nNew task:\s*$", re.DOTALL)  # the last task shown
_ANSWER_LAYOUT = re.compile(r"^Task:\n(.*)\n\nA complete and helpful answer:\n$", re.DOTALL)


@dataclass
class EvolScript:
    latency_s: float = 0.0
    copy_rate: float = 0.0  # a rewrite that gives the task back unchanged
    leak_rate: float = 0.0  # a rewrite that carries the prompt's wording
    refuse_rate: float = 0.0  # an answer "I'm sorry, as an AI I cannot ..."
    short_rate: float = 0.0  # a one-word answer
    cut_rate: float = 0.0  # an answer stopped by the length limit
    preamble: bool = False  # rewrites start "Sure! Here is the new task:" and a label
    fail_first: int = 0  # the first N requests get 503
    seen: list[dict] = field(default_factory=list)  # request bodies, in order of arrival
    lock: threading.Lock = field(default_factory=threading.Lock)


def rewrite(task: str, breadth: bool, rng: random.Random) -> str:
    words = " ".join(invented_word(rng) for _ in range(5))
    if breadth:
        return f"Describe how the {words} tradition began."
    return f"{task} Also explain how {words} changes the answer."


def handle(script: EvolScript, body: dict, number: int) -> tuple[int, str, str]:
    """(status, text, finish_reason) for one request."""
    if number <= script.fail_first:
        return 503, "", ""
    prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
    rng = random.Random(body.get("seed", number))
    draw = rng.random()
    task = _TASK.search(prompt)
    if task:  # a rewrite
        if draw < script.copy_rate:
            text = task.group(1)
        elif draw < script.copy_rate + script.leak_rate:
            text = f"#Rewritten Prompt#: {rewrite(task.group(1), False, rng)}"
        else:
            text = rewrite(task.group(1), "less common" in prompt, rng)
        if script.preamble:
            text = f"Sure! Here is the new task:\n**New task:** {text}"
        return 200, text, "stop"
    layout = _ANSWER_LAYOUT.match(prompt)
    question = layout.group(1) if layout else prompt
    if draw < script.refuse_rate:
        return 200, "I'm sorry, but as an AI I cannot help with that.", "stop"
    draw -= script.refuse_rate
    if draw < script.short_rate:
        return 200, "Yes.", "stop"
    draw -= script.short_rate
    answer = f"To answer '{question[:30]}': " + " ".join(invented_word(rng) for _ in range(12)) + "."
    return 200, answer, "length" if draw < script.cut_rate else "stop"


class FakeEvolTeacher(Loopback):
    """`with FakeEvolTeacher(EvolScript(...)) as url:` gives the API base."""

    def __init__(self, script: EvolScript | None = None):
        self.script = script or EvolScript()
        script_ref = self.script

        class Handler(JsonHandler):
            def do_POST(self):
                body = self.json_body()
                with script_ref.lock:
                    script_ref.seen.append(body)
                    number = len(script_ref.seen)
                time.sleep(script_ref.latency_s)
                status, text, finish = handle(script_ref, body, number)
                if status != 200:
                    return send_json(self, status, {"error": {"message": f"scripted {status}"}})
                prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
                send_json(self, 200, completion(body, text, prompt, id=f"cmpl-{number}", finish=finish))

        super().__init__(Handler)
