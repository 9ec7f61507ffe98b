"""eval: blind pairwise comparison by an LLM judge and by people, with honest statistics; a
Bradley–Terry leaderboard; a red-team safety check."""

from .compare import PairwiseResult, compare
from .config import JudgingConfig, LeaderboardConfig, PairwiseConfig
from .runner import Leaderboard, PairwiseRun, run_leaderboard, run_pairwise

__all__ = [
    "JudgingConfig",
    "Leaderboard",
    "LeaderboardConfig",
    "PairwiseConfig",
    "PairwiseResult",
    "PairwiseRun",
    "compare",
    "run_leaderboard",
    "run_pairwise",
]
