"""prefer: preference pairs from a model's sampled answers, judged pairwise in both orders (or
people's ratings); expert iteration's best-of-K SFT records."""

from .config import PreferConfig
from .output import PreferResult
from .runner import run

__all__ = ["PreferConfig", "PreferResult", "run"]
