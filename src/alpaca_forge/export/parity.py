"""The parity check every export ends with: does the GGUF file still answer like the model?

The file is loaded in llama.cpp and fed the same token ids as the transformers model, over a fixed
set of prompts: instructions in the model's own prompt format, and plain text full of what
tokenizers get wrong (digits, code, accents, emoji, runs of spaces and newlines). At every
position both pick their most likely next token; the check reports how often the picks agree,
after the whole prompt (the next-token choice that starts an answer) and at every position, and
the largest logit difference (a figure that means something for f32/f16/bf16; quantised files
differ by design). It also tokenizes each prompt with llama.cpp and counts the prompts whose
tokens differ from transformers' (a wrong pre-tokenizer shows up here).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.prompts import Message, PromptFormat

INSTRUCTIONS = (
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Translate 'good morning' into Spanish.",
    "Write a haiku about autumn leaves.",
    "Explain why the sky is blue in two sentences.",
    "List five fruits that are red.",
    "Summarise the plot of Romeo and Juliet.",
    "What is 17 multiplied by 23?",
    "Write a Python function that reverses a string.",
    "Name the planets of the solar system in order.",
    "Suggest a name for a coffee shop by the sea.",
    "How do I boil an egg?",
    "Describe the colour green to someone who cannot see.",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "Write a short thank-you note to a teacher.",
    "What are the main causes of climate change?",
    "Give an example of a metaphor.",
    "Classify these animals as mammals or birds: eagle, whale, bat, penguin.",
    "Rewrite this sentence in the passive voice: The cat chased the mouse.",
    "What does HTTP stand for?",
    "Write a limerick about a programmer.",
    "Explain recursion to a ten-year-old.",
    "What is the difference between weather and climate?",
    "Generate a list of four ice-cream flavours.",
    "Who wrote 'Pride and Prejudice'?",
    "Write an SQL query that counts the rows of a table named orders.",
    "Give me a synonym for 'happy'.",
    "Why do cats purr?",
    "Plan a three-day trip to Rome.",
    "What is photosynthesis?",
    "Write the first line of a mystery novel.",
    "Sort these numbers from smallest to largest: 42, 7, 19, 3, 88.",
    "How many legs does a spider have?",
    "Create a slogan for a recycling campaign.",
    "Explain what a neural network is in one paragraph.",
    "What is the boiling point of water at sea level?",
    "Name three famous painters from the Renaissance.",
    "Write a tweet announcing a new bakery.",
    "Describe a sunset over the mountains.",
    "What are the benefits of reading books?",
    "Give step-by-step directions for planting a tree.",
    "What is the square root of 144?",
    "Compose a two-line poem about the moon.",
    "Explain the rules of tic-tac-toe.",
    "Which is heavier, a kilogram of feathers or a kilogram of steel?",
    "Write a polite email declining a meeting invitation.",
    "What is the largest ocean on Earth?",
    "Describe the taste of a lemon.",
    "List the days of the week in French.",
    "Tell me a fun fact about octopuses.",
)

TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, Apollo 11 landed on the Moon; 600,000,000 people watched.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Café, naïve, façade, jalapeño, Zürich, São Paulo.",
    "Prices rose 3.75% to $1,234.56 on 2024-03-15 at 09:30.",
    "Hello!!! Are you there???   Yes...    I am.",
    "Line one\nLine two\n\n\nLine five after blank lines",
    "你好，世界。こんにちは世界。안녕하세요.",
    "Emoji test: 🙂🚀🎉 and symbols ©®™ ∑∫√.",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "She said, \"It's fine—really, it's fine.\"",
    "The mitochondria is the powerhouse of the cell.",
    "1234567890 0987654321 3.14159265358979",
    '<div class="note">Remember to save your work.</div>',
    "   leading spaces and trailing spaces   ",
    "Once upon a time, in a land far, far away, there lived a dragon.",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "It's, they're, we've, I'd, you'll, she's, don't.",
    "The year 2000 problem (Y2K) worried many engineers.",
    "E = mc^2, a^2 + b^2 = c^2, and 2 + 2 = 4.",
    "tabs\tbetween\twords\tand a final tab\t",
    "ALL CAPS SENTENCES ARE HARD TO READ.",
    "https://example.org/path?query=1&lang=en#section",
    "Roses are red, violets are blue, sugar is sweet, and so are you.",
    "Ünïcödé with combining marks: e\u0301 a\u0308 n\u0303.",
    "A list:\n- apples\n- pears\n- plums",
    'JSON: {"key": [1, 2, 3], "ok": true, "none": null}',
    "The meeting is at 3pm, room 404, building B-12.",
    "Water boils at 100°C and freezes at 0°C.",
    "To be, or not to be, that is the question.",
    "x = [i ** 2 for i in range(10) if i % 2 == 0]",
    "Dear Sir or Madam, I am writing to apply for the position.",
    "Mix 2 cups flour, 1 cup sugar, and 3 eggs.",
    "The Eiffel Tower is 330 metres tall.",
    "He scored 98/100 — the best result in class 7C.",
    "Call +1 (555) 010-9999 before 5:00 p.m.",
    "Markdown **bold**, _italic_, `code`, and # heading",
    "Numbers in words: one, two, three, four, five.",
    "A long word: antidisestablishmentarianism.",
    "Grüße aus München! Ça va? ¿Qué tal? Dziękuję.",
    "if (a && b) || !c { return -1; } else { return 0x1F; }",
    "Version 2.10.3-rc1 was released on 12/31/2023.",
    "Tea, Earl Grey, hot. Make it so.",
    "Wait—what?! No… that can't be (or can it?).",
    "Temperatures fell from +12 to -7 overnight.",
    "Η γρήγορη καφέ αλεπού. Быстрая коричневая лиса.",
    'git commit -m "fix: handle empty input" && git push',
    "   \n\n   indented after blank lines",
    "Item #1: $5; item #2: €7.50; item #3: £3.",
    "The end.",
)


@dataclass(frozen=True)
class Parity:
    prompts: int
    positions: int
    top1_last: float  # share of prompts whose next token after the prompt agrees
    top1_all: float  # share of all positions whose next token agrees
    max_logit_diff: float  # largest |transformers - llama.cpp| logit, over all positions
    tokenization_agree: float  # share of prompts llama.cpp tokenizes exactly as transformers
    tokenization_mismatch: str | None  # the first prompt tokenized differently, if any
    # With the chat format: the share of prompts the file's own chat template (what
    # `--engine llamacpp` renders with) writes exactly as transformers does. None otherwise.
    template_agree: float | None
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parity_prompts(fmt: PromptFormat, tokenizer: Any, count: int) -> list[tuple[str, bool]]:
    """(prompt, add special tokens) pairs: instructions in the prompt format and plain texts in
    turn, 100 distinct ones, cycled when more are asked for."""
    pool = [(fmt.render([Message("user", i)], tokenizer), fmt.add_special_tokens) for i in INSTRUCTIONS]
    pool += [(t, True) for t in TEXTS]
    order = [
        x for pair in zip(pool[: len(INSTRUCTIONS)], pool[len(INSTRUCTIONS) :], strict=False) for x in pair
    ]
    order += pool[2 * min(len(INSTRUCTIONS), len(TEXTS)) :]
    return [order[i % len(order)] for i in range(count)]


def check_parity(
    model: Any,
    tokenizer: Any,
    fmt: PromptFormat,
    gguf_file: Path,
    *,
    prompts: int = 100,
    threads: int | None = None,
    progress: bool = False,
    lora: Path | None = None,
) -> Parity:
    """`lora`: a GGUF LoRA adapter llama.cpp applies to `gguf_file` (`model` is then the merged one)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from ..engines.llamacpp import open_llama, template_tokenizer

    start = time.perf_counter()
    pairs = parity_prompts(fmt, tokenizer, prompts)
    encoded = [tokenizer(p, add_special_tokens=special)["input_ids"] for p, special in pairs]
    width = max(len(ids) for ids in encoded)
    llm = open_llama(
        gguf_file,
        "if you named --pre-tokenizer, check that llama.cpp knows the name; otherwise this is a bug in "
        "the export: report it with the model's config.json (--no-verify skips the check)",
        n_ctx=width + 1,  # the longest prompt, and the one token after it
        n_batch=width + 1,  # each prompt in one decode call
        logits_all=True,
        n_threads=threads,
        **({"lora_path": str(lora)} if lora else {}),
    )
    template_agree = None
    if fmt.name == "chat":
        ours = template_tokenizer(llm)
        chats = [[Message("user", i)] for i in INSTRUCTIONS]
        template_agree = sum(
            ours is not None and fmt.render(c, ours) == fmt.render(c, tokenizer) for c in chats
        ) / len(chats)
    agree_last = agree_all = positions = same_tokens = 0
    max_diff = 0.0
    mismatch = None
    model.eval()
    try:
        for (prompt, special), ids in tqdm(
            list(zip(pairs, encoded, strict=True)),
            desc="parity",
            unit="prompt",
            disable=not progress,
            leave=False,
        ):
            theirs = llm.tokenize(prompt.encode("utf-8"), add_bos=special, special=True)
            if theirs == ids:
                same_tokens += 1
            elif mismatch is None:
                mismatch = prompt[:80]
            with torch.inference_mode():
                ref = model(torch.tensor([ids])).logits[0].float().numpy()  # (T, V)
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids), : ref.shape[1]], dtype=np.float32)  # (T, V)
            picks = ref.argmax(-1) == got.argmax(-1)
            agree_all += int(picks.sum())
            agree_last += int(picks[-1])
            positions += len(ids)
            max_diff = max(max_diff, float(np.abs(ref - got).max()))
    finally:
        llm.close()
    n = len(pairs)
    return Parity(
        prompts=n,
        positions=positions,
        top1_last=agree_last / n,
        top1_all=agree_all / positions,
        max_logit_diff=max_diff,
        tokenization_agree=same_tokens / n,
        tokenization_mismatch=mismatch,
        template_agree=template_agree,
        elapsed_s=time.perf_counter() - start,
    )


# Below these, a file is broken rather than rounded: the export fails. Files of 16 bits or more
# and q8_0 agree at 94-100% when correct (see the README's parity table); 4- and 5-bit files of
# small models can agree at under half the positions and still be right, so for them only a file
# that has lost the model altogether fails.
MINIMUM_TOP1 = {"f32": 0.99, "f16": 0.97, "bf16": 0.93, "q8_0": 0.85}
MINIMUM_TOP1_OTHER = 0.1
# A wrong pre-tokenizer splits most prompts otherwise; a right one can still differ on a rare
# edge (llama.cpp's Qwen2 rule splits decomposed accents, "e" + U+0301, unlike the regex).
MINIMUM_SAME_TOKENS = 0.95


def judge(parity: Parity, quant: str) -> list[str]:
    """What is wrong with a file, by its parity figures (empty: nothing)."""
    floor = MINIMUM_TOP1.get(quant, MINIMUM_TOP1_OTHER)
    problems = []
    if parity.top1_all < floor:
        problems.append(
            f"llama.cpp's next-token choices agree with transformers' at only {parity.top1_all:.1%} of "
            f"{parity.positions} positions (a correct {quant} file reaches {floor:.0%})"
        )
    if parity.tokenization_agree < MINIMUM_SAME_TOKENS:
        problems.append(
            f"llama.cpp tokenizes {1 - parity.tokenization_agree:.0%} of the prompts differently from "
            f"transformers (first: {parity.tokenization_mismatch!r}): the pre-tokenizer does not match"
        )
    if parity.template_agree is not None and parity.template_agree < 1.0:
        problems.append(
            f"the file's chat template renders {1 - parity.template_agree:.0%} of the prompts otherwise than "
            "transformers does: llama.cpp would see other prompts than training wrote"
        )
    return problems


def describe(parity: Parity, quant: str) -> Sequence[str]:
    lines = [
        f"parity ({quant}, {parity.prompts} prompts, {parity.positions} positions, {parity.elapsed_s:.1f} s): "
        f"top-1 agreement {parity.top1_last:.1%} after the prompt, {parity.top1_all:.1%} at every position",
        f"  tokens: llama.cpp tokenizes {parity.tokenization_agree:.0%} of the prompts as transformers does",
    ]
    if parity.template_agree is not None:
        lines.append(
            f"  chat template: the file's renders {parity.template_agree:.0%} of the prompts as transformers'"
        )
    if quant in ("f32", "f16", "bf16"):
        lines.append(f"  largest logit difference: {parity.max_logit_diff:.4f}")
    return lines


def write_report(path: Path, parity: Parity | None, **facts: Any) -> Path | None:
    """The figures beside the file they describe (`FILE.parity.json`): what was checked, then the
    parity. A skipped check (--no-verify) writes none, and removes the one of a file replaced."""
    from ..core.files import write_json_atomic

    if parity is None:
        path.unlink(missing_ok=True)
        return None
    return write_json_atomic(path, {**facts, **parity.to_dict()})
