"""Preference pairs as the token ids TRL's trainers read: our tokenisation, exactly SFT's.

Each answer of a pair is an SFT example (`core.examples.encode_record`): the prompt format's
rendering of the instruction and input, tokenised alone, then the answer's ids and the EOS, cut
from the answer's end (never the EOS) to fit `max_seq_len`. A pair whose prompt alone leaves no
room for one answer token is left out and counted. From those ids:

- dpo, orpo, simpo: `prompt_ids`, `chosen_ids`, `rejected_ids` (completions end in EOS);
- kto: two unpaired rows per pair, `prompt_ids`, `completion_ids`, `label` (True for chosen);
- reward: `chosen_ids`, `rejected_ids`, each the whole sequence (prompt + answer + EOS): the very
  ids `judging.reward.reward_ids` scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.examples import IGNORE_INDEX, encode_record
from ..core.pairs import Pair
from ..core.prompts import PromptFormat
from ..core.records import Record


@dataclass
class PairReport:
    pairs: int = 0
    kept: int = 0
    truncated: int = 0  # answers cut to fit the window (their EOS kept)
    no_room: list[int] = field(default_factory=list)  # pairs whose prompt fills the window
    tokens: int = 0  # prompt + chosen + prompt + rejected, over the kept pairs

    def summary(self) -> str:
        text = f"{self.kept} pairs of {self.pairs}, {self.tokens} tokens"
        if self.truncated:
            text += f"; {self.truncated} answers cut to fit the window, EOS kept"
        if self.no_room:
            shown = ", ".join(str(i + 1) for i in self.no_room[:5])
            more = "" if len(self.no_room) <= 5 else f" and {len(self.no_room) - 5} more"
            text += (
                f"; {len(self.no_room)} pairs left out: the prompt alone fills the window "
                f"(pairs {shown}{more})"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "kept": self.kept,
            "truncated": self.truncated,
            "no_room": len(self.no_room),
            "tokens": self.tokens,
        }


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # answer ids + EOS
    rejected_ids: list[int]
    truncated: int  # how many of the two answers were cut


def _split(example: Any) -> tuple[list[int], list[int]]:
    """An SFT example's ids as (prompt, completion): the completion starts at the first trained label."""
    start = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return example.input_ids[:start], example.input_ids[start:]


def encode_pair(pair: Pair, tokenizer: Any, fmt: PromptFormat, max_seq_len: int) -> EncodedPair | None:
    """A pair as ids, or None when its prompt leaves no room for an answer."""
    chosen = encode_record(Record(pair.instruction, pair.input, pair.chosen), 0, tokenizer, fmt, max_seq_len)
    rejected = encode_record(
        Record(pair.instruction, pair.input, pair.rejected), 0, tokenizer, fmt, max_seq_len
    )
    if chosen is None or rejected is None:
        return None
    prompt, chosen_ids = _split(chosen)
    prompt_r, rejected_ids = _split(rejected)
    assert prompt == prompt_r, "one prompt, tokenised alone, gives the same ids"
    return EncodedPair(prompt, chosen_ids, rejected_ids, chosen.truncated + rejected.truncated)


def encode_pairs(
    pairs: Sequence[Pair], tokenizer: Any, fmt: PromptFormat, max_seq_len: int
) -> tuple[list[EncodedPair], PairReport]:
    report = PairReport(pairs=len(pairs))
    encoded: list[EncodedPair] = []
    for i, pair in enumerate(pairs):
        e = encode_pair(pair, tokenizer, fmt, max_seq_len)
        if e is None:
            report.no_room.append(i)
            continue
        encoded.append(e)
        report.truncated += e.truncated
        report.tokens += 2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)
    report.kept = len(encoded)
    return encoded, report


def rows_for(objective: str, encoded: Sequence[EncodedPair]) -> list[dict[str, Any]]:
    """The dataset rows the objective's TRL trainer reads (see the module's docstring)."""
    if objective == "reward":
        return [
            {"chosen_ids": e.prompt_ids + e.chosen_ids, "rejected_ids": e.prompt_ids + e.rejected_ids}
            for e in encoded
        ]
    if objective == "kto":
        rows = []
        for e in encoded:
            rows.append({"prompt_ids": e.prompt_ids, "completion_ids": e.chosen_ids, "label": True})
            rows.append({"prompt_ids": e.prompt_ids, "completion_ids": e.rejected_ids, "label": False})
        return rows
    return [
        {"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids}
        for e in encoded
    ]


def dataset_of(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(rows)
