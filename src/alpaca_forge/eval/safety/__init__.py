"""`alpaca-forge eval safety`: red-team prompts through a model, with and without the content
filter `serve` runs; refusal and block rates by category, benign controls for false alarms.

Modules in data-flow order: prompts (the prompt set), runner (the answers, cached), outcomes (each
answer read with and without the filter; counts), report (safety.json, .md, .png)."""

from .config import SafetyConfig
from .outcomes import BlockedAt, CategoryRates, PromptOutcome, SafetyResult, is_refusal
from .prompts import RedTeamPrompt, load_prompts
from .runner import run_safety

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
