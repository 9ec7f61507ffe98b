"""`alpaca-forge data ...`: tools over Alpaca datasets (JSON array or JSONL, gzip too).

Each tool reads records through `records.read_records` (so every input problem is reported with
file, line and field before anything is written) and writes atomically through `write_records`.
"""

from __future__ import annotations

import os
import random
import re
import string
import sys
from collections.abc import Callable, Sequence
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


# ---------------------------------------------------------------------------------------------
# stats


def _words(text: str) -> int:
    return len(text.split())


def _summary(values: list[int]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values or [0])
    return {
        "mean": round(float(a.mean()), 1),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "max": int(a.max()),
    }


def stats(records: list[Record]) -> dict[str, Any]:
    """Counts and length distributions (in words) of a dataset."""
    from collections import Counter

    with_input = sum(1 for r in records if r.input.strip())
    first_words = Counter(
        r.instruction.split()[0].strip(string.punctuation).lower() for r in records if r.instruction.split()
    )
    return {
        "records": len(records),
        "with_input": with_input,
        "with_input_share": round(with_input / len(records), 4) if records else 0.0,
        "empty_output": sum(1 for r in records if not r.output.strip()),
        "words": {
            "instruction": _summary([_words(r.instruction) for r in records]),
            "input": _summary([_words(r.input) for r in records if r.input.strip()]),
            "output": _summary([_words(r.output) for r in records]),
        },
        "top_first_words": dict(first_words.most_common(15)),
    }


def plot_lengths(records: list[Record], path: str | os.PathLike, title: str) -> Path:
    """Histograms of instruction, input and output lengths (words), as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        raise UserError("plots need matplotlib", "pip install 'alpaca-forge[plot]'") from None
    fields = [
        ("instruction", [_words(r.instruction) for r in records]),
        ("input (records that have one)", [_words(r.input) for r in records if r.input.strip()]),
        ("output", [_words(r.output) for r in records]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, values) in zip(axes, fields, strict=True):
        heading = f"{name}\n{len(values)} records"
        if values:
            # The axis stops at the 99th percentile, so a few huge records do not flatten the rest.
            cut = max(1.0, float(np.percentile(values, 99)))
            ax.hist(values, bins=40, range=(0, cut), color="#4a7ebb", edgecolor="white", linewidth=0.4)
            ax.axvline(float(np.mean(values)), color="#c0392b", linestyle="--", linewidth=1, label="mean")
            ax.legend(frameon=False)
            if max(values) > cut:
                heading += f" (axis to p99; max {max(values)})"
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel("words")
        ax.set_ylabel("records")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# quality and clean

_REFUSAL = re.compile(
    r"\bas an ai\b|as a(?:n ai)? language model"
    r"|\bi(?:'m| am) (?:sorry|afraid),? (?:but )?i (?:cannot|can't|can not|am unable|won't be able)"
    r"|\bi(?:'m| am) (?:unable|not able) to (?:help|assist|provide|fulfil|fulfill|comply|answer|do that)"
    r"|\bi (?:cannot|can't) (?:fulfil|fulfill|provide|assist|help|complete|comply)",
    re.IGNORECASE,
)
_NOINPUT_LEFTOVER = re.compile(r"<\s*no\s*[_-]?\s*input\s*>|\bnoinput\b", re.IGNORECASE)
_CLOSED = tuple(".!?\"'`)]}>*;:")  # an output ending in one of these ended on purpose


def _looks_truncated(output: str) -> bool:
    """Long enough to have had an ending, and stops mid-sentence (no closing punctuation)."""
    text = output.rstrip()
    return _words(text) >= 8 and not text.endswith(_CLOSED) and not text[-1:].isdigit()


QUALITY_CHECKS: dict[str, Callable[[Record], bool]] = {
    "empty_output": lambda r: not r.output.strip(),
    "output_equals_input": lambda r: bool(r.input.strip()) and r.output.strip() == r.input.strip(),
    "truncated_output": lambda r: bool(r.output.strip()) and _looks_truncated(r.output),
    "refusal": lambda r: bool(_REFUSAL.search(r.output)),
    "noinput_leftover": lambda r: any(
        _NOINPUT_LEFTOVER.search(t) for t in (r.instruction, r.input, r.output)
    ),
    "non_english_start": lambda r: bool(r.instruction.strip()) and not r.instruction.strip()[0].isascii(),
}
CHECK_NAMES = (*QUALITY_CHECKS, "near_duplicate")


@dataclass
class QualityReport:
    records: int
    flagged: dict[str, list[int]]  # check -> positions of the records it flags

    def flagged_positions(self, checks: Sequence[str]) -> dict[int, list[str]]:
        """Position -> the chosen checks that flag it."""
        out: dict[int, list[str]] = {}
        for check in checks:
            for i in self.flagged.get(check, []):
                out.setdefault(i, []).append(check)
        return out

    def to_dict(self, records: list[Record], examples: int = 3) -> dict[str, Any]:
        return {
            "records": self.records,
            "checks": {
                name: {
                    "count": len(positions),
                    "examples": [{"index": i, **records[i].to_dict()} for i in positions[:examples]],
                }
                for name, positions in self.flagged.items()
            },
        }


def quality(records: list[Record], threshold: float = 0.7, progress: bool = True) -> QualityReport:
    """Every check on every record; near-duplicates by the same ROUGE-L engine as `dedupe`."""
    flagged = {name: [i for i, r in enumerate(records) if check(r)] for name, check in QUALITY_CHECKS.items()}
    flagged["near_duplicate"] = sorted(
        d["index"] for d in dedupe(records, threshold, progress=progress).dropped
    )
    return QualityReport(len(records), flagged)


def parse_checks(text: str | None) -> list[str]:
    if text is None:
        return list(CHECK_NAMES)
    checks = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECK_NAMES]
    if unknown:
        raise UserError(f"unknown check(s): {', '.join(unknown)}", f"choose from: {', '.join(CHECK_NAMES)}")
    return checks
