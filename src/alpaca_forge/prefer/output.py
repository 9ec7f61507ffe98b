"""Where `prefer` writes: the output, the files beside it, and the result it returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.files import atomic_writer, write_json_atomic


@dataclass(frozen=True)
class PreferResult:
    output: Path
    pairs: int  # rows written (SFT records with --expert-iteration)
    summary: dict[str, Any] = field(default_factory=dict)  # as OUTPUT.summary.json holds it
    summary_path: Path | None = None


def beside(output: Path, suffix: str) -> Path:
    """A file next to the output: pairs.jsonl -> pairs.answers.jsonl."""
    stem = output.name
    for ext in (".gz", ".jsonl", ".json"):
        stem = stem.removesuffix(ext)
    return output.with_name(stem + suffix)


def done(output: Path, written: int, summary: dict[str, Any]) -> PreferResult:
    path = write_json_atomic(beside(output, ".summary.json"), summary)
    return PreferResult(output, written, summary, path)


def write_records(output: Path, rows: list[dict[str, Any]]) -> None:
    """SFT records, JSONL, written whole and atomically."""
    with atomic_writer(output) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
