"""Evol-Instruct's pure steps: the rewriting prompts, reading the teacher's rewrite, and the
elimination rules. Nothing here talks to a teacher or touches a file.

    a parent instruction -> choose_operation (seeded) -> evolve_prompt -> the teacher -> read_evolved
    -> evolved_reason (copied prompt text, no information gain, not a rewrite, self-instruct's
    filters; the pool's
    ROUGE-L is checked by the caller) -> answer_prompt -> the teacher -> answer_reason (cannot
    answer, refusal, cut off) -> an evolved record with its lineage

Each evolution rewrites one instruction (its input, if any, is folded into the text shown, and the
rewrite is a single instruction that carries whatever material it needs, so evolved records have
no separate input). The answer is a second request that shows the teacher only the evolved
instruction, as a user would ask it: an answer written in the same reply as the rewrite would be
conditioned on the rewriting directions (and copies their wording), and a separate answer can be
judged on its own.
"""

from __future__ import annotations

import random
import re
import string

from ..core.records import Record
from ..core.rouge import rouge_tokens
from .config import FilterConfig
from .steps import filter_reason

# Our own wording of the Evol-Instruct operations. In-depth: the same task, harder.
DIRECTIVES = {
    "constraints": "Add one more requirement or restriction that a good answer has to respect.",
    "deepen": "Where the task touches on a subject, ask about it in more depth: its causes, trade-offs "
    "or consequences.",
    "concretise": "Replace general wording with a more specific case: name a particular situation, field "
    "or example.",
    "reasoning": "If the task can be done in one obvious step, change it so that the answer has to work "
    "through several explicit steps.",
    "complicate_input": "Give the task richer material to work on (a small table, a short piece of code, "
    "a list of figures or a longer passage), written out in full inside the task.",
}

# One worked example per operation, ours: a small teacher copies a layout it is shown far more
# reliably than it follows directions (the embedded 135M model answered the task instead).
EXAMPLES = {
    "constraints": ("Suggest a weekend activity.", "Suggest a weekend activity for a family with a toddler "
                    "that costs under 20 euros and works on a rainy day."),
    "deepen": ("Why do leaves change colour?", "Why do leaves change colour in autumn, and why do some trees "
               "turn red while others turn yellow?"),
    "concretise": ("Give advice on saving money.", "Give a university student in a shared flat three ways to "
                   "spend less on food each week."),
    "reasoning": ("How many legs do 3 spiders have?", "A box holds 3 spiders and 4 beetles. How many legs are "
                  "in the box? Show each step of the count."),
    "complicate_input": ("Find the largest number.", "Find the largest number in this list and say how far it "
                         "is from the mean: 14, 3, 27, 9, 18."),
    "breadth": ("Name three kinds of cheese.", "Explain how the rind of a washed-rind cheese forms while it ripens."),
}  # fmt: skip

# Both prompts end alike: one worked example, then the task to rewrite.
_EXAMPLE_THEN_TASK = """

Task:
{example}

New task:
{example_new}

Task:
{text}

New task:"""

EVOLVE_TEMPLATE = (
    """Rewrite the task below for an AI assistant so that answering it takes more skill.
{directive}
The new task must stand on its own, make sense, and be something a well-informed person could answer in writing. Add at most about 20 words to it. Write only the new task: no answer, no heading, no comment on what changed."""
    + _EXAMPLE_THEN_TASK
)

# In-breadth: a new instruction of the same domain, rarer.
BREADTH_TEMPLATE = (
    """Below is a task for an AI assistant. Write one new task from the same subject area, about something less common, with about the same length and difficulty.
The new task must stand on its own, make sense, and be something a well-informed person could answer in writing. Write only the new task: no answer, no heading, no comment."""
    + _EXAMPLE_THEN_TASK
)

ANSWER_TEMPLATE = "Task:\n{text}\n\nA complete and helpful answer:\n"  # the completions API only

EVOLVE_STOP = ("\nTask:", "\nNew task:", "\nAnswer:", "\n###")
ANSWER_STOP = ("\nTask:",)  # the completions layout's next task

IN_DEPTH = tuple(DIRECTIVES)

# Words of the rewriting prompt (ours, and Evol-Instruct's usual ones) that a rewrite must not
# carry: a teacher that writes them copied the directions instead of following them.
COPY_MARKERS = (
    "#given prompt#", "#rewritten prompt#", "#created prompt#", "given prompt", "rewritten prompt",
    "created prompt", "the given task", "the task below", "the original task", "rewritten task",
    "new task:", "the new task", "task above", "add at most", "well-informed person",
)  # fmt: skip
_LEADING_LABEL = re.compile(
    r"^(?:[\s*_\"']|#+\s)*(?:(?:the|my|your|a)\s+)?(?:new|rewritten|evolved|created|revised|more complex)?"
    r"\s*(?:task|instruction|prompt)(?:\s+(?:is|would be))?[*_#\s]*:[*_\s]*",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(r"^(?:sure|here|okay|ok|certainly|of course)\b[^\n]*:\s*\n", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"\n\s*[*_#]*\s*(?:answer|response|output|solution)\s*[*_]*\s*:", re.IGNORECASE)

REFUSALS = (
    "as an ai", "i'm an ai", "i am an ai", "language model", "i cannot", "i can't", "i can not",
    "i am unable", "i'm unable", "i am not able", "i'm not able", "i apologize", "i apologise",
    "i won't be able", "i do not have access", "i don't have access",
)  # fmt: skip
_STOPWORD_TEXT = (
    "a an the and or but if of to in on at by for with is are was were be been it this that these those "
    "i you he she we they my your not no yes so as do does did"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def parent_text(record: Record) -> str:
    """What an evolution rewrites: the instruction, with its input below it when it has one."""
    return f"{record.instruction}\n\n{record.input}" if record.input.strip() else record.instruction


def choose_operation(seed: int, root: str, round_: int, operations: tuple[str, ...]) -> str:
    """The operation of one evolution: a fixed function of (--seed, the chain's root, the round),
    so that a resumed run asks what an uninterrupted one would have."""
    return random.Random(f"evol:{seed}:{root}:{round_}").choice(operations)


def evolve_prompt(operation: str, text: str) -> str:
    example, example_new = EXAMPLES[operation]
    if operation == "breadth":
        return BREADTH_TEMPLATE.format(text=text, example=example, example_new=example_new)
    return EVOLVE_TEMPLATE.format(
        directive=DIRECTIVES[operation], text=text, example=example, example_new=example_new
    )


def answer_prompt(text: str) -> str:
    """The answer request on the completions API (the chat API sends the instruction alone)."""
    return ANSWER_TEMPLATE.format(text=text)


def read_evolved(reply: str) -> str:
    """The new instruction from a rewrite: a chat preamble ("Sure! Here is the new task:"), a
    label ("New task:", "**Rewritten instruction:**"), surrounding quotes or bold, and an answer
    written after it are removed."""
    text = reply.replace("\r\n", "\n").strip()
    text = _PREAMBLE.sub("", text, count=1).strip()
    text = _LEADING_LABEL.sub("", text, count=1).strip()
    cut = _ANSWER_LABEL.search(text)
    if cut:
        text = text[: cut.start()].strip()
    for pair in ('""', "''", "**", "“”", "``"):
        if len(text) > 2 and text[0] == pair[0] and text[-1] == pair[-1]:
            text = text[1:-1].strip()
    return text.strip("*").strip()


def overlap(child: str, parent: str) -> tuple[int, float]:
    """(new words, kept share): how many of the child's words lie outside its longest common
    subsequence with the parent (ROUGE-L's tokens: what the evolution added), and the share of
    the parent's words that subsequence keeps (ROUGE-L recall of the parent)."""
    from rapidfuzz.distance import LCSseq

    c, p = rouge_tokens(child), rouge_tokens(parent)
    lcs = LCSseq.similarity(c, p) if c and p else 0
    return len(c) - lcs, (lcs / len(p) if p else 1.0)


def new_words(child: str, parent: str) -> int:
    return overlap(child, parent)[0]


def evolved_reason(
    child: str,
    parent: str,
    *,
    min_new_words: int,
    filters: FilterConfig,
    blacklist: re.Pattern[str] | None,
    min_kept: float = 0.0,
) -> str | None:
    """Why an evolved instruction is eliminated before it is answered, or None. `min_kept`: the
    least share of the parent's words an in-depth rewrite keeps (0 for in-breadth: a new task)."""
    if not child:
        return "empty"
    lowered = child.lower()
    if any(marker in lowered for marker in COPY_MARKERS):
        return "copied_prompt"
    added, kept = overlap(child, parent)
    if added < min_new_words:
        return "no_information_gain"
    if kept < min_kept:
        return "not_a_rewrite"
    return filter_reason(child, filters, blacklist)


def answer_reason(answer: str, finish_reason: str, *, min_words: int) -> str | None:
    """Why the teacher's answer to an evolved instruction eliminates it, or None.

    cannot_answer: nothing but punctuation and stop words, fewer than `min_words` words, or an
    apology ("sorry") in under 80 words; refusal: a refusal phrase anywhere ("as an AI", "I
    cannot"); answer_truncated: the answer hit the length limit."""
    words = answer.split()
    content = [w for w in (w.strip(string.punctuation).lower() for w in words) if w and w not in _STOPWORDS]
    lowered = answer.lower()
    if not content or len(words) < min_words or ("sorry" in lowered and len(words) < 80):
        return "cannot_answer"
    if any(phrase in lowered.replace("’", "'") for phrase in REFUSALS):
        return "refusal"
    if finish_reason == "length":
        return "answer_truncated"
    return None
