"""`alpaca-forge prompt`: the exact prompt a model sees for an instruction."""

from .runner import PromptConfig, PromptResult, run

__all__ = ["PromptConfig", "PromptResult", "run"]
