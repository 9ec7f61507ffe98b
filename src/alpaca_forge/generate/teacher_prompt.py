"""The teacher's prompt: the Alpaca recipe's request for 20 tasks, three seed tasks shown as
numbered examples, and the stop strings that the numbering implies.

    seed tasks -> sample_demos -> build_prompt -> the teacher (then `steps` takes the reply)

Apart from `steps` so that `config` takes the stop strings from here while `steps` takes the
filter settings from `config`: no two modules import each other.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..core.records import Record

TASKS_PER_PROMPT = 20  # what the prompt asks for (the original's wording)
DEMOS_PER_PROMPT = 3  # seed tasks shown as examples in each prompt, numbered 1 to 3
# The original's stop strings: a reply ends where task 20 would begin, so it holds tasks
# 4 to 19, at most 16 new ones, however many the prompt asks for. (Kept for parity: the cut also
# keeps a teacher from running on past the list.)
TEACHER_STOP = ("\n20", "20.", "20 .")
MAX_TASKS_PER_REPLY = 20 - (DEMOS_PER_PROMPT + 1)  # 16: tasks 4..19

# Our own wording of the Alpaca recipe's requirements.
PREAMBLE = f"""Write {TASKS_PER_PROMPT} new tasks that people might give an AI assistant, each with a good answer.

Rules for the tasks:
1. Make them different from one another: use a different verb in each, and mix kinds of task (open questions, classification, rewriting, brainstorming, extraction, reasoning, advice, short coding).
2. Write in English. Each instruction is one or two sentences, an imperative or a question.
3. When a task needs material to work on, give a realistic and concrete input of at most 100 words; otherwise write <noinput> as the input.
4. Give each task an appropriate answer of fewer than 100 words.
5. A language model can only read and write text: do not ask for images, drawings, audio, video, files, or actions in the world such as sending an email or setting an alarm.

Tasks:
"""


def format_demo(number: int, record: Record) -> str:
    """One example task in the numbered layout the teacher is asked to continue."""
    return (
        f"###\n{number}. Instruction: {record.instruction}\n"
        f"{number}. Input:\n{record.input or '<noinput>'}\n"
        f"{number}. Output:\n{record.output}\n"
    )


def sample_demos(seeds: Sequence[Record], request_number: int, seed: int) -> list[Record]:
    """The demonstrations for one request: a fixed function of (seed, request number), so that a
    resumed run asks exactly what an uninterrupted one would have."""
    rng = random.Random(f"{seed}:{request_number}")
    return rng.sample(list(seeds), min(DEMOS_PER_PROMPT, len(seeds)))


def build_prompt(demos: Sequence[Record]) -> str:
    """The teacher's prompt; it ends where the next instruction begins."""
    body = "".join(format_demo(i, r) for i, r in enumerate(demos, start=1))
    return f"{PREAMBLE}{body}###\n{len(demos) + 1}. Instruction:"


def request_seed(run_seed: int, request_number: int) -> int:
    """The teacher's sampling seed for one request: a resumed run samples what an uninterrupted
    one would have."""
    return run_seed * 1_000_003 + request_number
