"""Batches for the trainer: packed rows, length-grouped or padded batches, with token counts.

`packed` puts several examples in one row (position ids restart at each, so attention stays
inside each example), `grouped` batches examples of similar length, `padded` is the original's
random batches padded to the longest. Each batch carries its own token counts (real, padding,
trained), which the trainer takes out before the model sees the batch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..core.examples import IGNORE_INDEX, Example

Batching = Literal["packed", "grouped", "padded"]
COUNTS = "alpaca_forge_token_counts"  # batch key: (real, padding, trained) tokens; not a model input


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

    def __init__(self, examples: Sequence[Example], batching: Batching, max_seq_len: int):
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
