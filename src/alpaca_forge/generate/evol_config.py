"""Settings of `generate --method evol` (flags `--evol-*`). Owner: the evol work."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import Config, setting

# In-depth operations make an instruction harder; "breadth" writes a new one of the same domain.
OPERATIONS = ("constraints", "deepen", "concretise", "reasoning", "complicate_input", "breadth")


@dataclass(frozen=True)
class EvolConfig(Config):
    """How instructions are evolved (Evol-Instruct): rounds, operations, elimination rules."""

    rounds: int = setting(
        3,
        "evolutions tried on each seed instruction, one a round; each round rewrites what the last "
        "one kept (an evolution that is eliminated leaves the instruction as it was for the next round)",
        ge=1,
    )
    operations: tuple[str, ...] = setting(
        OPERATIONS,
        "comma-separated operations to choose from, one per evolution (seeded): constraints (add a "
        "requirement), deepen (ask about it in more depth), concretise (a more specific case), reasoning "
        "(needs several steps), complicate_input (richer material to work on), breadth (a new, rarer "
        "instruction of the same domain)",
        sep=",",
        metavar="OPS",
    )
    min_new_words: int = setting(
        3,
        "no information gain: eliminate an evolved instruction with fewer words than this outside its "
        "longest common subsequence with its parent (a copy, a trim or a reordering)",
        ge=1,
    )
    min_kept: float = setting(
        0.5,
        "not a rewrite: eliminate an in-depth evolution that keeps less than this share of its parent's "
        "words in order (ROUGE-L recall; a teacher that answered the task or wrote another one); 0 = off",
        ge=0,
        le=1,
    )
    min_answer_words: int = setting(
        3, "the teacher cannot answer: eliminate an evolution whose answer has fewer words", ge=1
    )
    max_instruction_tokens: int = setting(
        320,
        "longest evolved instruction the teacher may write, in tokens (its answer gets --max-new-tokens)",
        ge=8,
    )

    def check(self):
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations:
            yield (
                "operations",
                f"{', '.join(unknown) or 'none'}: not an operation",
                f"choose among {','.join(OPERATIONS)}",
            )
