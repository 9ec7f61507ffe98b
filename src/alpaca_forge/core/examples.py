"""Training examples: records become exactly the token ids and labels the trainer sees (and
`data tokenize` writes).

One example is `prompt ids + response ids + EOS`:

- the prompt is the record rendered by the prompt format (Alpaca template or chat template) and
  tokenised alone, just as inference tokenises it, so training and inference see the same ids;
- the response is the record's output, tokenised alone, then the tokenizer's EOS;
- labels are -100 on every prompt token (nothing is learnt from the prompt) unless
  `train_on_inputs`; the first token is never a target, so packed examples stay apart;
- an example longer than `max_seq_len` loses response tokens from its end, never its EOS, so a
  model trained on cut answers still learns to stop. A record whose prompt alone leaves no room
  for one response token and the EOS carries no loss; it is left out and counted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .prompts import PromptFormat
from .records import Record

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    record: int  # position of the source record in its file (0-based)
    truncated: bool = False  # response cut to fit the window (EOS kept)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class TokenizeReport:
    records: int = 0
    examples: int = 0
    truncated: int = 0  # responses cut to fit (their EOS kept)
    no_room: list[int] = field(default_factory=list)  # records whose prompt fills the window
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        text = (
            f"{self.examples} examples from {self.records} records, {self.tokens} tokens "
            f"({self.trained_tokens} trained)"
        )
        if self.truncated:
            text += f"; {self.truncated} responses cut to fit the window, EOS kept"
        if self.no_room:
            shown = ", ".join(str(i + 1) for i in self.no_room[:5])
            more = "" if len(self.no_room) <= 5 else f" and {len(self.no_room) - 5} more"
            text += (
                f"; {len(self.no_room)} records left out: the prompt alone fills the window, so they "
                f"carry no loss (records {shown}{more})"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "examples": self.examples,
            "truncated": self.truncated,
            "no_room": len(self.no_room),
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
        }


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError(
            "the tokenizer has no EOS token, so a trained model could never learn to stop",
            "use a model whose tokenizer defines eos_token (every chat or base LLM on the Hub does)",
        )
    return int(tokenizer.eos_token_id)


def encode_record(
    record: Record,
    index: int,
    tokenizer: Any,
    fmt: PromptFormat,
    max_seq_len: int,
    train_on_inputs: bool = False,
) -> Example | None:
    """One record as an example, or None when its prompt leaves no room for a response."""
    prompt = fmt.prompt(record.instruction, record.input, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=fmt.add_special_tokens)["input_ids"]
    response_ids = tokenizer(record.output, add_special_tokens=False)["input_ids"]
    room = max_seq_len - len(prompt_ids) - 1  # response tokens that fit before the EOS
    if room < 1:
        return None
    truncated = len(response_ids) > room
    response_ids = [*response_ids[:room], eos_id(tokenizer)]
    input_ids = list(prompt_ids) + response_ids
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + response_ids
    labels[0] = IGNORE_INDEX  # nothing predicts the first token (and packing must not try)
    return Example(input_ids, labels, index, truncated)


def tokenize_records(
    records: Sequence[Record],
    tokenizer: Any,
    fmt: PromptFormat,
    max_seq_len: int,
    train_on_inputs: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Example], TokenizeReport]:
    if max_seq_len < 2:
        raise UserError(f"max_seq_len {max_seq_len} is too small", "use at least 2 (512 is the original's)")
    report = TokenizeReport(records=len(records))
    examples: list[Example] = []
    for i, record in enumerate(records):
        example = encode_record(record, i, tokenizer, fmt, max_seq_len, train_on_inputs)
        if progress:
            progress(1)
        if example is None:
            report.no_room.append(i)
            continue
        examples.append(example)
        report.truncated += example.truncated
        report.tokens += len(example.input_ids)
        report.trained_tokens += example.trained_tokens
    report.examples = len(examples)
    return examples, report


def fingerprint(records: Sequence[Record]) -> str:
    """A hash of the records' text, in order: a resumed run must train on the same data."""
    h = hashlib.sha256()
    for r in records:
        for part in (r.instruction, r.input, r.output):
            h.update(part.encode("utf-8"))
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()[:16]


def describe_example(example: Example, tokenizer: Any, color: bool) -> str:
    """An example as text with its masked tokens told apart from its trained ones."""
    out: list[str] = []
    masked_run: list[int] = []
    trained_run: list[int] = []

    def flush() -> None:
        if masked_run:
            text = tokenizer.decode(masked_run)
            out.append(f"\033[2m{text}\033[0m" if color else f"⟦{text}⟧")
            masked_run.clear()
        if trained_run:
            text = tokenizer.decode(trained_run)
            out.append(f"\033[1;32m{text}\033[0m" if color else text)
            trained_run.clear()

    for tok, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE_INDEX:
            if trained_run:
                flush()
            masked_run.append(tok)
        else:
            if masked_run:
                flush()
            trained_run.append(tok)
    flush()
    return "".join(out)
