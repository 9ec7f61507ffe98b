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

import logging
import time
from dataclasses import dataclass
from typing import Any

from ...core.errors import UserError
from ...core.files import check_output
from ...core.net import BackgroundServer, bind_listener, until_interrupted
from .agreement import read_judge_report
from .comparison import load_comparison
from .config import LOOPBACK_NAMES, RateConfig
from .ratings import RATINGS_FILE, RatingStore
from .report import NoRatings, RateReport, write_rate_report

log = logging.getLogger("alpaca_forge")


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
        self.app = create_app(self.session)
        self._http = BackgroundServer(self.app, sock, name="eval-rate", graceful_shutdown_s=2)
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
