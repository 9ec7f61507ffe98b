"""The raters' ratings: OUTPUT/ratings.jsonl, appended to, fsync'd, read back on every start.

One line per rating, `{rater, item, first, second, verdict, at}`: the systems shown as Response A
(`first`) and Response B (`second`), and the verdict in those slots ("A", "B" or "tie"), as
`eval pairwise` records the LLM judge's. An undo is a line of its own, `{rater, item, undo: true,
at}`: the file is never rewritten, so it is also the history of what every rater did. A last line
cut short by a kill is dropped on the next start (that one rating is asked again).

One server writes a folder at a time: the file is locked (flock) while a store holds it open.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from ...core.errors import UserError
from ...core.files import open_append, read_appended_jsonl, sync
from ...judging.judge import Judgement, Verdict

RATINGS_FILE = "ratings.jsonl"
VERDICTS = ("A", "B", "tie")
# A rater's name is also a folder of the report (OUTPUT/raters/NAME/).
RATER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
RATER_NAME_HELP = "1 to 40 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class Rating:
    """One rater's verdict on one item, in the order they saw it."""

    rater: str
    item: str
    first: str  # the system shown as Response A
    second: str  # ... and as Response B
    verdict: Verdict  # in slots
    at: str  # when, ISO 8601 UTC

    def judgement(self) -> Judgement:
        return Judgement(self.item, self.first, self.second, self.verdict, reply="")


def check_rater(name: Any) -> str | None:
    """Why `name` cannot be a rater's name, or None when it can."""
    if not isinstance(name, str) or not RATER_NAME.fullmatch(name):
        return f"a rater's name is {RATER_NAME_HELP}"
    return None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RatingStore:
    """Every rater's live ratings (undone ones gone), kept in memory and appended to the file.
    Thread-safe: the page's requests arrive on several threads."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        # Locked before reading: reading drops a cut-off last line, which must not be a line a
        # running server is writing at this moment.
        self._file: IO[str] | None = open_append(path, flag="--output")
        _lock_exclusive(self._file, path)
        self.recorded = 0  # ratings this store added (an undo takes none off)
        # rater -> item -> rating, in the order given (the last is what undo takes back)
        self._live: dict[str, dict[str, Rating]] = {}
        try:
            self._replay()
        except Exception:
            self.close()
            raise

    def _replay(self) -> None:
        fix = f"move {self.path} away to start the ratings afresh (or fix the line)"
        rows = read_appended_jsonl(self.path, ("rater", "item"), "eval rate", fix)
        for lineno, row in rows:
            if row.get("undo") is True:
                self._live.get(row["rater"], {}).pop(row["item"], None)
                continue
            rating = _rating(row)
            if rating is None:
                raise UserError(
                    f"{self.path}:{lineno}: not a rating that `alpaca-forge eval rate` wrote", fix
                )
            by_item = self._live.setdefault(rating.rater, {})
            by_item.pop(rating.item, None)  # a later line for the same item wins, and is the newest
            by_item[rating.item] = rating

    # -- reading

    def raters(self) -> list[str]:
        with self._lock:
            return sorted(r for r, by_item in self._live.items() if by_item)

    def ratings(self, rater: str | None = None) -> list[Rating]:
        with self._lock:
            if rater is not None:
                return list(self._live.get(rater, {}).values())
            return [r for name in sorted(self._live) for r in self._live[name].values()]

    def get(self, rater: str, item: str) -> Rating | None:
        with self._lock:
            return self._live.get(rater, {}).get(item)

    def rated(self, rater: str) -> set[str]:
        with self._lock:
            return set(self._live.get(rater, {}))

    # -- writing

    def add(self, rating: Rating) -> bool:
        """Record `rating`; False (and nothing written) when the rater has rated that item."""
        with self._lock:
            by_item = self._live.setdefault(rating.rater, {})
            if rating.item in by_item:
                return False
            row = {
                "rater": rating.rater,
                "item": rating.item,
                "first": rating.first,
                "second": rating.second,
                "verdict": rating.verdict,
                "at": rating.at,
            }
            self._append(row)
            by_item[rating.item] = rating
            self.recorded += 1
            return True

    def undo(self, rater: str) -> Rating | None:
        """Take back the rater's latest rating; None when they have none."""
        with self._lock:
            by_item = self._live.get(rater, {})
            if not by_item:
                return None
            last = next(reversed(by_item.values()))
            self._append({"rater": rater, "item": last.item, "undo": True, "at": now()})
            del by_item[last.item]
            return last

    def _append(self, row: dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError("this store is closed")
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        sync(self._file)  # a rating acknowledged to the page survives a kill or a power cut

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()  # closing releases the lock
            self._file = None

    def __enter__(self) -> RatingStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _rating(row: dict[str, Any]) -> Rating | None:
    fields = ("first", "second", "at")
    if not all(isinstance(row.get(k), str) for k in fields) or row.get("verdict") not in VERDICTS:
        return None
    if check_rater(row["rater"]) is not None or row["first"] == row["second"]:
        return None
    return Rating(row["rater"], row["item"], row["first"], row["second"], row["verdict"], row["at"])


def _lock_exclusive(f: IO[str], path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: one server per folder is then the user's to keep
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        raise UserError(
            f"--output {path.parent}: another `alpaca-forge eval rate` is using {path.name} now",
            "stop it first (Ctrl-C writes its report), or give this one another --output",
        ) from e
