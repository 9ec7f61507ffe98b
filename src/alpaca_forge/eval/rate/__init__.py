"""eval rate: a blind rating page for people on two systems' answers, resumable per rater, with
agreement between raters and with the LLM judge."""

from .config import RateConfig
from .ratings import Rating, RatingStore
from .runner import Kappa, RateReport, RateRun, RatingServer, run_rate, start, write_rate_report

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
