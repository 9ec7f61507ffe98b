"""`alpaca-forge eval rate`: serve the blind rating page until Ctrl-C, then write the report.

Data flow: the set and the two predictions files (checked before anything listens) -> the page
hands each rater their next unrated item, the answers as Response A and B -> every verdict
appended to OUTPUT/ratings.jsonl -> on stop (or `--report-only`) the ratings become judgements
(`human:NAME`), compared as the LLM judge's are: one report per rater in OUTPUT/raters/NAME/,
one for all raters pooled in OUTPUT/, and agreement.json / agreement.md with Cohen's kappa for
every pair of raters and for each rater against the LLM judge's report.

    with start(RateConfig(set=..., a=..., b=..., output=..., port=0)) as server:  # a test, a notebook
        print(server.url)
    write_rate_report(config)
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.errors import UserError
from ...core.files import check_output, write_json_atomic, write_text_atomic
from ...core.net import BackgroundServer, bind_listener, until_interrupted
from .. import stats
from ..compare import PairwiseResult, compare
from ..items import Item, System, check_names, parse_system, read_answers, read_set
from ..judge import side_of
from .config import LOOPBACK_NAMES, RateConfig
from .ratings import RATINGS_FILE, Rating, RatingStore

log = logging.getLogger("alpaca_forge")

LABELS = ("a", "b", "tie")  # a verdict in the systems' terms: A's system won, B's, or a tie
POOLED = "humans (pooled)"  # the pooled raters' row in the agreement tables


# ---------------------------------------------------------------------------------------------
# What is rated


@dataclass(frozen=True)
class Comparison:
    items: list[Item]
    a: System
    b: System


def load_comparison(config: RateConfig) -> Comparison:
    """The set and both systems' answers to every item, or an error naming what is wrong."""
    specs = [parse_system(config.a, "--a"), parse_system(config.b, "--b")]
    for flag, spec in zip(("--a", "--b"), specs, strict=True):
        if spec.model is not None:
            raise UserError(
                f"{flag} {spec.source}: people rate answers already written, not a model",
                f"run `alpaca-forge infer --model {spec.model} --input {config.set} --output FILE` first, "
                f"then rate its file: {flag} {spec.name}=FILE",
            )
    check_names(specs)
    items = read_set(config.set)
    a, b = (read_answers(s, items, answer_field=config.answer_field) for s in specs)
    return Comparison(items, a, b)


# ---------------------------------------------------------------------------------------------
# Serving


class RatingServer:
    """The page, served in a thread from `start()` until `stop()`; `url` is where it listens."""

    def __init__(self, config: RateConfig):
        self.config = config
        self.started = time.perf_counter()
        comparison = load_comparison(config)
        if config.judge_report:
            read_judge_report(config.judge_report, comparison)  # a wrong report fails now, not at the end
        output = check_output(config.output, flag="--output", folder=True)
        from .app import RateSession, create_app

        self.store = RatingStore(output / RATINGS_FILE)
        try:
            self.session = RateSession(
                comparison.items,
                comparison.a,
                comparison.b,
                self.store,
                seed=config.seed,
                loopback_only=config.host in LOOPBACK_NAMES,
            )
            sock = bind_listener(config.host, config.port, backlog=128)
        except BaseException:
            self.store.close()
            raise
        self._http = BackgroundServer(create_app(self.session), sock, name="eval-rate", graceful_shutdown_s=2)
        self.port, self.url = self._http.port, self._http.url
        if not self._http.wait_started():
            self.stop()
            raise UserError(f"the rating page could not start on {self.url}", "see the messages above")

    @property
    def recorded(self) -> int:
        """Ratings recorded since this server started (an undo takes none off)."""
        return self.store.recorded

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C in the caller's thread raises KeyboardInterrupt)."""
        self._http.wait()

    def stop(self) -> int:
        """Stop serving and let go of the ratings file; returns the ratings this run recorded."""
        self._http.stop()
        self.store.close()
        return self.recorded

    def __enter__(self) -> RatingServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start(config: RateConfig) -> RatingServer:
    """Serve the rating page now, in the background (`port=0`: any free port)."""
    return RatingServer(config)


@dataclass(frozen=True)
class RateRun:
    url: str | None  # None with --report-only
    recorded: int  # ratings recorded by this run
    report: RateReport | None  # None when nobody has rated anything yet
    elapsed_s: float


def run_rate(config: RateConfig) -> RateRun:
    """Serve until Ctrl-C (or SIGTERM), then write the report; with `report_only`, just the report."""
    started = time.perf_counter()
    if config.report_only:
        return RateRun(None, 0, write_rate_report(config), time.perf_counter() - started)
    server = start(config)
    try:  # whenever Ctrl-C comes, from here on the server is stopped (a live one keeps the process up)
        log.info(
            "rating page: %s/  (%d items; give the raters this address; Ctrl-C stops and writes the report)",
            server.url,
            len(server.session.items),
        )
        if config.host not in LOOPBACK_NAMES:
            log.info("reachable from other machines: anyone who can reach it can rate, under any name")
        until_interrupted(server.wait)
    finally:
        server.stop()
    try:
        report = write_rate_report(config)
    except NoRatings:
        log.info("nobody has rated anything yet: no report written")
        report = None
    return RateRun(server.url, server.recorded, report, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Agreement


@dataclass(frozen=True)
class Kappa:
    """Two raters (or a rater and the judge) on the items both decided."""

    first: str
    second: str
    items: int
    agreement: float | None  # the share of those items they labelled alike
    kappa: float | None  # Cohen's kappa; None with no items, or one label only on one side
    table: dict[str, dict[str, int]]  # first's label -> second's label -> items
    left_out: dict[str, int]  # why items either decided were not counted -> how many


def kappa_between(
    first: str, second: str, x: dict[str, str], y: dict[str, str], left_out: dict[str, int]
) -> Kappa:
    """`x`, `y`: item -> label; counted on the items both have, in `x`'s order."""
    common = [item for item in x if item in y]
    lx, ly = [x[i] for i in common], [y[i] for i in common]
    table = {
        p: {q: sum(1 for u, v in zip(lx, ly, strict=True) if (u, v) == (p, q)) for q in LABELS}
        for p in LABELS
    }
    agreement = sum(u == v for u, v in zip(lx, ly, strict=True)) / len(common) if common else None
    return Kappa(first, second, len(common), agreement, stats.cohen_kappa(lx, ly), table, left_out)


@dataclass(frozen=True)
class JudgeOutcomes:
    path: Path
    judge: str
    labels: dict[str, str]  # item -> "a" | "b" | "tie", in this comparison's terms
    unjudged: set[str]  # items the judge left unjudged (an unreadable verdict)


def read_judge_report(path: str | Path, comparison: Comparison) -> JudgeOutcomes:
    """The LLM judge's outcome per item, from an `eval pairwise` report.json of the same two systems
    (in either order)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "report.json"
    fix = "give --judge-report the folder (or report.json) `alpaca-forge eval pairwise` wrote for these two systems"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"--judge-report {p}: cannot be read ({e.strerror or e})", fix) from e
    except json.JSONDecodeError as e:
        raise UserError(f"--judge-report {p}:{e.lineno}: not JSON ({e.msg})", fix) from e
    rows = data.get("per_item") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"--judge-report {p}: not a pairwise report (no per-item outcomes)", fix)
    a, b = comparison.a.name, comparison.b.name
    if {data.get("a"), data.get("b")} != {a, b}:
        raise UserError(
            f"--judge-report {p}: compares {data.get('a')!r} with {data.get('b')!r}, not {a!r} with {b!r}",
            "name the systems as that report does (--a NAME=FILE --b NAME=FILE), or give the report of these two",
        )
    swapped = data["a"] != a
    outcome_label = {"win": "b" if swapped else "a", "loss": "a" if swapped else "b", "tie": "tie"}
    labels, unjudged = {}, set()
    for row in rows:
        item, outcome = str(row.get("id")), row.get("outcome")
        if outcome in outcome_label:
            labels[item] = outcome_label[outcome]
        elif outcome == "unjudged":
            unjudged.add(item)
        else:
            raise UserError(f"--judge-report {p}: item {item!r} has the outcome {outcome!r}", fix)
    return JudgeOutcomes(p, str(data.get("judge") or "the LLM judge"), labels, unjudged)


def judge_kappa(name: str, labels: dict[str, str], judge: JudgeOutcomes) -> Kappa:
    left_out = {
        "unjudged_by_judge": sum(1 for i in labels if i in judge.unjudged),
        "not_in_judge_report": sum(1 for i in labels if i not in judge.unjudged and i not in judge.labels),
    }
    return kappa_between(name, judge.judge, labels, judge.labels, left_out)


# ---------------------------------------------------------------------------------------------
# The report


class NoRatings(UserError):
    pass


@dataclass(frozen=True)
class RateReport:
    output: Path
    pooled: PairwiseResult  # every rater's ratings as judgements of one comparison
    raters: dict[str, PairwiseResult]  # one comparison per rater
    between_raters: tuple[Kappa, ...]  # every pair of raters
    with_judge: tuple[Kappa, ...]  # each rater, then the pooled outcome, against the LLM judge
    judge_report: Path | None
    ratings: int  # ratings counted
    left_out: int  # ratings in the file of items or systems not in this comparison
    files: list[Path]


def write_rate_report(config: RateConfig) -> RateReport:
    """The report of the ratings in OUTPUT/ratings.jsonl so far (a server on OUTPUT must be stopped)."""
    comparison = load_comparison(config)
    judge = read_judge_report(config.judge_report, comparison) if config.judge_report else None
    output = check_output(config.output, flag="--output", folder=True)
    path = output / RATINGS_FILE
    if not path.exists():
        raise NoRatings(
            f"--output {output}: holds no {RATINGS_FILE}: nobody has rated anything there yet",
            "run `alpaca-forge eval rate` without --report-only and rate first (or check --output)",
        )
    with RatingStore(path) as store:  # locks it: a running server is refused, not raced
        ratings = store.ratings()
    return rate_report(
        comparison, ratings, output, judge=judge, seed=config.seed, samples=config.bootstrap_samples
    )


def rate_report(
    comparison: Comparison,
    ratings: Sequence[Rating],
    output: Path,
    *,
    judge: JudgeOutcomes | None = None,
    seed: int = 0,
    samples: int = 2000,
) -> RateReport:
    from ..report import write_pairwise_report

    items, a, b = comparison.items, comparison.a, comparison.b
    in_set = {it.id for it in items}
    counted = [r for r in ratings if r.item in in_set and {r.first, r.second} == {a.name, b.name}]
    left_out = len(ratings) - len(counted)
    if not counted:
        raise NoRatings(
            f"{output / RATINGS_FILE}: no rating of these two systems on this set yet"
            + (f" ({left_out} of other items or systems)" if left_out else ""),
            "rate some items first (run `alpaca-forge eval rate` without --report-only)",
        )
    by_rater: dict[str, list[Rating]] = {}
    for r in counted:
        by_rater.setdefault(r.rater, []).append(r)
    names = sorted(by_rater)
    blind = (
        "Rated blind in `alpaca-forge eval rate`: people saw the instruction and the two answers as "
        "Response A and B without the systems' names; which system was A was seeded per rater, half "
        "of each rater's items each way."
    )

    def notes(rated: int) -> list[str]:
        out = [blind]
        if rated < len(items):
            out.append(
                f"{len(items) - rated} of the set's {len(items)} items are not rated yet: they are in no figure."
            )
        if left_out:
            out.append(
                f"{left_out} rating(s) in {RATINGS_FILE} are of other items or systems and are left out."
            )
        return out

    def judged(js: Sequence[Rating], judge_name: str) -> PairwiseResult:
        return compare(items, a, b, [r.judgement() for r in js], judge=judge_name, samples=samples, seed=seed)

    files: list[Path] = []
    per_rater = {}
    for name in names:
        result = per_rater[name] = judged(by_rater[name], f"human:{name}")
        files += write_pairwise_report(
            result,
            output / "raters" / name,
            title=f"{a.name} vs {b.name}: blind ratings by {name}",
            notes=notes(len({r.item for r in by_rater[name]})),
        )
    pooled = judged(counted, f"humans ({len(names)} rater{'s' if len(names) != 1 else ''})")
    pooled_notes = notes(len({r.item for r in counted}))
    if len(names) > 1:
        pooled_notes.append(
            f"Pooled over {len(names)} raters ({', '.join(names)}): each rating is one judgement, and an item "
            "the raters decided differently counts as a tie. 'Position consistency' here is the share of "
            "the items rated by exactly two raters on which they agreed."
        )
    files += write_pairwise_report(
        pooled, output, title=f"{a.name} vs {b.name}: blind ratings by people", notes=pooled_notes
    )

    labels = {
        n: {r.item: side_of(r.verdict, shown_first=r.first == a.name) for r in by_rater[n]} for n in names
    }
    between = tuple(
        kappa_between(x, y, labels[x], labels[y], {}) for x, y in itertools.combinations(names, 2)
    )
    with_judge: tuple[Kappa, ...] = ()
    if judge is not None:
        outcome_label = {"win": "a", "loss": "b", "tie": "tie"}
        pooled_labels = {
            o.item_id: outcome_label[o.outcome] for o in pooled.outcomes if o.outcome in outcome_label
        }
        with_judge = tuple(judge_kappa(n, labels[n], judge) for n in names)
        if len(names) > 1:
            with_judge += (judge_kappa(POOLED, pooled_labels, judge),)
    report = RateReport(
        output,
        pooled,
        per_rater,
        between,
        with_judge,
        judge.path if judge else None,
        len(counted),
        left_out,
        files,
    )
    data = agreement_data(report, comparison, judge)
    files += [
        write_json_atomic(output / "agreement.json", data),
        write_text_atomic(output / "agreement.md", agreement_markdown(data)),
    ]
    return report


def _kappa_data(k: Kappa) -> dict[str, Any]:
    return {
        "between": [k.first, k.second],
        "items": k.items,
        "agreement": k.agreement,
        "kappa": k.kappa,
        "table": k.table,
        "left_out": k.left_out,
    }


def agreement_data(report: RateReport, comparison: Comparison, judge: JudgeOutcomes | None) -> dict[str, Any]:
    return {
        "a": comparison.a.name,
        "b": comparison.b.name,
        "labels": {"a": f"{comparison.a.name} better", "b": f"{comparison.b.name} better", "tie": "tie"},
        "items": len(comparison.items),
        "raters": {name: r.judged for name, r in report.raters.items()},
        "between_raters": [_kappa_data(k) for k in report.between_raters],
        "judge": None
        if judge is None
        else {
            "report": str(judge.path),
            "name": judge.judge,
            "unjudged_items": len(judge.unjudged),
            "with_raters": [_kappa_data(k) for k in report.with_judge],
        },
    }


def _num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def agreement_markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# Agreement on {data['a']} vs {data['b']}",
        "",
        f"Cohen's kappa on the items both sides decided, labels in the systems' terms ({data['a']} better, "
        f"{data['b']} better, tie), so the sides each rater saw do not matter. 1 is full agreement, "
        "0 what chance alone gives; n/a with no common item, or one label only on one side.",
        "",
        "Items rated: "
        + ", ".join(f"{name} {n}" for name, n in data["raters"].items())
        + f" (of {data['items']}).",
        "",
        "## Between raters",
        "",
    ]
    if data["between_raters"]:
        lines += ["| raters | items | agreement | kappa |", "| --- | ---: | ---: | ---: |"]
        for k in data["between_raters"]:
            lines.append(
                f"| {k['between'][0]} / {k['between'][1]} | {k['items']} | {_num(k['agreement'])} | {_num(k['kappa'])} |"
            )
    else:
        lines.append("One rater only: nothing to compare.")
    judge = data["judge"]
    if judge is not None:
        lines += [
            "",
            f"## With the LLM judge (`{judge['name']}`)",
            "",
            f"From {judge['report']}; the {judge['unjudged_items']} item(s) it left unjudged are not counted.",
            "",
            "| rater | items | agreement | kappa | left out: unjudged / not in its report |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for k in judge["with_raters"]:
            lo = k["left_out"]
            lines.append(
                f"| {k['between'][0]} | {k['items']} | {_num(k['agreement'])} | {_num(k['kappa'])} | "
                f"{lo['unjudged_by_judge']} / {lo['not_in_judge_report']} |"
            )
    return "\n".join(lines) + "\n"
