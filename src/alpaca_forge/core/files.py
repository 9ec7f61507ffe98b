"""Files every stage writes: checked before any work, replaced atomically, appended durably.

- `check_output` looks at an output path before a stage does any work: it creates missing parent
  folders and refuses a directory, a path under a regular file, or the stage's own input, each
  with the path named and a fix. `user_paths` turns any later OSError into the same kind of error.
- `atomic_writer` / `write_text_atomic`: a reader sees the old file or the new one, never half.
- `staged_output`: a whole folder or large file (an exported model) written under a temporary
  name and moved into place at the end; nothing half-written stays behind on a failure.
- `open_append` / `read_appended_jsonl`: the append-only JSONL files of resumable jobs (infer,
  generate); a line a kill cut short is dropped on the next start and its work redone.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import UserError
from .shipped import input_path, refuse_shipped_output

log = logging.getLogger("alpaca_forge")


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 4 MiB blocks (~0.3 s per 100 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def under_a_file(path: Path) -> Path | None:
    """The file among `path`'s parents that keeps anything from being written there, if any."""
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_output(
    path: str | os.PathLike,
    *,
    flag: str = "--output",
    inputs: Iterable[str | os.PathLike] = (),
    folder: bool = False,
) -> Path:
    """An output path a stage may write: parents made, never a folder (or, with `folder`, never a
    file), never under a file, never one of the stage's `inputs`, never a shipped file."""
    refuse_shipped_output(path, flag)
    try:
        return _check_output(Path(path).expanduser(), flag, inputs, folder)
    except OSError as e:  # a name too long, a folder we may not look into ...
        raise UserError(f"{flag} {path}: cannot be used ({e.strerror or e})", f"choose another {flag}") from e


def _check_output(out: Path, flag: str, inputs: Iterable[str | os.PathLike], folder: bool) -> Path:
    blocker = under_a_file(out)
    if blocker is not None:
        raise UserError(
            f"{flag} {out}: {blocker} is a file, so nothing can be written under it",
            f"choose a {flag} whose folders are folders (or move {blocker} away)",
        )
    if folder and out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: is a file, not a folder", f"give {flag} a folder path")
    if not folder and out.is_dir():
        raise UserError(
            f"{flag} {out}: is a folder, not a file",
            f"name a file inside it, e.g. {flag} {out / 'out.jsonl'}",
        )
    for source in inputs:
        src = input_path(source).expanduser()
        if src.exists() and out.exists() and os.path.samefile(src, out):
            raise UserError(
                f"{flag} {out}: is the input file; writing it would destroy the data being read",
                f"choose another {flag}, e.g. {out.with_name(out.stem + '.out' + out.suffix)}",
            )
    target = out if folder else out.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"{flag} {out}: cannot create {target} ({e.strerror})",
            f"choose a {flag} in a folder you can write to",
        ) from e
    return out


@contextlib.contextmanager
def user_paths(what: str = "a file") -> Iterator[None]:
    """An OSError on a user's path becomes a UserError naming the path (never a traceback)."""
    try:
        yield
    except OSError as e:
        name = e.filename or what
        raise UserError(
            f"{name}: cannot be written or read ({e.strerror or e})",
            "check the path, its permissions and the free disk space",
        ) from e


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(
    path: str | os.PathLike, *, binary: bool = False, gzip_gz: bool = True
) -> Iterator[IO[Any]]:
    """Write into a temporary file beside `path`, fsync, then rename over it (gzip for `.gz`
    unless `gzip_gz` is off)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    opener: Any = gzip.open if gzip_gz and path.suffix == ".gz" else open
    mode = "wb" if binary else "wt"
    try:
        with opener(tmp, mode, **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
        with open(tmp, "rb+") as raw:
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace a small text file all at once: readers see the old content or the new, never half."""
    with atomic_writer(path, gzip_gz=False) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def open_append(path: Path, flag: str = "--output", *, private: bool = False) -> IO[str]:
    """An append-only output, opened for a resumable job. `private`: only its owner may read it
    (0600; a log that holds prompts): one that exists readable by others is narrowed to 0600,
    with a warning (or only the warning, where it is not ours to change)."""
    refuse_shipped_output(path, flag)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600 if private else 0o666)
    except OSError as e:
        raise UserError(
            f"{flag} {path}: cannot be written ({e.strerror})",
            f"choose a {flag} in a folder you can write to",
        ) from e
    mode = os.fstat(fd).st_mode & 0o777
    if private and mode & 0o077:
        try:
            os.fchmod(fd, 0o600)
            log.warning("%s %s was readable by others (mode %03o); it is now 0600", flag, path, mode)
        except OSError as e:
            log.warning(
                "%s %s is readable by others (mode %03o) and cannot be narrowed (%s): what it holds "
                "can be read by them",
                flag,
                path,
                mode,
                e.strerror,
            )
    return os.fdopen(fd, "a", encoding="utf-8")


def sync(f: IO[Any]) -> None:
    """Flushed and on disk: survives a kill and a power cut from here on."""
    f.flush()
    os.fsync(f.fileno())


def read_appended_jsonl(
    path: str | os.PathLike, required: Sequence[str], command: str, fix: str
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for each line of a file that `command` appends to, to resume from.

    A last line cut off by a kill in mid-write is removed from the file (its record is redone);
    any other line that is not a JSON object with the `required` string fields stops the run,
    before anything is removed: a file that is not ours is left as it was.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # past it: a last line without its newline
    rows = []
    # Split on "\n" alone: rows hold text with other line breaks (U+2028, NEL) unescaped.
    lines = data[:keep].decode("utf-8", errors="replace").split("\n")[:-1]
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _appended_row(line, required)
        if row is None:
            raise UserError(f"{path}:{lineno}: not a line that `alpaca-forge {command}` wrote", fix)
        rows.append((lineno, row))
    tail = data[keep:].decode("utf-8", errors="replace")
    if tail.strip() and not _cut_off_row(tail, required):
        raise UserError(f"{path}:{len(lines) + 1}: not a line that `alpaca-forge {command}` wrote", fix)
    if tail:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return rows


def _appended_row(line: str, required: Sequence[str]) -> dict[str, Any] | None:
    """The row a line holds, or None when it is not a JSON object with the `required` strings."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = isinstance(row, dict) and all(isinstance(row.get(k), str) for k in required)
    return row if ok else None


def _cut_off_row(tail: str, required: Sequence[str]) -> bool:
    """Whether a last line without its newline is one of ours that a kill cut short: the start
    of a JSON object (as every row is written), or a whole row whose newline did not make it."""
    try:
        json.loads(tail)
    except json.JSONDecodeError:
        return tail.lstrip().startswith("{")
    return _appended_row(tail, required) is not None


def refuse_existing(path: str | os.PathLike, *, force: bool, folder: bool, flag: str = "--output") -> Path:
    """`path`, unless it exists and `force` is off, or it is a file where a folder is to be
    written (or a folder where a file is): `--force` replaces an output, never a different kind
    of thing. Checked again by `staged_output`; call it early too, before minutes of loading."""
    refuse_shipped_output(path, flag)
    out = Path(path).expanduser()
    if folder and out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: is a file, not a folder", f"give {flag} a folder path")
    if not folder and out.is_dir():
        raise UserError(
            f"{flag} {out}: is a folder, not a file",
            f"name a file inside it, e.g. {flag} {out / 'model.gguf'}",
        )
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(
            f"{flag} {out}: already exists (nothing is overwritten silently)",
            f"choose another {flag}, or add --force to replace it",
        )
    return out


@contextlib.contextmanager
def staged_output(
    path: str | os.PathLike, *, force: bool, folder: bool, flag: str = "--output"
) -> Iterator[Path]:
    """Write a whole output (a folder or a file) under a temporary name beside `path`; it takes
    `path`'s place only once everything is written, so a failure (a full disk, a wrong input found
    half-way, Ctrl-C) leaves nothing half-written behind. An existing `path` is refused unless
    `force`, and then replaced only at the end.

    Yields the temporary path to write (not created: make the folder or the file yourself)."""
    out = refuse_existing(path, force=force, folder=folder, flag=flag)
    blocker = under_a_file(out)
    if blocker is not None:
        raise UserError(
            f"{flag} {out}: {blocker} is a file, so nothing can be written under it",
            f"choose a {flag} whose folders are folders (or move {blocker} away)",
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"{flag} {out}: cannot create {out.parent} ({e.strerror})",
            f"choose a {flag} in a folder you can write to",
        ) from e
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        try:
            yield tmp
        except OSError as e:
            raise UserError(
                f"{flag} {out}: writing failed ({e.strerror or e}); nothing was left behind",
                "free some disk space (or choose a disk with room) and run the command again"
                if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
                else f"check the free disk space and that {out.parent} is writable, then run the command again",
            ) from e
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists() or out.is_symlink():
            os.replace(out, old)  # a rename: a folder or a file alike
        os.replace(tmp, out)
        fsync_dir(out.parent)
        _remove(old)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
