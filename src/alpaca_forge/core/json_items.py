"""Data files read item by item: a JSON array or JSONL lines (gzip too), each item with its location.

A JSON array is parsed one item at a time as the file is read line by line, never loaded whole
with `json.load`, so a 52K-record file costs one item's memory. Every item comes with where it
was written (`file:line` for JSONL, `file[index] (line n)` in an array), and every problem (bad
UTF-8, bad JSON, a file cut off in the middle) is collected, not raised, so that a caller can
report them all at once. What the items mean is the caller's: `core/records.py` makes records.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import Problem, UserError
from .shipped import input_path

# The fix that problems with a record file suggest quotes one whole record.
RECORD_EXAMPLE = (
    '{"instruction": "Name three primary colours.", "input": "", "output": "Red, yellow and blue."}'
)


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
    name = str(path)  # as the user wrote it: `package:demo-seeds.jsonl` stays so in messages
    path = input_path(path)
    first = _first_char(path)
    if first == "":
        problems.append(Problem(name, "the file is empty", f"add records, one per line: {RECORD_EXAMPLE}"))
        return
    if first == "[":
        yield from _iter_json_array(path, name, problems)
    else:
        yield from _iter_jsonl(path, name, problems)


def _iter_jsonl(path: Path, name: str, problems: list[Problem]) -> Iterator[tuple[str, Any]]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(_lines(f, path), start=1):
            where = f"{name}:{lineno}"
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
                        f"each line of a .jsonl file must be one JSON object, e.g. {RECORD_EXAMPLE}",
                    )
                )


_WHITESPACE = " \t\r\n"


def _iter_json_array(path: Path, name: str, problems: list[Problem]) -> Iterator[tuple[str, Any]]:
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
            text = _decode_line(raw, f"{name}:{next_line}", problems)
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
                            f"{name}[{index}] (line {line_at(pos)})",
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
                            f"{name}[{index}] (line {line_at(e.pos)})",
                            "the file ends in the middle of this record: it is cut off"
                            if cut_off
                            else f"not valid JSON ({e.msg})",
                            "the file was truncated while being written or copied; regenerate or re-copy it"
                            if cut_off
                            else "fix the JSON syntax at that line (a missing comma or quote is the usual cause)",
                        )
                    )
                    return
                yield f"{name}[{index}] (line {line_at(pos)})", value
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
                            f"{name}:{line_at(pos)}",
                            f"expected ',' or ']' after record {index - 1}, found {ch!r}",
                            "separate records with commas and close the array with ']'",
                        )
                    )
                    return
            else:  # done
                problems.append(
                    Problem(
                        f"{name}:{line_at(pos)}",
                        "there is more text after the closing ']' of the array",
                        "remove it, or keep one JSON array per file",
                    )
                )
                return
