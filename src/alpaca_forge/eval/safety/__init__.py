"""`alpaca-forge eval safety`: red-team prompts through a model, with and without the content
filter `serve` runs; refusal and block rates by category, benign controls for false alarms."""

from .config import SafetyConfig
from .runner import (
    BlockedAt,
    CategoryRates,
    PromptOutcome,
    RedTeamPrompt,
    SafetyResult,
    is_refusal,
    load_prompts,
    run_safety,
)

__all__ = [
    "BlockedAt",
    "CategoryRates",
    "PromptOutcome",
    "RedTeamPrompt",
    "SafetyConfig",
    "SafetyResult",
    "is_refusal",
    "load_prompts",
    "run_safety",
]
