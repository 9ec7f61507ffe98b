"""eval rate: a blind rating page for people on two systems' answers, resumable per rater, with
agreement between raters and with the LLM judge.

Modules in data-flow order: comparison (what is rated), ratings (the ratings file), app (the page's
server: gate, routes, each rater's sides), runner (serving until Ctrl-C), report (one `eval
pairwise` report per rater and pooled), agreement (Cohen's kappa, agreement.json / .md)."""

from .agreement import Kappa
from .config import RateConfig
from .ratings import Rating, RatingStore
from .report import RateReport, write_rate_report
from .runner import RateRun, RatingServer, run_rate, start

__all__ = [
    "Kappa",
    "RateConfig",
    "RateReport",
    "RateRun",
    "Rating",
    "RatingServer",
    "RatingStore",
    "run_rate",
    "start",
    "write_rate_report",
]
