"""People's verdicts as pairs: an `eval rate` folder's ratings.jsonl read back (undos applied, a
rater's latest rating of an item kept), with the two systems' answers it showed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from ..core.files import read_appended_jsonl
from ..judging.items import Item, System, check_names, parse_system, read_answers, read_set
from .config import PreferConfig
from .decide import Decision, Vote, decide

RATINGS_FILE = "ratings.jsonl"  # as `eval rate` names it
VERDICTS = ("A", "B", "tie")


@dataclass(frozen=True)
class Rated:
    items: list[Item]
    systems: tuple[System, System]
    decisions: dict[str, Decision]  # item id -> decision between system 0 (x) and 1 (y)
    raters: list[str]
    ratings: int
    left_out: int  # ratings of items or systems not in this comparison


def read_ratings(path: Path) -> dict[tuple[str, str], dict]:
    """(rater, item) -> the rater's live rating of the item (later lines win; an undo removes)."""
    fix = f"check that {path.parent} is an `eval rate` --output folder"
    live: dict[tuple[str, str], dict] = {}
    for lineno, row in read_appended_jsonl(path, ("rater", "item"), "eval rate", fix):
        key = (row["rater"], row["item"])
        if row.get("undo") is True:
            live.pop(key, None)
            continue
        fields_ok = all(isinstance(row.get(k), str) for k in ("first", "second"))
        if not fields_ok or row.get("verdict") not in VERDICTS or row["first"] == row["second"]:
            raise UserError(f"{path}:{lineno}: not a rating that `alpaca-forge eval rate` wrote", fix)
        live.pop(key, None)
        live[key] = row
    return live


def rated_pairs(config: PreferConfig) -> Rated:
    """Every item's ratings, by all raters, decided as the judge's verdicts are."""
    folder = Path(config.from_ratings or "")
    path = folder / RATINGS_FILE
    if not folder.is_dir():
        raise UserError(
            f"--from-ratings {folder}: is not a folder",
            "name the --output folder of `alpaca-forge eval rate`",
        )
    if not path.is_file():
        raise UserError(
            f"--from-ratings {folder}: holds no {RATINGS_FILE}, so nobody has rated anything there",
            "name the --output folder of an `alpaca-forge eval rate` that people have rated in",
        )
    specs = [parse_system(config.a or "", "--a"), parse_system(config.b or "", "--b")]
    for flag, spec in zip(("--a", "--b"), specs, strict=True):
        if spec.model is not None:
            raise UserError(
                f"{flag} {spec.source}: people rated answers already written, not a model",
                f"give {flag} the predictions file given to `eval rate`: {flag} {spec.name}=FILE",
            )
    check_names(specs)
    items = read_set(config.input, limit=config.limit, flag="--input")
    a, b = (read_answers(s, items, answer_field=config.answer_field, partial_set=True) for s in specs)
    live = read_ratings(path)
    if not live:
        raise UserError(f"{path}: holds no ratings (every one was undone)", "rate first, then make pairs")
    names = (a.name, b.name)
    by_id = {it.id: it for it in items}
    votes: dict[str, list[Vote]] = {}
    left_out = 0
    for (rater, item_id), row in live.items():
        if item_id not in by_id or {row["first"], row["second"]} != set(names):
            left_out += 1
            continue
        votes.setdefault(item_id, []).append(
            Vote(row["first"] == names[0], row["verdict"], False, {"rater": rater})
        )
    if not votes:
        raise UserError(
            f"{path}: none of its {len(live)} ratings is of systems {names[0]!r} and {names[1]!r} on items of {config.input}",
            "give --a, --b and --input as given to `eval rate` (the names are the systems' as rated)",
        )
    decisions = {it.id: decide(0, 1, votes[it.id], config.min_agreement) for it in items if it.id in votes}
    raters = sorted({rater for rater, _item in live})
    return Rated(items, (a, b), decisions, raters, len(live) - left_out, left_out)
