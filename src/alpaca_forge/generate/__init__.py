"""`alpaca-forge generate`: self-instruct records from seed tasks and a teacher, resumably."""

from .config import FilterConfig, GenerateConfig
from .runner import GenerateResult, StopReason, run

__all__ = ["FilterConfig", "GenerateConfig", "GenerateResult", "StopReason", "run"]
