"""A scripted LLM judge on loopback (an OpenAI-compatible chat endpoint): it reads the two
responses out of our judging prompt and answers as its `policy` says, so a test knows every
verdict in advance.

    with FakeJudge(lambda ask: "A" if "good" in ask.a else "B") as url:
        ... --judge-engine openai --judge-base-url url --judge-model fake-judge
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from loopback import JsonHandler, Loopback, completion, send_json

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

        class Handler(JsonHandler):
            def do_POST(self):
                body = self.json_body()
                prompt = body["messages"][-1]["content"]
                m = _PROMPT.search(prompt)
                assert m, f"not our judging prompt: {prompt[:200]!r}"
                with outer.lock:
                    ask = Ask(m["instruction"], m["input"] or "", m["a"], m["b"], len(outer.asks) + 1)
                    outer.asks.append(ask)
                reply = outer.policy(ask)
                send_json(self, 200, completion(body, reply, prompt, id=f"chatcmpl-{ask.number}"))

        super().__init__(Handler)


def words(text: str) -> int:
    """Whitespace-separated words in `text`: what `fewer_words` counts."""
    return len(text.split())


def fewer_words(ask: Ask) -> str:
    """A judge with a known taste: the answer of fewer words is the better one; the same number
    of words is a tie. The proof-of-effect tests teach a model this preference and check that it
    was learnt."""
    a, b = words(ask.a), words(ask.b)
    return "A" if a < b else "B" if b < a else "tie"


@dataclass
class InFlight:
    """What a slow judge saw: the most requests it held at once, and when the first came in and
    the last went out (`time.perf_counter`)."""

    now: int = 0
    most: int = 0
    served: int = 0
    first: float | None = None
    last: float | None = None


def slow_judge(policy: Callable[[Ask], str], delay_s: float) -> tuple[Callable[[Ask], str], InFlight]:
    """`policy` answering after `delay_s`, as a remote judge's latency; the returned InFlight
    counts the requests it holds at once, so a bench sees how many a client keeps in flight."""
    import time

    seen = InFlight()
    lock = threading.Lock()

    def answer(ask: Ask) -> str:
        with lock:
            seen.now += 1
            seen.most = max(seen.most, seen.now)
            if seen.first is None:
                seen.first = time.perf_counter()
        try:
            time.sleep(delay_s)
            return policy(ask)
        finally:
            with lock:
                seen.now -= 1
                seen.served += 1
                seen.last = time.perf_counter()

    return answer, seen


def with_a_digit(ask: Ask) -> str:
    """A judge with a known taste: an answer holding a digit beats one without; two with (or two
    without) tie."""
    a, b = (any(c.isdigit() for c in text) for text in (ask.a, ask.b))
    return "A" if a and not b else "B" if b and not a else "tie"
