"""`alpaca-forge data ...`: tools over Alpaca datasets (JSON array or JSONL, gzip too).

Each tool reads records through `records.read_records` (so every input problem is reported with
file, line and field before anything is written) and writes atomically through `write_records`.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .prompts import user_message
from .records import Record, read_records, write_records
from .rouge import greedy_dedupe

# What `dedupe` compares: the instruction alone (as self-instruct does), or more of the record.
DEDUPE_KEYS = {
    "instruction": lambda r: r.instruction,
    "instruction+input": lambda r: f"{r.instruction}\n{r.input}",
    "output": lambda r: r.output,
}
CONVERT_FORMATS = ("alpaca", "messages", "seed")


def validate(path: str | os.PathLike) -> list[Record]:
    """Every record checked (instruction, input, output); raises listing every problem."""
    return read_records(path, require_output=True)


@dataclass
class DedupeResult:
    kept: list[Record]
    dropped: list[dict[str, Any]]  # each dropped record with the kept record it collided with


def dedupe(
    records: list[Record], threshold: float = 0.7, key: str = "instruction", progress: bool = True
) -> DedupeResult:
    """Greedy, in file order: a record is dropped when its ROUGE-L F1 with an earlier kept record
    is above `threshold` (the self-instruct filter, exact)."""
    from tqdm import tqdm

    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1], got {threshold}", "self-instruct uses 0.7")
    if key not in DEDUPE_KEYS:
        raise UserError(f"unknown --key {key!r}", f"use one of: {', '.join(DEDUPE_KEYS)}")
    texts = [DEDUPE_KEYS[key](r) for r in records]
    with tqdm(total=len(texts), desc="dedupe", unit="record", disable=not progress, file=sys.stderr) as bar:
        kept, dropped = greedy_dedupe(texts, threshold, progress=bar.update)
    return DedupeResult(
        kept=[records[i] for i in kept],
        dropped=[
            {
                "index": d.index,
                "record": records[d.index].to_dict(),
                "duplicate_of_index": d.kept_index,
                "duplicate_of": records[d.kept_index].to_dict(),
                "rouge_l": round(d.score, 6),
            }
            for d in dropped
        ],
    )


def split(records: list[Record], val_size: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Seeded random train/validation split; `val_size` < 1 is a fraction, otherwise a count."""
    n = len(records)
    if val_size <= 0 or (val_size >= 1 and val_size != int(val_size)):
        raise UserError(
            f"--val-size must be a fraction in (0, 1) or a whole count, got {val_size}",
            "e.g. --val-size 0.05 or --val-size 200",
        )
    count = round(val_size * n) if val_size < 1 else int(val_size)
    if not 0 < count < n:
        raise UserError(
            f"--val-size {val_size} gives {count} validation records out of {n}",
            f"leave at least one record on each side: use a count from 1 to {n - 1}, or a smaller fraction",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[:count])
    # Both halves keep the file's order, so a split is easy to read and to diff.
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def convert(records: list[Record], to: str) -> list[dict[str, Any]]:
    """Alpaca records as Alpaca, chat `messages` or seed-task rows."""
    if to == "alpaca":
        return [r.to_dict() for r in records]
    if to == "messages":
        return [
            {
                **({"id": r.id} if r.id is not None else {}),
                "messages": [
                    {"role": "user", "content": user_message(r.instruction, r.input)},
                    {"role": "assistant", "content": r.output},
                ],
            }
            for r in records
        ]
    if to == "seed":
        return [
            {
                "id": r.id if r.id is not None else f"seed_task_{i}",
                "name": "",
                "instruction": r.instruction,
                "instances": [{"input": r.input, "output": r.output}],
                "is_classification": False,
            }
            for i, r in enumerate(records)
        ]
    raise UserError(f"unknown --to {to!r}", f"use one of: {', '.join(CONVERT_FORMATS)}")


def dropped_path_for(output: str | os.PathLike) -> Path:
    """`kept.jsonl` -> `kept.dropped.jsonl` (JSONL whatever the kept file's form)."""
    out = Path(output)
    stem = out.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    return out.with_name(f"{stem}.dropped.jsonl")


def write_split(train: list[Record], val: list[Record], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out_dir)
    return write_records(out / "train.jsonl", train), write_records(out / "val.jsonl", val)
