"""The `data` tools, each `run_<tool>(config) -> <Tool>Result`: check every output path, read and
validate the records (every problem reported before anything is written), run the pure step
(`tools.py`), write atomically. Any OSError on a user's path (a name too long, a full disk)
becomes a UserError naming the path (`@user_paths()`), never a traceback.

One function per tool rather than one `run` dispatching on the config's type: each tool returns
a different result, and every caller (the CLI, tests, a pipeline) knows which tool it runs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..core.errors import Problem, UserError, ValidationError
from ..core.files import check_output, user_paths, write_json_atomic
from ..core.records import (
    Record,
    check_records,
    iter_records,
    read_records,
    record_writer,
    split_records,
    write_records,
)
from ..core.shipped import PACKAGE_PREFIX
from .config import (
    CleanConfig,
    ConvertConfig,
    DedupeConfig,
    QualityConfig,
    SplitConfig,
    StatsConfig,
    TokenizeConfig,
    ValidateConfig,
)
from .score import below_min_score, read_rows, score_problems
from .tools import (
    convert,
    dedupe_stream,
    describe_stats,
    dropped_path_for,
    dropped_row,
    plot_lengths,
    pyplot,
    quality,
    stats,
)


def _bar(total: int | None, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="record", disable=not progress, file=sys.stderr)


def _dataset_name(path: str) -> str:
    name = Path(path.removeprefix(PACKAGE_PREFIX)).name  # a shipped file by its own name
    return name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidateResult:
    records: dict[str, int]  # file -> records, every one valid


@user_paths()
def run_validate(config: ValidateConfig) -> ValidateResult:
    """Every file checked; the problems of all of them are reported together."""
    counts: dict[str, int] = {}
    problems: list[Problem] = []
    for path in config.files:
        try:
            counts[path] = len(read_records(path, require_output=True))
        except ValidationError as e:
            problems += e.problems
    if problems:
        raise ValidationError(problems, what=", ".join(config.files))
    return ValidateResult(counts)


@dataclass(frozen=True)
class StatsResult:
    numbers: dict[str, Any]
    lines: list[str]  # the numbers as printed
    json_path: Path | None
    plot: Path | None  # None: not drawn (no matplotlib and no --plot asked for)


@user_paths()
def run_stats(config: StatsConfig, *, echo: Callable[[str], Any] | None = None) -> StatsResult:
    """The numbers first (each line passed to `echo` as it is ready, and written to --json), the
    histograms after: without matplotlib the default picture is skipped, and an explicit --plot
    fails only once the numbers are out."""
    json_path = (
        check_output(config.json_path, flag="--json", inputs=[config.file]) if config.json_path else None
    )
    plt = pyplot()
    plot: Path | None = None
    if config.plot or plt is not None:
        plot = check_output(
            config.plot or f"{_dataset_name(config.file)}.lengths.png", flag="--plot", inputs=[config.file]
        )
    records = read_records(config.file, require_output=False)
    numbers = stats(records)
    lines = describe_stats(numbers)
    if echo:
        for line in lines:
            echo(line)
    if json_path:
        write_json_atomic(json_path, numbers)
    if plot is not None and plt is None:
        raise UserError(
            f"--plot {plot}: drawing needs matplotlib, which is not installed"
            + (f" (the numbers are in {json_path})" if json_path else " (the numbers are printed above)"),
            "pip install 'alpaca-forge[plot]', or leave out --plot",
        )
    if plot is not None:
        plot_lengths(plt, records, plot, f"{Path(config.file).name}: lengths in words")
    return StatsResult(numbers, lines, json_path, plot)


@dataclass(frozen=True)
class QualityResult:
    records: list[Record]
    report: dict[str, Any]  # counts and examples per check
    report_path: Path | None


@user_paths()
def run_quality(config: QualityConfig, *, progress: bool = True) -> QualityResult:
    report_path = (
        check_output(config.report, flag="--report", inputs=[config.file]) if config.report else None
    )
    records = read_records(config.file, require_output=False)
    with _bar(len(records), "near duplicates", progress) as bar:
        found = quality(records, threshold=config.threshold, progress=bar.update)
    report = found.to_dict(records, config.examples)
    if report_path:
        write_json_atomic(report_path, report)
    return QualityResult(records, report, report_path)


@dataclass(frozen=True)
class CleanResult:
    kept: int
    removed: int
    output: Path
    removed_path: Path  # each removed record with the checks that flagged it


@user_paths()
def run_clean(config: CleanConfig, *, progress: bool = True) -> CleanResult:
    output = check_output(config.output, inputs=[config.file])
    removed_path = check_output(dropped_path_for(output), flag="--output", inputs=[config.file])
    # With --min-score the rows are kept as read (their scores and any lineage go through).
    rows = read_rows(config.file) if config.min_score is not None else None
    if rows is not None and (problems := score_problems(rows)):
        raise ValidationError(problems, what=config.file)
    records = [r.record for r in rows] if rows is not None else read_records(config.file, require_output=False)
    checks = tuple(c for c in config.checks if c != "none")
    with _bar(len(records), "near duplicates", progress and "near_duplicate" in checks) as bar:
        flagged = quality(records, checks, config.threshold, progress=bar.update).flagged_positions() if checks else {}
    if rows is not None and config.min_score is not None:
        for i, row in enumerate(rows):
            if why := below_min_score(row, config.min_score):
                flagged.setdefault(i, []).append(why)
        flagged = dict(sorted(flagged.items()))
    as_written = [r.row for r in rows] if rows is not None else [r.to_dict() for r in records]
    kept = [as_written[i] for i in range(len(records)) if i not in flagged]
    removed = [{"index": i, "checks": found, "record": as_written[i]} for i, found in flagged.items()]
    write_records(output, kept)
    write_records(removed_path, removed)
    return CleanResult(len(kept), len(removed), output, removed_path)


@dataclass(frozen=True)
class DedupeResult:
    records: int
    kept: int
    dropped: int
    output: Path
    dropped_path: Path  # each dropped record with the kept one it collided with, and their score
    elapsed_s: float  # the whole job: validating, deduping, writing


class _KeptSpill:
    """The kept records, as written, in an unnamed temporary file beside the output (gone once
    closed, after a kill -9 too), each found again by its position: what a dropped record's line
    quotes. In memory: 16 bytes per record read, whatever the records hold."""

    def __init__(self, file: IO[bytes]) -> None:
        self.fd = file.fileno()
        self.offset, self.size = array("q"), array("q")  # per position; -1: dropped
        self.end = 0
        self.get = functools.lru_cache(maxsize=4096)(self._read)

    def add(self, row: dict[str, Any] | None) -> None:
        """The next record's row when kept, None when dropped (records come in input order)."""
        if row is None:
            self.offset.append(-1)
            self.size.append(-1)
            return
        data = json.dumps(row).encode("ascii")  # ASCII: any string round-trips, lone surrogates too
        written = 0
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], self.end + written)
        self.offset.append(self.end)
        self.size.append(len(data))
        self.end += len(data)

    def _read(self, index: int) -> dict[str, Any]:
        at, size = self.offset[index], self.size[index]
        if at < 0:
            raise ValueError(f"record {index} was not kept")
        data = b""
        while len(data) < size:
            data += os.pread(self.fd, size - len(data), at + len(data))
        return json.loads(data)


@user_paths()
def run_dedupe(config: DedupeConfig, *, progress: bool = True) -> DedupeResult:
    """Two passes over the file, which is never held whole: the first validates every record,
    holding none (every problem reported at once, before anything is computed or written); the
    second dedupes as it reads, each record written out as its fate arrives, into temporary
    files that replace the outputs at the end. Held: the kept texts' token data (`core.rouge_dedupe`),
    the records read ahead of their fate, 16 bytes per record (`_KeptSpill`)."""
    output = check_output(config.output, inputs=[config.file])
    dropped_path = check_output(
        config.dropped or dropped_path_for(output),
        flag="--dropped" if config.dropped else "--output",
        inputs=[config.file],
    )
    if dropped_path.resolve() == output.resolve():
        raise UserError(
            f"--dropped {dropped_path}: is the --output file too; the dropped records would replace the kept ones",
            f"give --dropped another file, or leave it out (then: {dropped_path_for(output)})",
        )
    start = time.perf_counter()
    with _bar(None, "validate", progress) as bar:
        total = check_records(config.file, require_output=False, progress=bar.update)
    problems: list[Problem] = []
    kept = dropped = 0
    with (
        _bar(total, "dedupe", progress) as bar,
        record_writer(output) as keep,
        record_writer(dropped_path) as drop,
        tempfile.TemporaryFile(dir=output.parent) as spill_file,
    ):
        spill = _KeptSpill(spill_file)
        records = iter_records(config.file, problems, require_output=False)
        for _, record, fate in dedupe_stream(records, config.threshold, config.key, progress=bar.update):
            if fate is None:
                row = record.to_dict()
                keep(row)
                spill.add(row)
                kept += 1
            else:
                drop(dropped_row(fate, record, spill.get(fate.kept_index)))
                spill.add(None)
                dropped += 1
        if problems:  # the file changed after the first pass: nothing is written
            raise ValidationError(problems, what=str(config.file))
    elapsed = time.perf_counter() - start
    return DedupeResult(kept + dropped, kept, dropped, output, dropped_path, elapsed)


@dataclass(frozen=True)
class SplitResult:
    train: int
    val: int
    train_path: Path
    val_path: Path


@user_paths()
def run_split(config: SplitConfig) -> SplitResult:
    """The one seeded split (`core.records.split_records`, as `train --val-size` holds out)."""
    out_dir = check_output(config.output_dir, flag="--output-dir", folder=True)
    paths = [
        check_output(out_dir / name, flag="--output-dir", inputs=[config.file])
        for name in ("train.jsonl", "val.jsonl")
    ]
    train, val = split_records(read_records(config.file, require_output=False), config.val_size, config.seed)
    train_path, val_path = write_records(paths[0], train), write_records(paths[1], val)
    return SplitResult(len(train), len(val), train_path, val_path)


@dataclass(frozen=True)
class ConvertResult:
    records: int
    output: Path


@user_paths()
def run_convert(config: ConvertConfig) -> ConvertResult:
    output = check_output(config.output, inputs=[config.file])
    rows = convert(read_records(config.file, require_output=False), config.to)
    write_records(output, rows)
    return ConvertResult(len(rows), output)


@dataclass(frozen=True)
class TokenizeResult:
    summary: str  # examples, tokens, trained tokens, what was cut or left out
    report: dict[str, Any]
    format: str
    shown: list[str]  # the first --show examples, masked text told apart from trained text
    output: Path | None


@user_paths()
def run_tokenize(config: TokenizeConfig, *, color: bool = False) -> TokenizeResult:
    """Records -> exactly the ids and labels `train` uses (`core.examples.tokenize_records`)."""
    from ..core.examples import describe_example, tokenize_records
    from ..core.models import load_tokenizer, model_format

    output = check_output(config.output, inputs=[config.file]) if config.output else None
    records = read_records(config.file)
    tokenizer = load_tokenizer(config.model)
    fmt = model_format(config.model, config.format, config.system, tokenizer, for_training=True)
    examples, report = tokenize_records(
        records,
        tokenizer,
        fmt,
        config.max_seq_len,
        config.train_on_inputs,
        assistant_turns=config.assistant_turns,
    )
    if output:
        write_records(
            output, ({"index": e.record, "input_ids": e.input_ids, "labels": e.labels} for e in examples)
        )
    shown = [
        f"--- record {e.record + 1}: {len(e.input_ids)} tokens, {e.trained_tokens} trained"
        + (" (response cut, EOS kept)" if e.truncated else "")
        + "\n"
        + describe_example(e, tokenizer, color)
        for e in examples[: config.show]
    ]
    return TokenizeResult(report.summary(), report.to_dict(), fmt.name, shown, output)
