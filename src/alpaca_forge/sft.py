"""Supervised fine-tuning data: records become exactly the token ids and labels the trainer sees.

One example is `prompt ids + response ids + EOS`:

- the prompt is the record rendered by the prompt format (Alpaca template or chat template) and
  tokenised alone, just as inference tokenises it, so training and inference see the same ids;
- the response is the record's output, tokenised alone, then the tokenizer's EOS;
- labels are -100 on every prompt token (nothing is learnt from the prompt) unless
  `train_on_inputs`; the first token is never a target, so packed examples stay apart;
- an example longer than `max_seq_len` loses response tokens from its end, never its EOS, so a
  model trained on cut answers still learns to stop. A record whose prompt alone leaves no room
  for one response token and the EOS carries no loss; it is left out and counted.

Batching: `packed` puts several examples in one row (position ids restart at each, so attention
stays inside each example), `grouped` batches examples of similar length, `padded` is the
original's random batches padded to the longest. Each batch carries its own token counts (real,
padding, trained), which the trainer takes out before the model sees the batch.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .prompts import PromptFormat
from .records import Record

IGNORE_INDEX = -100
BATCHING = ("packed", "grouped", "padded")
COUNTS = "alpaca_forge_token_counts"  # batch key: (real, padding, trained) tokens; not a model input


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


def split_validation(records: list[Record], size: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold `size` records out (chosen with `seed`); both parts keep file order."""
    if size >= len(records):
        raise UserError(
            f"a validation split of {size} records leaves nothing to train on ({len(records)} records in all)",
            f"use --val-size below {len(records)} (a few percent is usual), or give --val FILE",
        )
    held = set(random.Random(seed).sample(range(len(records)), size))
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


# ---------------------------------------------------------------------------------------------
# Packing and batching


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Examples into rows of at most `capacity` tokens: best fit, longest first (few, full rows).

    Returns rows as lists of example positions, each row in ascending position order, rows in the
    order of their first example, so the result depends on the data alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, row) sorted: the best fit is a bisect away
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    for r in rows:
        r.sort()
    rows.sort(key=lambda r: r[0])
    return rows


class SFTDataset:
    """Items the trainer reads: one example each, or one packed row of several."""

    def __init__(self, examples: Sequence[Example], batching: str, max_seq_len: int):
        if batching not in BATCHING:
            raise UserError(f"unknown batching {batching!r}", f"use one of: {', '.join(BATCHING)}")
        self.batching = batching
        if batching == "packed":
            rows = pack([len(e.input_ids) for e in examples], max_seq_len)
            self.items = [self._row([examples[i] for i in row]) for row in rows]
        else:
            self.items = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    @staticmethod
    def _row(examples: list[Example]) -> dict[str, list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for e in examples:
            ids += e.input_ids
            labels += e.labels
            positions += range(len(e.input_ids))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]

    def lengths(self) -> list[int]:
        return [len(x["input_ids"]) for x in self.items]


class Collator:
    """Pads a batch to its longest item (right side) and notes its real, padding and trained tokens
    under `COUNTS`.

    Packed rows carry position ids, no attention mask and `use_cache=False`: the model then keeps
    attention inside each example (a new example starts wherever the position ids restart), and
    the padding, last in its row with its own positions, is seen by nothing before it. Other
    batches get an attention mask.
    """

    def __init__(self, pad_id: int, packed: bool):
        self.pad_id = pad_id
        self.packed = packed

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(x["input_ids"]) for x in items)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        batch["position_ids" if self.packed else "attention_mask"] = []
        real = 0
        for x in items:
            n = len(x["input_ids"])
            pad = width - n
            batch["input_ids"].append(x["input_ids"] + [self.pad_id] * pad)
            batch["labels"].append(x["labels"] + [IGNORE_INDEX] * pad)
            if self.packed:
                batch["position_ids"].append(x["position_ids"] + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * n + [0] * pad)
            real += n
        out: dict[str, Any] = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if self.packed:
            # With a cache the model takes the position ids for a continuation and attends across
            # the whole row; without one it reads where each example starts from them.
            out["use_cache"] = False
        trained = int(out["labels"].ne(IGNORE_INDEX).sum())
        out[COUNTS] = (real, width * len(items) - real, trained)
        return out


@dataclass
class TokenCounts:
    """Tokens trained on by this process so far: real ones, padding, and those carrying loss."""

    real: int = 0
    padding: int = 0
    trained: int = 0

    def add(self, counts: tuple[int, int, int]) -> None:
        self.real += counts[0]
        self.padding += counts[1]
        self.trained += counts[2]

    @property
    def padding_share(self) -> float:
        total = self.real + self.padding
        return self.padding / total if total else 0.0


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
