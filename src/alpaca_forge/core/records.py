"""Alpaca records: `{instruction, input, output}`, read from and written to JSON arrays or JSONL.

Reading streams the file (a JSON array is parsed item by item, never loaded whole with `json.load`)
and remembers where each item came from, so every problem can be reported as `file:line` plus the
field and a fix. Three input shapes are understood:

- Alpaca: `{"instruction", "input", "output"}`, as in the 52K `alpaca_data.json`;
- seed tasks and evaluation tasks: `{"id", "instruction", "instances": [{"input", "output"}]}`,
  one record per instance;
- chat messages: `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`, one exchange;
- predictions: `{"instruction", "input", "response"}`: the response is read as the output;
- anything else is reported, never dropped silently.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import Problem, UserError, ValidationError
from .files import atomic_writer

_RECORD_EXAMPLE = (
    '{"instruction": "Name three primary colours.", "input": "", "output": "Red, yellow and blue."}'
)


@dataclass(frozen=True)
class Record:
    """One instruction-following example."""

    instruction: str
    input: str = ""
    output: str = ""
    id: str | None = None  # kept from the source when it has one (seed and evaluation tasks do)

    def to_dict(self) -> dict[str, str]:
        d = {"instruction": self.instruction, "input": self.input, "output": self.output}
        if self.id is not None:
            d = {"id": self.id, **d}
        return d


# ---------------------------------------------------------------------------------------------
# Reading: raw JSON items with their location


def _open_binary(path: Path) -> IO[bytes]:
    if not path.exists():
        raise UserError(
            f"{path}: no such file", "check the path; relative paths start from the current directory"
        )
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a data file", "name a .json or .jsonl file inside it")
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})", "check the file's permissions") from e


def _decode_line(raw: bytes, where: str, problems: list[Problem]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(
            Problem(
                where,
                f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                "save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.json > out.json`",
            )
        )
        return raw.decode("utf-8", errors="replace")


# What reading a damaged file raises: a cut-off gzip stream (EOFError), a corrupt one (zlib.error,
# or gzip's OSError on a bad header or checksum), a failing disk (OSError).
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _read_error(path: Path, e: BaseException) -> UserError:
    if isinstance(e, EOFError):
        return UserError(
            f"{path}: the compressed file ends early: it is cut off",
            "the file was truncated while being written or copied; regenerate or re-copy it",
        )
    return UserError(f"{path}: cannot be read ({e})", "check that the file is not damaged")


def _lines(f: IO[bytes], path: Path) -> Iterator[bytes]:
    """The file's lines, a read that fails part way through reported as the user's problem."""
    try:
        yield from f
    except _READ_ERRORS as e:
        raise _read_error(path, e) from e


def _first_char(path: Path) -> str:
    with _open_binary(path) as f:
        try:
            head = f.read(4096)
        except _READ_ERRORS as e:
            raise _read_error(path, e) from e
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return text[:1]


def iter_json_items(path: str | os.PathLike, problems: list[Problem]) -> Iterator[tuple[str, Any]]:
    """Yield `(where, value)` for each item of a JSON array or each line of a JSONL file.

    Problems (bad JSON, bad UTF-8, a truncated array) are appended to `problems` rather than
    raised, so that a caller can report them all at once; items that cannot be parsed are skipped.
    """
    path = Path(path)
    first = _first_char(path)
    if first == "":
        problems.append(
            Problem(str(path), "the file is empty", f"add records, one per line: {_RECORD_EXAMPLE}")
        )
        return
    if first == "[":
        yield from _iter_json_array(path, problems)
    else:
        yield from _iter_jsonl(path, problems)


def _iter_jsonl(path: Path, problems: list[Problem]) -> Iterator[tuple[str, Any]]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(_lines(f, path), start=1):
            where = f"{path}:{lineno}"
            text = _decode_line(raw, where, problems).rstrip("\r\n")
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(
                    Problem(
                        where,
                        f"not valid JSON ({e.msg}: column {e.colno})",
                        f"each line of a .jsonl file must be one JSON object, e.g. {_RECORD_EXAMPLE}",
                    )
                )


_WHITESPACE = " \t\r\n"


def _iter_json_array(path: Path, problems: list[Problem]) -> Iterator[tuple[str, Any]]:
    """Parse `[item, item, ...]` one item at a time, reading the file line by line.

    `buf[pos:]` is the text not yet parsed; `buf_line` is the file line on which `buf` starts.
    """
    decoder = json.JSONDecoder()
    buf, pos, buf_line, next_line = "", 0, 1, 1
    index = 0
    state = "open"  # open -> item -> sep -> item ... -> done
    with _open_binary(path) as f:
        lines = _lines(f, path)
        eof = False

        def more() -> bool:
            nonlocal buf, pos, buf_line, next_line, eof
            raw = next(lines, None)
            if raw is None:
                eof = True
                return False
            text = _decode_line(raw, f"{path}:{next_line}", problems)
            if next_line == 1:
                text = text.lstrip("\ufeff")
            next_line += 1
            # Drop what is parsed so the buffer holds only the current item.
            buf_line += buf.count("\n", 0, pos)
            buf, pos = buf[pos:] + text, 0
            return True

        def line_at(p: int) -> int:
            return buf_line + buf.count("\n", 0, p)

        while True:
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                pos += 1
            if pos == len(buf):
                if more():
                    continue
                if state != "done":
                    problems.append(
                        Problem(
                            f"{path}[{index}] (line {line_at(pos)})",
                            "the file ends inside the JSON array (no closing ']'): it is cut off",
                            "the file was truncated while being written or copied; regenerate or re-copy it",
                        )
                    )
                return
            ch = buf[pos]
            if state == "open":
                pos += 1  # the '[' that _first_char saw
                state = "item"
            elif state == "item":
                if ch == "]" and index == 0:
                    pos += 1
                    state = "done"
                    continue
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if not eof and more():
                        continue  # the item goes on over the next line
                    # At the end of the file an unclosed item means the file was cut short.
                    cut_off = e.pos >= len(buf.rstrip()) or e.msg.startswith("Unterminated string")
                    problems.append(
                        Problem(
                            f"{path}[{index}] (line {line_at(e.pos)})",
                            "the file ends in the middle of this record: it is cut off"
                            if cut_off
                            else f"not valid JSON ({e.msg})",
                            "the file was truncated while being written or copied; regenerate or re-copy it"
                            if cut_off
                            else "fix the JSON syntax at that line (a missing comma or quote is the usual cause)",
                        )
                    )
                    return
                yield f"{path}[{index}] (line {line_at(pos)})", value
                index += 1
                pos = end
                state = "sep"
            elif state == "sep":
                if ch == ",":
                    pos += 1
                    state = "item"
                elif ch == "]":
                    pos += 1
                    state = "done"
                else:
                    problems.append(
                        Problem(
                            f"{path}:{line_at(pos)}",
                            f"expected ',' or ']' after record {index - 1}, found {ch!r}",
                            "separate records with commas and close the array with ']'",
                        )
                    )
                    return
            else:  # done
                problems.append(
                    Problem(
                        f"{path}:{line_at(pos)}",
                        "there is more text after the closing ']' of the array",
                        "remove it, or keep one JSON array per file",
                    )
                )
                return


# ---------------------------------------------------------------------------------------------
# Validation: raw items -> records


def _check_text(value: Any, field: str, where: str, problems: list[Problem], *, required: bool) -> str | None:
    if value is None and not required:
        return ""
    if value is None:
        problems.append(Problem(where, f"field '{field}' is missing", f'add "{field}": "..." to the record'))
        return None
    if not isinstance(value, str):
        problems.append(
            Problem(
                where,
                f"field '{field}' must be a string, got {type(value).__name__} ({json.dumps(value)[:40]})",
                f'write \'{field}\' as a JSON string, e.g. "{field}": "..."'
                + ("" if required else ' (or "" when empty)'),
            )
        )
        return None
    return value


def records_from_item(value: Any, where: str, *, require_output: bool) -> tuple[list[Record], list[Problem]]:
    """Turn one raw JSON item into records, or into the problems that stop it from being one."""
    problems: list[Problem] = []
    if not isinstance(value, dict):
        problems.append(
            Problem(
                where,
                f"expected a JSON object, got {type(value).__name__}",
                f"write each record as {_RECORD_EXAMPLE}",
            )
        )
        return [], problems

    raw_id = value.get("id")
    rec_id = None if raw_id is None else str(raw_id)
    if "messages" in value:  # chat format: the first user turn and the assistant's answer to it
        return _records_from_messages(value["messages"], where, rec_id, require_output)

    instruction = _check_text(value.get("instruction"), "instruction", where, problems, required=True)
    if instruction is not None and not instruction.strip():
        problems.append(
            Problem(where, "field 'instruction' is empty", "write the task to perform in 'instruction'")
        )

    if "instances" in value:  # seed-task and evaluation-task format
        instances = value["instances"]
        if not isinstance(instances, list) or not instances:
            problems.append(
                Problem(
                    where,
                    "field 'instances' must be a non-empty list",
                    'write it as "instances": [{"input": "...", "output": "..."}]',
                )
            )
            return [], problems
        records = []
        for k, inst in enumerate(instances):
            inst_where = f"{where} instances[{k}]"
            if not isinstance(inst, dict):
                problems.append(
                    Problem(
                        inst_where, "expected a JSON object", 'write it as {"input": "...", "output": "..."}'
                    )
                )
                continue
            inp = _check_text(inst.get("input"), "input", inst_where, problems, required=False)
            out = _check_text(inst.get("output"), "output", inst_where, problems, required=require_output)
            if not problems:
                sub_id = rec_id if len(instances) == 1 or rec_id is None else f"{rec_id}#{k}"
                records.append(Record(instruction or "", inp or "", out or "", sub_id))
        return ([], problems) if problems else (records, [])

    inp = _check_text(value.get("input"), "input", where, problems, required=False)
    # Prediction files (`infer`'s, the evaluation predictions) call the answer "response".
    field = "output" if "output" in value or "response" not in value else "response"
    out = _check_text(value.get(field), field, where, problems, required=require_output)
    if problems:
        return [], problems
    return [Record(instruction or "", inp or "", out or "", rec_id)], []


def _records_from_messages(
    messages: Any, where: str, rec_id: str | None, require_output: bool
) -> tuple[list[Record], list[Problem]]:
    example = '"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return [], [
            Problem(
                where, "field 'messages' must be a list of {role, content} objects", f"write it as {example}"
            )
        ]
    turns = [m for m in messages if m.get("role") != "system"]
    user = turns[0] if turns else {}
    if user.get("role") != "user" or not isinstance(user.get("content"), str) or not user["content"].strip():
        return [], [
            Problem(where, "'messages' must start with a user message with text", f"write it as {example}")
        ]
    reply = turns[1] if len(turns) > 1 else None
    if reply is not None and (reply.get("role") != "assistant" or not isinstance(reply.get("content"), str)):
        return [], [
            Problem(where, "the second message must be the assistant's, with text", f"write it as {example}")
        ]
    if reply is None and require_output:
        return [], [Problem(where, "'messages' has no assistant answer", f"add it: {example}")]
    if len(turns) > 2:
        return [], [
            Problem(
                where,
                f"'messages' has {len(turns)} turns; an Alpaca record holds one exchange",
                "split multi-turn conversations into one record per exchange",
            )
        ]
    return [Record(user["content"], "", reply["content"] if reply else "", rec_id)], []


def read_records(path: str | os.PathLike, *, require_output: bool = True) -> list[Record]:
    """Read and validate every record of a JSON or JSONL file (gzip too).

    Raises `ValidationError` listing every problem found, with file, line and field; nothing is
    dropped silently. With `require_output=False` (inference inputs) 'output' may be absent.
    """
    problems: list[Problem] = []
    records: list[Record] = []
    for where, value in iter_json_items(path, problems):
        recs, probs = records_from_item(value, where, require_output=require_output)
        records.extend(recs)
        problems.extend(probs)
    if problems:
        raise ValidationError(problems, what=str(path))
    if not records:
        raise UserError(
            f"{path}: holds no records", f"add records, one JSON object per line: {_RECORD_EXAMPLE}"
        )
    return records


# ---------------------------------------------------------------------------------------------
# Writing


def write_records(path: str | os.PathLike, records: Iterable[Record | dict]) -> Path:
    """Write records atomically: a `.json` path gets a JSON array (indented like `alpaca_data.json`),
    anything else JSONL (gzip when the name ends in `.gz`). A crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    as_array = path.suffix == ".json"
    with atomic_writer(path) as f:
        if as_array:
            f.write("[")
        for i, rec in enumerate(records):
            d = rec.to_dict() if isinstance(rec, Record) else rec
            if as_array:
                f.write(("," if i else "") + "\n" + _indent(json.dumps(d, ensure_ascii=False, indent=4)))
            else:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        if as_array:
            f.write("\n]\n")
    return path


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def split_records(
    records: Sequence[Record], val_size: float, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """The one seeded train/validation split (`data split` and `train --val-size` hold out the same
    records for the same seed and size). `val_size` below 1 is a share, otherwise a count; both
    halves keep the file's order, so a split is easy to read and to diff."""
    n = len(records)
    if val_size <= 0 or (val_size >= 1 and val_size != int(val_size)):
        raise UserError(
            f"--val-size must be a share in (0, 1) or a whole count, got {val_size:g}",
            "e.g. --val-size 0.05 or --val-size 200",
        )
    count = round(val_size * n) if val_size < 1 else int(val_size)
    if not 0 < count < n:
        raise UserError(
            f"--val-size {val_size:g} holds out {count} of {n} records, leaving "
            + ("nothing to train on" if count >= n else "no validation record"),
            f"leave at least one record on each side: a count from 1 to {n - 1}, or a share that gives one",
        )
    held = set(random.Random(seed).sample(range(n), count))
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]
