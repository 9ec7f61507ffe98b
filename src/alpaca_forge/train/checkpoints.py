"""Checkpoints that describe themselves and count only once complete.

The Trainer writes `OUTPUT/checkpoint-N` (weights, optimiser, scheduler, RNG states); we add the
run's description (`alpaca_forge_train.json`: the whole config, the data's fingerprints, the
step) and then, last, the `.complete` mark. Only a marked checkpoint is resumed from or counts
towards rotation, so a kill at any moment leaves the newest complete one untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.files import fsync_dir, write_json_atomic, write_text_atomic
from ..core.models import ADAPTER_BASE_FILE
from .config import TrainConfig

CONFIG_FILE = ADAPTER_BASE_FILE  # in every checkpoint and in the output: what made it
COMPLETE = ".complete"  # written last into a checkpoint: only then is it one to resume from
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# Settings that may change when a run resumes; every other one must match the checkpoint's.
MAY_CHANGE_ON_RESUME = frozenset(
    {"output", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "threads", "merge"}
)


def checkpoints(output: Path, complete_only: bool = True) -> list[Path]:
    """The run's checkpoints, oldest first."""
    found = []
    for p in output.glob("checkpoint-*"):
        m = _CHECKPOINT.fullmatch(p.name)
        if m and p.is_dir() and (not complete_only or (p / COMPLETE).is_file()):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def mark_complete(folder: Path, about: dict[str, Any]) -> None:
    """Describe a checkpoint the Trainer has written, put every file of it on disk, then mark it."""
    write_json_atomic(folder / CONFIG_FILE, about)
    for f in folder.rglob("*"):  # everything on disk before the mark (DeepSpeed writes subfolders)
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    write_text_atomic(folder / COMPLETE, f"{about['step']}\n")
    fsync_dir(folder)


def rotate(output: Path, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints (called only after a new one is complete)."""
    for old in checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def remove_incomplete(output: Path) -> None:
    """A checkpoint a kill cut short is never resumed from; clear it so it cannot confuse anyone."""
    complete = set(checkpoints(output))
    for p in checkpoints(output, complete_only=False):
        if p not in complete:
            shutil.rmtree(p, ignore_errors=True)


def check_resumable(config: TrainConfig, facts: dict[str, Any], checkpoint: Path) -> None:
    """A checkpoint resumes only the run that wrote it: same settings and same data."""
    try:
        saved = json.loads((checkpoint / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"{checkpoint}: its description {CONFIG_FILE} is unreadable ({e})",
            "resume from another checkpoint or start over",
        ) from e
    now = json.loads(json.dumps(config.to_dict()))  # as saved: tuples are lists
    diffs = [
        f"{k}: {saved['config'].get(k)!r} then, {v!r} now"
        for k, v in now.items()
        if k not in MAY_CHANGE_ON_RESUME and saved["config"].get(k) != v
    ]
    for k in ("data_fingerprint", "val_fingerprint"):
        if saved.get(k) != facts.get(k):
            diffs.append(f"{k}: {saved.get(k)} then, {facts.get(k)} now (the data changed)")
    if diffs:
        raise UserError(
            f"{checkpoint} was written by a different run: " + "; ".join(diffs),
            "resume with the same settings and data, or train into a new --output",
        )


@contextlib.contextmanager
def write_failures(what: str, intact: str) -> Iterator[None]:
    """A failed write (out of disk or quota, a file-size limit), whichever library was writing,
    becomes a UserError: `what` failed, what is still `intact`, and how to carry on."""
    try:
        yield
    except Exception as e:
        if not is_write_failure(e):
            raise
        reason = (getattr(e, "strerror", None) or str(e)).splitlines()[0][:200]
        raise UserError(
            f"{what} ({reason}); {intact}", "free disk space, then run the same command with --resume"
        ) from e


def is_write_failure(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    text = str(e)
    return (type(e).__name__ == "SafetensorError" and "I/O error" in text) or (
        isinstance(e, RuntimeError) and ("file write failed" in text or "PytorchStreamWriter" in text)
    )
