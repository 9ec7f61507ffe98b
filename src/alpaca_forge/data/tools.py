"""The pure steps of the `data` tools: records in, records or numbers out. No files, no flags.

In the order `alpaca-forge data --help` lists the tools: stats (numbers, then the histograms),
quality (checks per record) and what `clean` keeps, dedupe (ROUGE-L, greedy), convert. (validate
is `core.records.read_records` itself, split is `core.records.split_records`, tokenize is
`core.examples.tokenize_records`: the same functions the other stages use.)
"""

from __future__ import annotations

import os
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.conversations import OPENAI, SHAREGPT, to_rows
from ..core.errors import Problem, ValidationError
from ..core.records import Record
from ..core.rouge_dedupe import Dropped, greedy_dedupe, greedy_dedupe_stream

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


def stats(records: Sequence[Record]) -> dict[str, Any]:
    """Counts and length distributions (in words) of a dataset."""
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
        **conversation_stats(records),
    }


def conversation_stats(records: Sequence[Record]) -> dict[str, Any]:
    """How many records are conversations, their turns (user and assistant, the system message
    aside) and the share of records with a system message."""
    conversations = [r.messages for r in records if r.messages is not None]
    with_system = sum(1 for m in conversations if m[0].role == "system")
    return {
        "conversations": len(conversations),
        "conversation_share": round(len(conversations) / len(records), 4) if records else 0.0,
        "turns_per_conversation": _summary([sum(t.role != "system" for t in m) for m in conversations]),
        "with_system": with_system,
        "with_system_share": round(with_system / len(records), 4) if records else 0.0,
    }


def describe_stats(numbers: dict[str, Any]) -> list[str]:
    """The lines `data stats` prints."""
    lines = [
        f"{numbers['records']} records; {numbers['with_input']} with input ({numbers['with_input_share']:.1%}); "
        f"{numbers['empty_output']} empty outputs"
    ]
    for name in ("instruction", "input", "output"):
        s = numbers["words"][name]
        lines.append(
            f"  {name:<12} words: mean {s['mean']}, median {s['median']:g}, p90 {s['p90']:g}, max {s['max']}"
        )
    if numbers.get("conversations"):
        t = numbers["turns_per_conversation"]
        lines.append(
            f"  {numbers['conversations']} conversations ({numbers['conversation_share']:.1%}; instruction and "
            f"output above are their last user turn and its reply): turns mean {t['mean']}, median "
            f"{t['median']:g}, p90 {t['p90']:g}, max {t['max']}; {numbers['with_system']} with a system "
            f"message ({numbers['with_system_share']:.1%} of records)"
        )
    lines.append(
        "  most common first words: " + ", ".join(f"{k} {v}" for k, v in numbers["top_first_words"].items())
    )
    return lines


def pyplot() -> Any | None:
    """matplotlib's pyplot drawing to files only, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_lengths(plt: Any, records: Sequence[Record], path: str | os.PathLike, title: str) -> Path:
    """Histograms of instruction, input and output lengths (words), as one PNG."""
    import numpy as np

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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


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


def _answers(r: Record) -> list[Any]:
    """The assistant turns: a conversation's every one, a plain record's output."""
    return [m for m in r.conversation() if m.role == "assistant"]


def _turns_text(r: Record, role: str) -> str:
    """A conversation's turns of one role, joined: what dedupe compares of a conversation."""
    return "\n".join(m.content for m in r.messages or () if m.role == role)


# One record at a time; `near_duplicate` looks at the whole dataset and is run apart (`quality`).
RECORD_CHECKS: dict[str, Callable[[Record], bool]] = {
    "empty_output": lambda r: not r.output.strip(),
    "output_equals_input": lambda r: bool(r.input.strip()) and r.output.strip() == r.input.strip(),
    "truncated_output": lambda r: bool(r.output.strip()) and _looks_truncated(r.output),
    "refusal": lambda r: any(_REFUSAL.search(m.content) for m in _answers(r)),
    "noinput_leftover": lambda r: any(
        _NOINPUT_LEFTOVER.search(t)
        for t in (
            (r.instruction, r.input, r.output) if r.messages is None else (m.content for m in r.messages)
        )
    ),
    "non_english_start": lambda r: bool(r.instruction.strip()) and not r.instruction.strip()[0].isascii(),
}
CHECK_NAMES = (*RECORD_CHECKS, "near_duplicate")


@dataclass(frozen=True)
class QualityReport:
    records: int
    flagged: dict[str, list[int]]  # check -> positions of the records it flags (only checks run)

    def flagged_positions(self) -> dict[int, list[str]]:
        """Position -> the checks that flag it, in position order."""
        out: dict[int, list[str]] = {}
        for check, positions in self.flagged.items():
            for i in positions:
                out.setdefault(i, []).append(check)
        return dict(sorted(out.items()))

    def to_dict(self, records: Sequence[Record], examples: int = 3) -> dict[str, Any]:
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


def quality(
    records: Sequence[Record],
    checks: Sequence[str] = CHECK_NAMES,
    threshold: float = 0.7,
    progress: Callable[[int], None] | None = None,
) -> QualityReport:
    """The chosen checks (default: all) on every record; `near_duplicate`, by the same ROUGE-L
    engine as `dedupe`, is the costly one and runs only when chosen."""
    flagged: dict[str, list[int]] = {}
    for name in dict.fromkeys(checks):  # in the order asked, each once
        if name == "near_duplicate":
            flagged[name] = sorted(d["index"] for d in dedupe(records, threshold, progress=progress).dropped)
        else:
            flagged[name] = [i for i, r in enumerate(records) if RECORD_CHECKS[name](r)]
    return QualityReport(len(records), flagged)


# ---------------------------------------------------------------------------------------------
# dedupe

# What `dedupe` compares: the instruction alone (as self-instruct does), or more of the record.
# Of a conversation: all its user turns joined (both instruction keys), or all its assistant turns.
DEDUPE_KEYS: dict[str, Callable[[Record], str]] = {
    "instruction": lambda r: r.instruction if r.messages is None else _turns_text(r, "user"),
    "instruction+input": lambda r: (
        f"{r.instruction}\n{r.input}" if r.messages is None else _turns_text(r, "user")
    ),
    "output": lambda r: r.output if r.messages is None else _turns_text(r, "assistant"),
}


@dataclass(frozen=True)
class Deduped:
    kept: list[Record]
    dropped: list[dict[str, Any]]  # each dropped record with the kept record it collided with


def dedupe(
    records: Sequence[Record],
    threshold: float = 0.7,
    key: str = "instruction",
    progress: Callable[[int], None] | None = None,
) -> Deduped:
    """Greedy, in file order: a record is dropped when its ROUGE-L F1 with an earlier kept record
    is above `threshold` (the self-instruct filter, exact)."""
    kept, dropped = greedy_dedupe([DEDUPE_KEYS[key](r) for r in records], threshold, progress=progress)
    return Deduped(
        kept=[records[i] for i in kept],
        dropped=[dropped_row(d, records[d.index], records[d.kept_index].to_dict()) for d in dropped],
    )


def dedupe_stream(
    records: Iterable[Record],
    threshold: float = 0.7,
    key: str = "instruction",
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, Record, Dropped | None]]:
    """`dedupe` over a stream, read once: each record with its position and its fate (None: kept;
    else the `Dropped` that names the earlier kept record by position), in input order. Only the
    records read ahead of their fate are held: a block, or the first blocks the engine samples."""
    key_of = DEDUPE_KEYS[key]
    pending: dict[int, Record] = {}

    def texts() -> Iterator[str]:
        for i, r in enumerate(records):
            pending[i] = r
            yield key_of(r)

    for k, fate in greedy_dedupe_stream(texts(), threshold, progress=progress):
        yield k, pending.pop(k), fate


def dropped_row(dropped: Dropped, record: Record, kept: dict[str, Any]) -> dict[str, Any]:
    """A dropped record's line: it, the kept record (as written) it collided with, their score."""
    return {
        "index": dropped.index,
        "record": record.to_dict(),
        "duplicate_of_index": dropped.kept_index,
        "duplicate_of": kept,
        "rouge_l": round(dropped.score, 6),
    }


def dropped_path_for(output: str | os.PathLike) -> Path:
    """`kept.jsonl` -> `kept.dropped.jsonl` (JSONL whatever the kept file's form)."""
    out = Path(output)
    stem = out.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    return out.with_name(f"{stem}.dropped.jsonl")


# ---------------------------------------------------------------------------------------------
# convert

CONVERT_FORMATS = ("alpaca", "messages", "sharegpt", "seed")


def convert(records: Sequence[Record], to: str) -> list[dict[str, Any]]:
    """Records as Alpaca, OpenAI `messages`, ShareGPT `conversations` or seed-task rows. A
    conversation (several exchanges, or a system message) has no Alpaca or seed form: every such
    record is named, and nothing is written."""
    if to in ("alpaca", "seed"):
        _refuse_conversations(records, to)
    if to == "alpaca":
        return [r.to_dict() for r in records]
    if to in ("messages", "sharegpt"):
        layout = OPENAI if to == "messages" else SHAREGPT
        return [
            {**({"id": r.id} if r.id is not None else {}), layout.field: to_rows(r.conversation(), layout)}
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
    raise ValueError(f"unknown format {to!r}; one of {CONVERT_FORMATS}")


def _refuse_conversations(records: Sequence[Record], to: str) -> None:
    problems = []
    for i, r in enumerate(records):
        if r.messages is None:
            continue
        turns = sum(m.role != "system" for m in r.messages)
        system = r.messages[0].role == "system"
        what = (
            f"{turns} turns" + (" and a system message" if system else "")
            if turns > 2
            else "a system message"
        )
        problems.append(
            Problem(
                r.where or f"record {i + 1}",
                f"a conversation ({what}); {'an' if to == 'alpaca' else 'a'} {to} record holds one exchange and no system message",
                "convert to messages or sharegpt instead, or split the conversation into single exchanges "
                "(dropping the system message) yourself",
            )
        )
    if problems:
        raise ValidationError(problems, what=f"records to convert --to {to}")
