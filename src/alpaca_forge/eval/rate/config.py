"""Settings of `alpaca-forge eval rate`."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.config import REQUIRED, Config, setting
from ..config import SET_HELP

LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")
SYSTEM_HELP = (
    "[NAME=]FILE: a predictions file (JSONL or JSON: infer's output, or rows with 'response'); "
    "its name is never shown to the raters"
)


@dataclass(frozen=True)
class RateConfig(Config):
    set: str = setting(REQUIRED, SET_HELP, metavar="FILE")
    a: str = setting(REQUIRED, "system A: " + SYSTEM_HELP, metavar="SYSTEM")
    b: str = setting(REQUIRED, "system B, the same way", metavar="SYSTEM")
    output: str = setting(
        REQUIRED,
        "folder for ratings.jsonl (appended to; every rater resumes from it) and the report",
        metavar="DIR",
    )
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: raters on other machines, no login)")
    port: int = setting(8400, "port to listen on (0: any free port)", ge=0, le=65535)
    seed: int = setting(
        0, "seeds each rater's sides: which answer is Response A (the same rater always gets the same)", ge=0
    )
    answer_field: str | None = setting(
        None, "the predictions' answer field (default: 'output', else 'response')", metavar="FIELD"
    )
    judge_report: str | None = setting(
        None,
        "an `eval pairwise` report (its folder or report.json) of the same two systems: adds each rater's "
        "Cohen's kappa against the LLM judge",
        metavar="PATH",
    )
    report_only: bool = setting(False, "write the report from the ratings so far and exit (no server)")
    bootstrap_samples: int = setting(2000, "bootstrap resamples of the items, for every interval", ge=100)
